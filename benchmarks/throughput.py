"""Throughput and memory of stock vLLM (float32, bfloat16) beside each quamba recipe.

    python benchmarks/throughput.py --model mamba2-130m --configs fp32,bf16,w8a8,w8a8-h2t \\
        --batch-sizes 1,16,64 --prompt-len 128 --output-len 128 --repeats 3

Each configuration runs in its own engine, in its own process tree
(``benchmarks/_engine_worker.py``), with ``LLM(...).generate`` and
``SamplingParams(temperature=0, ignore_eos=True, max_tokens=...)`` on random prompt token ids.
``fp32`` is always run: it is the baseline of every ratio. ``<recipe>-h2t`` (w8a8, w4a8, w4a16)
quantizes "head to toe": the recipe plus ``quantize_embedding=True, quantize_lm_head=True``
(Mamba2 only; asked of a Mamba1 model, the script refuses before any engine runs).

What each number means (B = batch size, L = ``--prompt-len``, N = ``--output-len``):

* prefill tokens/s at B = B * L / t1, where t1 is the median wall time of ``generate`` of B
  fresh prompts of L tokens with ``max_tokens=1`` (one forward over all prompts + one sample).
* decode tokens/s at B = B * (N - 1) / (tN - t1), where tN is the median wall time of
  ``generate`` of B fresh prompts of L tokens with ``max_tokens=N``: the N-1 tokens after the
  first, each a decode step over the whole batch. Medians are taken over ``--repeats``
  repetitions after one untimed warm-up ``generate`` per batch size.
* disk weight bytes: from the safetensors files: every tensor's element count times its
  element size as loaded, floating-point tensors at the engine dtype for stock configurations
  and as stored for quamba (whose engine runs in float32); a tied lm_head is stored, and
  counted, once. For quamba these are the checkpoint's bytes (int8, packed int4): what its
  kernels are meant to stream.
* resident weight bytes: what the loaded model keeps, measured inside the engine's model
  worker after the timed runs (``_engine_worker.py``): every distinct memory span of the
  parameters, buffers and the tensors / numpy arrays that layers and kernels keep (dequantized
  SSM parameters, the numba kernels' arrays), deduplicated by address, the Mamba state cache
  left out; plus, for each oneDNN matmul handle (vLLM-CPU packs fp linears and the lm_head into
  them, and keeps the lm_head's weight beside its handle), k * n * element size, an estimate of
  the packed copy that no tensor shows (marked "*" in the table, the modules listed).
* worker RSS: the model worker process's resident memory when the resident weight bytes are
  measured (its libraries, compiled code and state cache as well as the weights): a cross-check
  between configurations, not a weight figure.
* state bytes per sequence: the Mamba conv + SSM state of every layer, with the shapes and
  dtypes that the engine's model class reports to vLLM's state cache (int8 for quamba, the
  model dtype or ``--mamba-ssm-cache-dtype`` for stock).
* peak RSS: the largest sum of resident memory over the engine's whole process tree (the
  runner with vLLM's front end, the engine core, the model worker), sampled every
  ``MEMORY_SAMPLE_SECONDS`` from start to exit. Shared library pages count once per process;
  the Mamba state cache is sized for the largest batch (vLLM-CPU would otherwise reserve
  ``VLLM_CPU_KVCACHE_SPACE`` GiB whatever the model needs).
* bandwidth: streaming over a ``--bandwidth-gib`` GiB float32 tensor, medians of
  ``BANDWIDTH_REPEATS``: "read" (``tensor.sum()``, bytes read per second; the bound uses it,
  since a decode step mostly reads) and "copy" (into another tensor, bytes read + written per
  second as STREAM counts them; with write-allocate caches the memory moves 1.5x that, so copy
  reads lower than read and a bound built on it can be beaten). Both use as many torch
  threads as the engine's model process runs (vLLM-CPU pins its OpenMP threads and keeps a
  core for the front end: 1 thread on a 2-core machine), measured while no engine runs.
* bandwidth bound at B = B * read bandwidth / (weight bytes read per step + B * 2 * state bytes):
  the decode tokens/s if every step only streamed its weights once and read + wrote each
  sequence's state once. Weight bytes read per step are the disk weight bytes less an untied
  input embedding table, quantized or not (a step gathers B of its rows and their scales); the
  lm_head, quantized or not, is read once per step. "% bound" is decode tokens/s over that bound.

Ratios ("x fp32") divide each figure by the fp32 figure of the same run. On a shared machine the
numbers are noisy: every figure is a median, and the run prints its settings beside them.
Results go to ``--out-dir`` as JSON and a PNG chart.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_engine_worker.py"
FIXTURES = {"tiny-mamba2": REPO / "tests/assets/tiny-mamba2", "tiny-mamba1": REPO / "tests/assets/tiny-mamba1"}
BASELINE = "fp32"
MEMORY_SAMPLE_SECONDS = 0.1
BANDWIDTH_REPEATS = 7
ENGINE_ENV = {"VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
HEAD_TO_TOE_SUFFIX = "-h2t"
# w4ax is left out: the benchmark has no per-layer precision to give it.
HEAD_TO_TOE_RECIPES = ("w8a8", "w4a8", "w4a16")
MAMBA1_ARCHITECTURE = "MambaForCausalLM"
# Memory figures of a configuration (each also as a ratio to fp32), by their label in the chart.
MEMORY_FIGURES = {
    "disk weights": "disk_weight_bytes",
    "resident weights": "resident_weight_bytes",
    "state / seq": "state_bytes_per_sequence",
    "peak RSS": "peak_rss_bytes",
}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """One column of the comparison: how the checkpoint is made and how the engine runs it."""

    name: str
    dtype: str
    mamba_ssm_cache_dtype: str
    recipe: str | None = None  # a quamba recipe: the engine loads the quantized checkpoint
    head_to_toe: bool = False  # the embedding and lm_head quantized too (Mamba2 only)


def engine_configs() -> dict[str, EngineConfig]:
    """Stock float32/bfloat16, one quamba configuration per recipe of the checkpoint format, and
    the head-to-toe variant ("<recipe>-h2t") of each recipe that needs no per-layer choice.

    bf16 keeps vLLM's default SSM state dtype ("auto"), which is what a user gets (vLLM-CPU
    0.32 resets it to float32 for its Mamba2 backend; the results report the dtypes the engine
    really uses). Quamba states are int8 whatever the flag says.
    """
    from vllm_quamba.format import RECIPES

    configs = {
        "fp32": EngineConfig("fp32", "float32", "float32"),
        "bf16": EngineConfig("bf16", "bfloat16", "auto"),
    }
    configs.update({recipe: EngineConfig(recipe, "float32", "auto", recipe) for recipe in RECIPES})
    configs.update({
        f"{recipe}{HEAD_TO_TOE_SUFFIX}": EngineConfig(f"{recipe}{HEAD_TO_TOE_SUFFIX}", "float32", "auto", recipe, True)
        for recipe in HEAD_TO_TOE_RECIPES
    })  # fmt: skip
    return configs


# ----------------------------------------------------------------------------- checkpoints


def source_checkpoint(model: str, work_dir: Path, seed: int) -> tuple[Path, str]:
    """The unquantized checkpoint for ``--model`` and a short key naming it in the cache."""
    from vllm_quamba.random_checkpoint import MODEL_SHAPES, build_random_checkpoint

    if model in FIXTURES:
        return FIXTURES[model], model
    if model in MODEL_SHAPES:
        key = f"{model}-random-seed{seed}"
        path = work_dir / "models" / key
        if not path.is_dir():
            print(f"building random-weight {model} checkpoint in {path}", flush=True)
            partial = path.with_name(path.name + ".partial")  # renamed only once complete
            shutil.rmtree(partial, ignore_errors=True)
            build_random_checkpoint(model, partial, seed=seed)
            partial.rename(path)
        return path, key
    path = Path(model).resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {model}: neither a known name nor a checkpoint directory")
    return path, f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def check_head_to_toe(source: Path, config_names: list[str]) -> None:
    """Refuse head-to-toe configurations for a Mamba1 model before any engine runs: the
    converter quantizes the embedding and lm_head of Mamba2 models only."""
    architectures = json.loads((source / "config.json").read_text()).get("architectures", [])
    head_to_toe = [name for name in config_names if name.endswith(HEAD_TO_TOE_SUFFIX)]
    if head_to_toe and MAMBA1_ARCHITECTURE in architectures:
        raise SystemExit(
            f"--configs {','.join(head_to_toe)}: the embedding and lm_head are quantized for Mamba2 "
            f"models only, and {source} is a Mamba1 model ({MAMBA1_ARCHITECTURE}); use the recipes "
            "without the -h2t suffix"
        )


def quantized_checkpoint(source: Path, key: str, config: EngineConfig, args) -> Path:
    """The quamba checkpoint of ``source``, made once per configuration and calibration size."""
    from vllm_quamba.converters.quantize import quantize

    path = args.work_dir / "quantized" / f"{key}-{config.name}-calib{args.calib_samples}x{args.calib_seqlen}"
    if not (path / "config.json").is_file():  # quantize() renames a finished directory into place
        print(f"quantizing {source} with {config.name} into {path}", flush=True)
        start = time.perf_counter()
        quantize(
            source, path, recipe=config.recipe, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
            quantize_embedding=config.head_to_toe, quantize_lm_head=config.head_to_toe,
        )  # fmt: skip
        print(f"  quantized in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def weight_bytes(checkpoint: Path, engine_dtype: str, quantized: bool) -> dict[str, int]:
    """Bytes of the weights as loaded (see the module docstring), and of the untied embedding
    (its tensors: ``weight``, or the ``weight_packed`` + ``weight_scale`` of a quantized one)."""
    import torch
    from safetensors import safe_open

    from vllm_quamba.format import EMBEDDING

    float_size = torch.tensor([], dtype=getattr(torch, engine_dtype)).element_size()
    config = json.loads((checkpoint / "config.json").read_text())
    total = embedding = 0
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, framework="pt") as tensors:
            for name in tensors.keys():
                tensor = tensors.get_slice(name)
                numel = 1
                for size in tensor.get_shape():
                    numel *= size
                dtype = getattr(torch, _SAFETENSORS_DTYPES[tensor.get_dtype()])
                size = float_size if dtype.is_floating_point and not quantized else dtype.itemsize
                total += numel * size
                if name.startswith(EMBEDDING + ".") and not config.get("tie_word_embeddings", False):
                    embedding += numel * size
    return {"disk_weight_bytes": total, "untied_embedding_bytes": embedding}


# safetensors dtype codes -> torch dtype names (torch is imported only where it is needed).
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


# ----------------------------------------------------------------------------- measurement


def memory_bandwidth(gib: float, threads: int) -> dict[str, float]:
    """Streaming bandwidths in bytes/s with ``threads`` torch threads, medians of
    BANDWIDTH_REPEATS: "read" sums a ``gib`` GiB tensor, "copy" copies it into another
    ((read + written) / time, STREAM's convention)."""
    import torch

    torch.set_num_threads(threads)
    source = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)  # fault the pages in before timing
    size = source.numel() * source.element_size()
    return {
        "read": size / _median_seconds(source.sum),
        "copy": 2 * size / _median_seconds(lambda: target.copy_(source)),
    }


