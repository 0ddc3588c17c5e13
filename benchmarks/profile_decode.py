"""Where a decode step of the real vLLM engine spends its time, per configuration (cProfile).

    python benchmarks/profile_decode.py --model mamba2-130m \\
        --configs fp32,w8a8-h2t,w4a16-h2t,w4a8-h2t --batch-sizes 1,16

Models, configurations and checkpoints are ``benchmarks/throughput.py``'s (``fp32`` is always
run: the baseline). Each configuration runs in its own engine in its own process
(``benchmarks/_profile_worker.py``, which defines the measurement): eager mode, engine core
and model in the worker's process, B random prompts of ``--prompt-len`` tokens,
``--steps`` new tokens. Per configuration and batch size, in ms per decode step:

* linears: vLLM's ``linear.py`` ``forward`` (in_proj, out_proj), with whatever kernel runs
  under them (oneDNN for stock, the package's for quamba);
* lm_head + logits: the model's ``compute_logits``;
* ssm: the ``mamba_mixer2`` custom op (conv + scan; quamba's int8 SSM: the fused kernel with
  the gated norm and online Hadamard), plus what runs after the op in the other mixers: the
  gated norm (``Mixer2RMSNormGated``) and, for an fp SSM (w4a16), the online Hadamard;
* residual norms: the RMSNorm ``forward_native`` of vLLM's ``layernorm.py``;
* other model forward: the model runner's ``_model_forward`` less the three above (embedding,
  residual adds, module call overhead, mixer glue);
* vLLM outside the model: the engine step less ``_model_forward`` and ``compute_logits``
  (scheduler, input preparation, sampling, output processing).

They add up to the profiled step. cProfile slows Python down far more than the kernels, so the
Python-heavy categories are inflated: the unprofiled step (timed without the profiler) is the
real step time. Results: a markdown table on stdout, and in ``--out-dir``
``profile-decode-<model>-<time>.json`` (everything, with the top functions by own time) and
``.md`` (tables, machine, command line). Raw profiles stay in ``<work-dir>/profiles/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (models, configurations and the checkpoint cache live there)

WORKER = Path(__file__).resolve().parent / "_profile_worker.py"
CATEGORIES = ("linears", "lm_head + logits", "ssm", "residual norms", "other model forward", "vLLM outside the model")
MAMBA2_ARCHITECTURE = "Mamba2ForCausalLM"
SUM_TOLERANCE = 1e-6  # relative: the categories add up to the profiled step by construction
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx")
INFLATION_NOTE = (
    "cProfile slows Python code far more than the kernels it calls, so the Python-heavy categories "
    "(vLLM outside the model, other model forward) are inflated: the unprofiled step, timed without "
    "the profiler, is the real step time."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mamba2-130m", help="as throughput.py's --model")
    parser.add_argument("--configs", type=throughput._csv(str), default=["fp32", "w8a8-h2t", "w4a16-h2t", "w4a8-h2t"],
                        help="comma separated, from: " + ",".join(throughput.engine_configs()))  # fmt: skip
    parser.add_argument("--batch-sizes", type=throughput._csv(int), default=[1, 16])
    parser.add_argument("--steps", type=int, default=32, help="new tokens per request: steps - 1 decode steps profiled")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--out-dir", type=Path, default=throughput.REPO / "benchmarks/results")
    throughput.add_checkpoint_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first token comes from the prefill)")
    throughput.check_configs(parser, args)
    return args


def check_mamba2(source: Path) -> None:
    """The categories follow the functions of vLLM's Mamba2 model: refuse any other model."""
    architectures = json.loads((source / "config.json").read_text()).get("architectures", [])
    if MAMBA2_ARCHITECTURE not in architectures:
        raise SystemExit(f"--model {source}: {architectures}, but the profile knows {MAMBA2_ARCHITECTURE} only")


