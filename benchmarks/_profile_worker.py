"""One vLLM engine, one configuration: where its decode steps spend their time, written as JSON.

``benchmarks/profile_decode.py`` starts this script once per configuration. The engine core and
the model run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so cProfile sees them.

Per batch size B:

* warm-up: one ``generate`` of B prompts (compiles nothing later timed);
* unprofiled: median wall times of ``generate`` with ``max_tokens=1`` and with
  ``max_tokens=steps`` (``TIMING_REPEATS`` each, fresh prompts) give the decode step time
  (t_steps - t_1) / (steps - 1), as ``benchmarks/throughput.py`` measures decode;
* profiled: B prompts with ``max_tokens=steps`` are enqueued and the first engine step (the
  prefill, which samples the first token) runs unprofiled; cProfile then records the remaining
  steps - 1 engine steps, every one a decode step over the whole batch. Figures per step are
  the profile's cumulative times divided by that number of steps.

The profile is split into categories by the cumulative times of vLLM functions that do not call
one another (``CATEGORY_FUNCTIONS``), so each category holds only its own calls and the rest is
what remains of its parent: every category is >= 0 and they sum to the profiled step.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import statistics
from pathlib import Path

import _engine_worker  # the engine-sizing and prompt helpers of the throughput benchmark

TIMING_REPEATS = 3
TOP_FUNCTIONS = 8
MODEL_LEN_SLACK = 8  # tokens of max_model_len beyond the prompt and the new tokens

# (path suffix of the source file, function name) of the functions each measure adds up.
ENGINE_STEP = [("vllm/v1/engine/llm_engine.py", "step")]
MODEL_FORWARD = [("vllm/v1/worker/gpu_model_runner.py", "_model_forward")]
COMPUTE_LOGITS = [("vllm/model_executor/models/mamba2.py", "compute_logits")]
CATEGORY_FUNCTIONS = {
    # ColumnParallelLinear (in_proj) and RowParallelLinear (out_proj): their quant method's kernel.
    "linears": [("vllm/model_executor/layers/linear.py", "forward")],
    # The conv + scan custom op (quamba's int8 SSM: the fused kernel with gated norm and online
    # Hadamard), and what runs after the op in the other mixers: stock Mamba2's gated norm, and
    # the online Hadamard of the recipes with an fp SSM (w4a16, a pre-hook of out_proj).
    "ssm": [
        ("vllm/model_executor/layers/mamba/mamba_mixer2.py", "mamba_mixer2"),
        ("vllm/model_executor/layers/mamba/mamba_mixer2.py", "forward_native"),
        ("vllm_quamba/layers/cpu_ops.py", "hadamard_transform"),
    ],
    "residual norms": [("vllm/model_executor/layers/layernorm.py", "forward_native")],
}


def _read_settings() -> argparse.Namespace:
    """The run's settings, from the JSON file that ``profile_decode.py`` names on the command
    line: model, dtype, mamba_ssm_cache_dtype, batch_sizes, prompt_len, steps, seed, and
    profile_dir, where this worker writes its raw cProfile dumps and ``result.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", type=Path)
    return argparse.Namespace(**json.loads(parser.parse_args().settings.read_text()))


def _sampling(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, detokenize=False)


def _unprofiled_step_seconds(llm, steps: int, prompts) -> dict:
    """Wall times of generate with 1 and with ``steps`` new tokens, each time on ``prompts()``,
    and the decode step time from their medians."""
    first = [_engine_worker._timed_generate(llm, prompts(), _sampling(1)) for _ in range(TIMING_REPEATS)]
    full = [_engine_worker._timed_generate(llm, prompts(), _sampling(steps)) for _ in range(TIMING_REPEATS)]
    return {
        "first_token_seconds": first,
        "all_tokens_seconds": full,
        "step_seconds": (statistics.median(full) - statistics.median(first)) / (steps - 1),
    }


def _profile_decode(llm, prompts: list[dict], steps: int) -> cProfile.Profile:
    """cProfile of every engine step after the first (the prefill) of one batch of requests."""
    llm.enqueue(prompts, _sampling(steps), use_tqdm=False)
    # Steps report nothing until a request finishes; ``decode_breakdown`` checks that the
    # profile holds steps - 1 engine steps, which means that this one sampled every first token.
    llm.llm_engine.step()
    profiler = cProfile.Profile()
    profiler.enable()
    outputs = llm.wait_for_completion(use_tqdm=False)
    profiler.disable()
    if len(outputs) != len(prompts) or any(len(out.outputs[0].token_ids) != steps for out in outputs):
        raise RuntimeError(f"a request stopped before {steps} tokens: the profile would be wrong")
    return profiler