def _median_seconds(fn) -> float:
    times = []
    for _ in range(BANDWIDTH_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class TreeMemoryMonitor:
    """Peak of the summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int):
        import psutil

        self._root = psutil.Process(pid)
        self._stop = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                processes = [self._root, *self._root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(MEMORY_SAMPLE_SECONDS)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


def run_engine(checkpoint: Path, config: EngineConfig, log: Path, args) -> dict:
    """Start the worker for one configuration (its output goes to ``log``); its JSON plus the
    process tree's peak RSS."""
    command = [
        sys.executable, str(WORKER), "--model", str(checkpoint), "--dtype", config.dtype,
        "--mamba-ssm-cache-dtype", config.mamba_ssm_cache_dtype, "--batch-sizes",
        ",".join(map(str, args.batch_sizes)), "--prompt-len", str(args.prompt_len),
        "--output-len", str(args.output_len), "--repeats", str(args.repeats),
        "--seed", str(args.seed),
    ] + (["--enforce-eager"] if args.enforce_eager else [])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vllm-quamba-bench-") as tmp:
        json_out = Path(tmp) / "result.json"
        start = time.perf_counter()
        with log.open("w") as log_file:
            process = subprocess.Popen(
                command + ["--json-out", str(json_out)], stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, **ENGINE_ENV},
            )
            monitor = TreeMemoryMonitor(process.pid)
            returncode = process.wait()
            peak = monitor.stop()
        wall = time.perf_counter() - start
        if returncode != 0 or not json_out.is_file():
            return {"error": f"engine exited with {returncode}; log: {log}", "wall_seconds": wall}
        return {**json.loads(json_out.read_text()), "peak_rss_bytes": peak, "wall_seconds": wall}