def run_worker(checkpoint: Path, config: throughput.EngineConfig, run_name: str, args) -> dict:
    """One configuration's engine in its own process; its JSON, or an error naming its log."""
    logs, profiles = args.work_dir / "logs", args.work_dir / "profiles" / run_name
    logs.mkdir(parents=True, exist_ok=True)
    profiles.mkdir(parents=True, exist_ok=True)
    settings = profiles / "settings.json"
    settings.write_text(json.dumps({
        "model": str(checkpoint), "dtype": config.dtype, "mamba_ssm_cache_dtype": config.mamba_ssm_cache_dtype,
        "batch_sizes": args.batch_sizes, "prompt_len": args.prompt_len, "steps": args.steps, "seed": args.seed,
        "profile_dir": str(profiles),
    }, indent=2))  # fmt: skip
    json_out = profiles / "result.json"
    command = [sys.executable, str(WORKER), str(settings)]
    log = logs / f"{run_name}.log"
    with log.open("w") as log_file:
        env = {**os.environ, **throughput.ENGINE_ENV}
        returncode = subprocess.call(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if returncode != 0 or not json_out.is_file():
        return {"error": f"engine exited with {returncode}; log: {log}"}
    result = json.loads(json_out.read_text())
    for run in result["runs"]:
        check_categories(run)
    return result


def check_categories(run: dict) -> None:
    """The categories are finite, non-negative and add up to the profiled step."""
    values = run["categories_ms"]
    if list(values) != list(CATEGORIES) or not all(math.isfinite(v) and v >= 0 for v in values.values()):
        raise RuntimeError(f"batch {run['batch_size']}: bad categories {values}")
    total, step = sum(values.values()), run["profiled_step_ms"]
    if abs(total - step) > SUM_TOLERANCE * step:
        raise RuntimeError(f"batch {run['batch_size']}: categories sum to {total} ms, the profiled step is {step} ms")


def machine() -> dict:
    """The CPU model and which of the SIMD / matrix extensions that the kernels use it has."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lscpu if ":" in line)
    flags = set(fields.get("Flags", "").split())
    # "amx" stands for any of its parts (amx_tile, amx_int8, amx_bf16).
    amx = any(flag.startswith("amx_") for flag in flags)
    return {
        "model_name": fields.get("Model name", "unknown").strip(),
        "cpus": os.cpu_count(),
        "flags": {flag: flag in flags or (flag == "amx" and amx) for flag in CPU_FLAGS},
        "load_average_at_end": os.getloadavg(),
    }


def _columns(results: dict[str, dict]) -> list[tuple[str, dict]]:
    ran = {name: result for name, result in results.items() if "error" not in result}
    return [(f"{name} b{run['batch_size']}", run) for name, result in ran.items() for run in result["runs"]]


def markdown_table(results: dict[str, dict]) -> str:
    """Rows: the categories, the profiled and the unprofiled step; columns: config x batch (ms)."""
    columns = _columns(results)
    rows = [(name, [run["categories_ms"][name] for _, run in columns]) for name in CATEGORIES]
    rows.append(("profiled step", [run["profiled_step_ms"] for _, run in columns]))
    rows.append(("unprofiled step", [run["unprofiled_step_ms"] for _, run in columns]))
    lines = [
        "| ms per decode step | " + " | ".join(label for label, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += [f"| {name} | " + " | ".join(f"{value:.2f}" for value in values) + " |" for name, values in rows]
    failed = [f"{name}: {result['error']}" for name, result in results.items() if "error" in result]
    return "\n".join(lines + [f"\nfailed: {line}" for line in failed])


def top_functions(results: dict[str, dict]) -> str:
    """Per column, the functions with the most own time (profiled ms per step)."""
    sections = []
    for label, run in _columns(results):
        sections.append(f"{label}:\n" + "\n".join(
            f"  {entry['ms']:8.3f} ms  {entry['calls_per_step']:6.1f} calls  {_short(entry['function'])}"
            for entry in run["top_own_time_ms"]
        ))  # fmt: skip
    return "\n".join(sections)


def _short(function: str) -> str:
    """A profiled function's name with its file relative to site-packages or the repository."""
    for root in ("site-packages/", f"{throughput.REPO}/"):
        function = function.split(root, 1)[-1]
    return function


def report_markdown(results: dict[str, dict], host: dict, command: str, args) -> str:
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in host["flags"].items())
    return "\n".join([
        f"# Decode profile: {args.model}, prompt {args.prompt_len}, {args.steps} new tokens, eager",
        "",
        f"Machine: {host['model_name']}, {host['cpus']} CPUs ({flags}); load average at the end "
        f"{', '.join(f'{load:.1f}' for load in host['load_average_at_end'])}.",
        "",
        f"Command: `{command}`",
        "",
        markdown_table(results),
        "",
        INFLATION_NOTE,
        "",
        "Top functions by own time (profiled ms per decode step):",
        "",
        "```",
        top_functions(results),
        "```",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configs = throughput.engine_configs()
    source, key = throughput.source_checkpoint(args.model, args.work_dir, args.seed)
    check_mamba2(source)
    run_name = f"profile-decode-{key}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results: dict[str, dict] = {}
    for name in args.configs:
        config = configs[name]
        print(f"[{name}] profiling", flush=True)
        try:
            checkpoint = throughput.quantized_checkpoint(source, key, config, args) if config.recipe else source
        except ValueError as error:  # a recipe the converter refuses for this model
            results[name] = {"error": f"quantize failed: {error}"}
            continue
        results[name] = run_worker(checkpoint, config, f"{run_name}-{name}", args)
    command = shlex.join(["benchmarks/profile_decode.py", *argv])
    host = machine()
    markdown = report_markdown(results, host, command, args)
    print("\n" + markdown)
    report = {
        "model": args.model,
        "command": command,
        "machine": host,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "configs": {name: dataclasses.asdict(configs[name]) for name in args.configs},
        "note": INFLATION_NOTE,
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{run_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / f"{run_name}.md").write_text(markdown)
    print(f"wrote {args.out_dir / run_name}.json and .md")
    return report


if __name__ == "__main__":
    main()