def _matching(stats: dict, functions: list[tuple[str, str]]) -> list[tuple]:
    return [key for key in stats if any(key[0].endswith(path) and key[2] == name for path, name in functions)]


def _outermost_seconds(stats: dict, functions: list[tuple[str, str]]) -> float:
    """Cumulative seconds of the matching functions, counted where a non-matching function calls
    them (a matching function called by another, e.g. a subclass's forward calling its base's,
    is inside its caller's time already)."""
    keys = set(_matching(stats, functions))
    callers = [(caller, edge) for key in keys for caller, edge in stats[key][4].items()]
    return sum(cumulative for caller, (_, _, _, cumulative) in callers if caller not in keys)


def _calls(stats: dict, functions: list[tuple[str, str]]) -> int:
    return sum(stats[key][1] for key in _matching(stats, functions))


def decode_breakdown(profile: pstats.Stats, decode_steps: int) -> dict:
    """Milliseconds per decode step by category, and the top functions by own time."""
    stats = profile.stats
    engine_steps = _calls(stats, ENGINE_STEP)
    if engine_steps != decode_steps:
        raise RuntimeError(f"profiled {engine_steps} engine steps, expected {decode_steps}")
    for name, functions in (("_model_forward", MODEL_FORWARD), ("compute_logits", COMPUTE_LOGITS)):
        calls = _calls(stats, functions)
        if calls != engine_steps:  # e.g. renamed in another vLLM version
            raise RuntimeError(f"{name} ran {calls} times in {engine_steps} engine steps, not once a step")
    per_step_ms = 1e3 / engine_steps
    step = _outermost_seconds(stats, ENGINE_STEP)
    model_forward = _outermost_seconds(stats, MODEL_FORWARD)
    logits = _outermost_seconds(stats, COMPUTE_LOGITS)
    inside = {name: _outermost_seconds(stats, functions) for name, functions in CATEGORY_FUNCTIONS.items()}
    categories = {
        "linears": inside["linears"],
        "lm_head + logits": logits,
        "ssm": inside["ssm"],
        "residual norms": inside["residual norms"],
        "other model forward": model_forward - sum(inside.values()),
        "vLLM outside the model": step - model_forward - logits,
    }
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:TOP_FUNCTIONS]
    return {
        "profiled_engine_steps": engine_steps,
        "profiled_step_ms": step * per_step_ms,
        "categories_ms": {name: seconds * per_step_ms for name, seconds in categories.items()},
        "function_calls_per_step": {
            name: _calls(stats, functions) / engine_steps for name, functions in CATEGORY_FUNCTIONS.items()
        },
        "top_own_time_ms": [
            {"function": pstats.func_std_string(key), "calls_per_step": calls / engine_steps, "ms": own * per_step_ms}
            for key, (_, calls, own, _, _) in top
        ],
    }


def _measure_batch(llm, batch: int, args, rng: random.Random, vocab: int) -> dict:
    def prompts() -> list[dict]:
        return _engine_worker._random_prompts(rng, batch, args.prompt_len, vocab)

    _engine_worker._timed_generate(llm, prompts(), _sampling(_engine_worker.WARMUP_TOKENS))
    unprofiled = _unprofiled_step_seconds(llm, args.steps, prompts)
    profiler = _profile_decode(llm, prompts(), args.steps)
    dump = Path(args.profile_dir) / f"batch{batch}.prof"
    profiler.dump_stats(dump)
    return {
        "batch_size": batch,
        "unprofiled_step_ms": 1e3 * unprofiled.pop("step_seconds"),
        "unprofiled_raw_seconds": unprofiled,
        "profile_dump": str(dump),
        **decode_breakdown(pstats.Stats(profiler), args.steps - 1),
    }


def _measure_batches(llm, args) -> list[dict]:
    rng, vocab = random.Random(args.seed), _engine_worker.prompt_vocab(llm)
    return [_measure_batch(llm, batch, args, rng, vocab) for batch in args.batch_sizes]


def main() -> None:
    args = _read_settings()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process, for cProfile
    llm, _, _ = _engine_worker.start_engine(
        max(args.batch_sizes), model=args.model, dtype=args.dtype, mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype,
        enforce_eager=True, max_model_len=args.prompt_len + args.steps + MODEL_LEN_SLACK, seed=args.seed,
    )  # fmt: skip
    model_config = llm.llm_engine.model_config
    engine = {"dtype": str(model_config.dtype).removeprefix("torch."), "quantization": model_config.quantization}
    result = {"engine": engine, "runs": _measure_batches(llm, args)}
    (Path(args.profile_dir) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    _engine_worker.shutdown(llm)


if __name__ == "__main__":
    main()