# ----------------------------------------------------------------------------- figures


def summarize(result: dict, weights: dict[str, int], bandwidth: float, args) -> dict:
    """Medians, tokens/s and the bandwidth bound for every batch size of one configuration;
    ``bandwidth`` was measured with as many threads as the engine's model process uses."""
    state = result["engine"]["state_bytes_per_sequence"]
    weight_read = weights["disk_weight_bytes"] - weights["untied_embedding_bytes"]
    batches = []
    for run in result["runs"]:
        batch = run["batch_size"]
        prefill = statistics.median(run["prefill_seconds"])
        full = statistics.median(run["full_seconds"])
        decode_seconds = full - prefill
        decode = batch * (args.output_len - 1) / decode_seconds if decode_seconds > 0 else float("nan")
        bound = batch * bandwidth / (weight_read + batch * 2 * state)
        batches.append({
            "batch_size": batch,
            "prefill_median_seconds": prefill,
            "full_median_seconds": full,
            "prefill_tokens_per_s": batch * args.prompt_len / prefill,
            "decode_tokens_per_s": decode,
            "bandwidth_bound_tokens_per_s": bound,
            "fraction_of_bound": decode / bound,
        })  # fmt: skip
    resident = result["engine"]["resident"]
    return {
        **weights,
        "resident_weight_bytes": resident["resident_weight_bytes"],
        "resident_detail": {key: value for key, value in resident.items() if key != "resident_weight_bytes"},
        "weight_bytes_read_per_step": weight_read,
        "state_bytes_per_sequence": state,
        "peak_rss_bytes": result["peak_rss_bytes"],
        "batches": batches,
    }


def add_ratios(summaries: dict[str, dict]) -> None:
    """Every figure of every configuration also as a ratio to fp32 of the same run."""
    base = summaries.get(BASELINE)
    if base is None or "error" in base:
        return
    base_batches = {b["batch_size"]: b for b in base["batches"]}
    for summary in summaries.values():
        if "error" in summary:
            continue
        summary["x_fp32"] = {key: summary[key] / base[key] for key in MEMORY_FIGURES.values()}
        for batch in summary["batches"]:
            ref = base_batches[batch["batch_size"]]
            batch["x_fp32"] = {
                key: batch[key] / ref[key] for key in ("prefill_tokens_per_s", "decode_tokens_per_s")
            }


def _name_width(summaries: dict[str, dict]) -> int:
    return max(map(len, summaries)) + 2


def print_table(summaries: dict[str, dict], bandwidths: dict[int, dict[str, float]]) -> None:
    for threads, bandwidth in sorted(bandwidths.items()):
        print(f"\nmemory bandwidth, {threads} threads, medians: read {bandwidth['read'] / 1e9:.2f} GB/s "
              f"(used for the bound), copy {bandwidth['copy'] / 1e9:.2f} GB/s")  # fmt: skip
    width = _name_width(summaries)
    print(f"{'config':<{width}}{'batch':>6}{'prefill tok/s':>15}{'x fp32':>8}{'decode tok/s':>14}{'x fp32':>8}"
          f"{'bound tok/s':>13}{'% bound':>9}")  # fmt: skip
    for name, summary in summaries.items():
        if "error" in summary:
            print(f"{name:<{width}}failed: {summary['error']}")
            continue
        for b in summary["batches"]:
            ratios = b.get("x_fp32", {})
            print(f"{name:<{width}}{b['batch_size']:>6}{b['prefill_tokens_per_s']:>15.1f}"
                  f"{ratios.get('prefill_tokens_per_s', float('nan')):>8.2f}{b['decode_tokens_per_s']:>14.1f}"
                  f"{ratios.get('decode_tokens_per_s', float('nan')):>8.2f}"
                  f"{b['bandwidth_bound_tokens_per_s']:>13.1f}{100 * b['fraction_of_bound']:>8.1f}%")  # fmt: skip
    _print_memory_table(summaries)


def _print_memory_table(summaries: dict[str, dict]) -> None:
    """Disk and resident weight bytes side by side; '*' marks a resident figure that includes
    an estimate for opaque oneDNN handles (listed below the table)."""
    width = _name_width(summaries)
    print(f"\n{'config':<{width}}{'disk MB':>10}{'x fp32':>8}{'resident MB':>13}{'x fp32':>8}{'state KB/seq':>14}"
          f"{'x fp32':>8}{'peak RSS MB':>13}{'x fp32':>8}{'worker RSS MB':>15}")  # fmt: skip
    opaque_notes = []
    for name, summary in summaries.items():
        if "error" in summary:
            continue
        ratios = summary.get("x_fp32", {})
        detail = summary["resident_detail"]
        marker = "*" if detail["opaque_handles"] else " "
        print(f"{name:<{width}}{summary['disk_weight_bytes'] / 1e6:>10.2f}{ratios.get('disk_weight_bytes', float('nan')):>8.3f}"
              f"{summary['resident_weight_bytes'] / 1e6:>12.2f}{marker}{ratios.get('resident_weight_bytes', float('nan')):>8.3f}"
              f"{summary['state_bytes_per_sequence'] / 1e3:>14.1f}{ratios.get('state_bytes_per_sequence', float('nan')):>8.3f}"
              f"{summary['peak_rss_bytes'] / 1e6:>13.0f}{ratios.get('peak_rss_bytes', float('nan')):>8.3f}"
              f"{detail['worker_rss_bytes'] / 1e6:>15.0f}")  # fmt: skip
        if detail["opaque_handles"]:
            modules = _module_list(handle["module"] for handle in detail["opaque_handles"])
            opaque_notes.append(f"  {name}: {detail['opaque_handle_bytes_estimate'] / 1e6:.2f} MB in "
                                f"{len(detail['opaque_handles'])} oneDNN handles ({modules})")  # fmt: skip
    if opaque_notes:
        print("* includes k x n x element size for each oneDNN matmul handle, whose packed weight no tensor shows:")
        print("\n".join(opaque_notes))


def _module_list(names) -> str:
    """Module names with layer numbers folded: "backbone.layers.*.mixer.in_proj x24"."""
    counts = collections.Counter(re.sub(r"\.\d+\.", ".*.", name) for name in names)
    return ", ".join(name if count == 1 else f"{name} x{count}" for name, count in counts.items())


def plot(summaries: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {name: s for name, s in summaries.items() if "error" not in s}
    batch_sizes = [b["batch_size"] for b in next(iter(ok.values()))["batches"]] if ok else []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(len(ok), 1)
    positions = range(len(batch_sizes))
    for i, (name, summary) in enumerate(ok.items()):
        x = [p + i * width for p in positions]
        axes[0].bar(x, [b["prefill_tokens_per_s"] for b in summary["batches"]], width, label=name)
        bars = axes[1].bar(x, [b["decode_tokens_per_s"] for b in summary["batches"]], width, label=name)
        axes[1].scatter(x, [b["bandwidth_bound_tokens_per_s"] for b in summary["batches"]],
                        marker="_", s=300, color=bars.patches[0].get_facecolor())  # fmt: skip
    for ax, what in zip(axes[:2], ("prefill tokens/s", "decode tokens/s (dash: bandwidth bound)")):
        ax.set_xticks([p + width * (len(ok) - 1) / 2 for p in positions], [f"batch {b}" for b in batch_sizes])
        ax.set_yscale("log")
        ax.set_title(what)
        ax.legend()
    names = list(ok)
    bar = 0.8 / len(MEMORY_FIGURES)
    for j, (label, key) in enumerate(MEMORY_FIGURES.items()):
        axes[2].bar([n + j * bar for n in range(len(names))], [ok[n].get("x_fp32", {}).get(key, float("nan")) for n in names], bar, label=label)
    axes[2].set_xticks([n + bar * (len(MEMORY_FIGURES) - 1) / 2 for n in range(len(names))], names, rotation=30)
    axes[2].axhline(1.0, color="grey", linewidth=0.8)
    axes[2].set_title("memory, ratio to fp32")
    axes[2].set_ylim(top=axes[2].get_ylim()[1] * 1.3)  # room for the legend above the bars
    axes[2].legend(ncol=2, fontsize="small", loc="upper center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def _csv(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mamba2",
                        help="tiny-mamba2, tiny-mamba1 (bundled fixtures), mamba2-130m, mamba2-370m, mamba-130m "
                             "(random weights, real shapes) or a checkpoint directory")  # fmt: skip
    parser.add_argument("--configs", type=_csv(str), default=["fp32", "bf16", "w8a8"],
                        help="comma separated, from: " + ",".join(engine_configs()) + f" (<recipe>{HEAD_TO_TOE_SUFFIX}: "
                             "the embedding and lm_head quantized too; Mamba2 only)")  # fmt: skip
    parser.add_argument("--batch-sizes", type=_csv(int), default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per batch size (medians)")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start, not what users get)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks/results")
    add_checkpoint_arguments(parser)
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the array the bandwidth copy streams")
    args = parser.parse_args(argv)
    if args.output_len < 2:
        parser.error("--output-len must be at least 2 (decode is measured after the first token)")
    check_configs(parser, args)
    return args


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Where checkpoints are cached and how they are made (shared with profile_decode.py)."""
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/vllm-quamba/benchmarks",
                        help="random-weight and quantized checkpoints are cached here")  # fmt: skip
    parser.add_argument("--calib-samples", type=int, default=8, help="speed depends on shapes, not on the scales: small calibration is enough")
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)


def check_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse unknown ``--configs``; add the fp32 baseline first when it is missing (every
    ratio is to fp32 of the same run)."""
    known = engine_configs()
    unknown = [name for name in args.configs if name not in known]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(known)}")
    if BASELINE not in args.configs:
        args.configs.insert(0, BASELINE)


def _result_path(args, key: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args.out_dir / f"throughput-{key}-{stamp}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configs = engine_configs()
    source, key = source_checkpoint(args.model, args.work_dir, args.seed)
    check_head_to_toe(source, args.configs)
    bandwidths: dict[int, dict[str, float]] = {}  # by thread count: each engine's bound uses its own
    summaries: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = _result_path(args, key)  # + .json and .png
    logs = args.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for name in args.configs:
        config = configs[name]
        print(f"[{name}] running", flush=True)
        try:
            checkpoint = quantized_checkpoint(source, key, config, args) if config.recipe else source
        except ValueError as error:  # e.g. a recipe not implemented yet for this architecture
            summaries[name] = raw[name] = {"error": f"quantize failed: {error}"}
            continue
        raw[name] = run_engine(checkpoint, config, logs / f"{path.name}-{name}.log", args)
        if "error" in raw[name]:
            summaries[name] = {"error": raw[name]["error"]}
            continue
        threads = raw[name]["engine"]["threads"]
        if threads not in bandwidths:
            bandwidths[threads] = memory_bandwidth(args.bandwidth_gib, threads)
        weights = weight_bytes(checkpoint, config.dtype, config.recipe is not None)
        summaries[name] = summarize(raw[name], weights, bandwidths[threads]["read"], args)
        summaries[name]["checkpoint"] = str(checkpoint)
    add_ratios(summaries)
    print_table(summaries, bandwidths)
    report = {
        "model": args.model,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "configs": {name: dataclasses.asdict(configs[name]) for name in args.configs},
        "bandwidth_bytes_per_s_by_threads": bandwidths,
        "summary": summaries,
        "raw": raw,
    }
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    if any("error" not in s for s in summaries.values()):
        plot(summaries, f"{args.model}: prompt {args.prompt_len}, output {args.output_len}", path.with_suffix(".png"))
    print(f"\nwrote {path.with_suffix('.json')} (and the .png chart, if any configuration ran)")
    return report


if __name__ == "__main__":
    main()
