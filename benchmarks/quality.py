"""Quality of every quamba recipe beside the fp model and the naive baselines, with lm-eval on vLLM.

    # the two bundled fixtures, the local tasks (CPU, from the repository root)
    .venv/bin/python benchmarks/quality.py --model tiny-mamba2,tiny-mamba1

    # a real model and the real LAMBADA (online, GPU)
    python benchmarks/quality.py --model state-spaces/mamba2-130m --tasks lambada_openai \\
        --device cuda --dtype float16 --max-model-len 2048

Each configuration (``--configs``) is one checkpoint: ``fp`` is the model as given; the others
are made by ``vllm_quamba.converters.quantize.quantize`` (cached under ``--work-dir``) with the
converter's default calibration. Each checkpoint is evaluated by lm-eval's ``vllm`` model type
(``lm_eval --model vllm``; the quamba plugin loads itself into vLLM) in a fresh process, one
engine per configuration. A configuration the converter does not implement for a model's
architecture is listed as ``n/a`` with the reason, never replaced by another one.

Tasks: ``lambada_local`` (LAMBADA-style last-word accuracy and perplexity) and ``heldout_ppl``
(rolling-loglikelihood word perplexity and bits per byte), both built from the fixtures'
held-out text by ``benchmarks/tasks/make_data.py`` and defined in ``benchmarks/tasks/*.yaml``;
or any lm-eval task by name (``lambada_openai``, ``wikitext``), which lm-eval downloads.

Output: a table on stdout, and ``--out-dir`` ``quality-<models>-<time>.json`` (settings, every
metric lm-eval reported) and ``.png`` (one bar chart per headline metric).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
FIXTURES = {"tiny-mamba2": REPO / "tests/assets/tiny-mamba2", "tiny-mamba1": REPO / "tests/assets/tiny-mamba1"}
DEFAULT_TASKS = ("lambada_local", "heldout_ppl")
RESULT_MARKER = "@@quality-result@@"
CPU_ENGINE_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
# Metrics shown in the table and the chart, in this order; the JSON keeps all of them.
HEADLINE_METRICS = ("acc", "perplexity", "word_perplexity", "bits_per_byte")
CELL = 15  # table column width
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """One row of the table: how its checkpoint is made from the source model."""

    name: str
    description: str
    recipe: str | None  # None: the source model itself
    quantize_options: dict = dataclasses.field(default_factory=dict)


CONFIGS = {
    config.name: config
    for config in (
        QualityConfig("fp", "source model, unquantized", None),
        QualityConfig("w8a8", "Quamba W8A8", "w8a8"),
        QualityConfig("w4a8", "Quamba2 W4A8 (GPTQ)", "w4a8"),
        QualityConfig("w4a16", "Quamba2 W4A16 (GPTQ)", "w4a16"),
        QualityConfig("w4ax", "Quamba2 W4AX: the most sensitive half of the layers W4A16, the rest W4A8", "w4ax",
                      {"auto_precision": 0.5}),
        QualityConfig(
            "w8a8-naive", "naive W8A8: per-tensor min-max, no Hadamard, no clustering", "w8a8",
            {"hadamard": False, "percentile_alpha": None},
        ),
        QualityConfig("w4a16-rtn", "naive 4-bit: RTN weights, no GPTQ", "w4a16", {"gptq": False}),
        QualityConfig("w4a8-rtn", "naive W4A8: RTN weights, no GPTQ", "w4a8", {"gptq": False}),
    )
}


def resolve_model(model: str) -> str:
    """A fixture name, a local directory, or a Hugging Face model id (left as is)."""
    return str(FIXTURES.get(model, model))


def not_implemented(model: str, config: QualityConfig) -> str | None:
    """The converter's own reason why it cannot make ``config`` for ``model``, or None."""
    if config.recipe is None:
        return None
    from vllm_quamba.converters.quantize import QuantizeError, check_request

    options = {k: v for k, v in config.quantize_options.items() if k in ("hadamard", "percentile_alpha")}
    try:
        check_request(model, config.recipe, Path(os.devnull), overwrite=True, **options)
    except QuantizeError as error:
        return str(error)
    return None


def checkpoint_for(model: str, config: QualityConfig, args) -> str:
    """The directory (or hub id) lm-eval loads for ``config``: quantized once, then reused."""
    if config.recipe is None:
        return model
    from vllm_quamba.converters.quantize import quantize

    calibration = f"calib{args.calib_samples}x{args.calib_seqlen}"
    name = Path(model).name if Path(model).is_dir() else model.replace("/", "--")
    out_dir = Path(args.work_dir) / "quantized" / f"{name}-{config.name}-{calibration}"
    if not out_dir.is_dir():  # the converter renames a finished checkpoint into place
        quantize(model, out_dir, recipe=config.recipe, calib_samples=args.calib_samples,
                 calib_seqlen=args.calib_seqlen, overwrite=True, **config.quantize_options)  # fmt: skip
    return str(out_dir)


def model_args(checkpoint: str, args) -> dict:
    engine = {"pretrained": checkpoint, "dtype": args.dtype, "max_model_len": args.max_model_len,
              "max_num_seqs": args.max_num_seqs, "seed": 0}  # fmt: skip
    if args.device == "cpu":
        engine["enforce_eager"] = True  # starts the engine in ~20 s instead of ~60 s
    return engine


def evaluate_in_subprocess(checkpoint: str, tasks: list[str], args, log_samples: bool = False) -> dict:
    """lm-eval on one engine in a fresh process: {"results": {task: {metric: value}}, "samples": ...}.

    ``samples`` (with ``log_samples``) holds, per task, each evaluated document's text and
    loglikelihood (the sum over its target tokens, or over the whole document for rolling tasks).
    """
    request = {"model_args": model_args(checkpoint, args), "tasks": tasks, "limit": args.limit,
               "batch_size": args.batch_size, "log_samples": log_samples}  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env.update(CPU_ENGINE_ENV)
    done = subprocess.run(
        [sys.executable, __file__, "--worker"], input=json.dumps(request), capture_output=True, text=True,
        env=env, cwd=REPO, timeout=args.timeout,
    )
    if RESULT_MARKER not in done.stdout:
        raise RuntimeError(f"lm-eval on {checkpoint} failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    # vLLM and lm-eval log to stdout too: the result is the line behind the marker.
    return json.loads(done.stdout.split(RESULT_MARKER, 1)[1].splitlines()[0])


def _worker() -> None:
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    request = json.loads(sys.stdin.read())
    # Built here rather than by simple_evaluate, to shut its engine down at the end: engine
    # processes left behind keep this process's stdout open and the parent waiting.
    lm = get_model("vllm").create_from_arg_obj(request["model_args"], {"batch_size": request["batch_size"]})
    output = lm_eval.simple_evaluate(
        model=lm, tasks=request["tasks"], limit=request["limit"], log_samples=request["log_samples"],
        bootstrap_iters=1000, task_manager=TaskManager(include_path=str(TASKS_DIR)),
    )
    result = {"results": {task: _metrics(values) for task, values in output["results"].items()}}
    if request["log_samples"]:
        result["samples"] = {task: [_sample(s) for s in samples] for task, samples in output["samples"].items()}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    lm.model.llm_engine.engine_core.shutdown()
    # vLLM-CPU 0.32 can abort in interpreter teardown after a clean shutdown; the result is out.
    os._exit(0)


def _metrics(values: dict) -> dict:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` as ``{"acc": 0.5, ...}``."""
    metrics = {}
    for key, value in values.items():
        metric, _, _filter = key.partition(",")
        if _filter and isinstance(value, (int, float)):
            metrics[metric] = float(value)
    return metrics


def _sample(sample: dict) -> dict:
    (response,) = sample["filtered_resps"]
    loglikelihood = response[0] if isinstance(response, (list, tuple)) else response
    return {"doc_id": sample["doc_id"], "text": sample["doc"]["text"], "loglikelihood": float(loglikelihood)}


def run(args) -> dict:
    rows = []
    for model_name in args.model.split(","):
        model = resolve_model(model_name)
        for config_name in args.configs.split(","):
            config = CONFIGS[config_name]
            row = {"model": model_name, "config": config.name, "description": config.description}
            if reason := not_implemented(model, config):
                row["n/a"] = reason
            else:
                started = time.perf_counter()
                try:
                    checkpoint = checkpoint_for(model, config, args)
                    row["results"] = evaluate_in_subprocess(checkpoint, args.tasks.split(","), args)["results"]
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:  # report it, run the others
                    row["error"] = str(error)
                row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(format_row(row), flush=True)
    return {"settings": vars(args), "rows": rows}


def table_columns(rows: list[dict]) -> list[tuple[str, str]]:
    columns = []
    for row in rows:
        for task, metrics in row.get("results", {}).items():
            for metric in HEADLINE_METRICS:
                if metric in metrics and (task, metric) not in columns:
                    columns.append((task, metric))
    return columns


def format_row(row: dict, columns: list[tuple[str, str]] | None = None) -> str:
    if "results" not in row:
        status = f"n/a ({row['n/a']})" if "n/a" in row else f"FAILED: {row['error'].splitlines()[0]}"
        return f"{row['model']:<14} {row['config']:<11} {status}"
    columns = columns or table_columns([row])
    cells = [f"{row['results'][task].get(metric, math.nan):>{CELL}.4f}" for task, metric in columns]
    return f"{row['model']:<14} {row['config']:<11} " + " ".join(cells)


def format_table(report: dict) -> str:
    columns = table_columns(report["rows"])
    header = f"{'model':<14} {'config':<11} " + " ".join(f"{t[:CELL]:>{CELL}}" for t, _ in columns)
    subheader = " " * 27 + " ".join(f"{m[:CELL]:>{CELL}}" for _, m in columns)
    return "\n".join([header, subheader] + [format_row(row, columns) for row in report["rows"]])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = table_columns(report["rows"])
    models = list(dict.fromkeys(row["model"] for row in report["rows"]))
    configs = list(dict.fromkeys(row["config"] for row in report["rows"]))
    figure, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 4), squeeze=False)
    width = 0.8 / len(models)
    for axis, (task, metric) in zip(axes[0], columns):
        for m, model in enumerate(models):
            rows = {row["config"]: row for row in report["rows"] if row["model"] == model}
            for c, config in enumerate(configs):
                row, x = rows.get(config), c + (m - (len(models) - 1) / 2) * width
                if row is None or "results" not in row:
                    label = "n/a" if row is None or "n/a" in row else "failed"
                    axis.text(x, 0, label, rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                axis.bar(x, row["results"][task][metric], width, color=f"C{m}", label=model if c == 0 else None)
        arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        axis.set_title(f"{task}: {metric}\n({arrow})", fontsize=9)
        axis.set_xticks(range(len(configs)), configs, rotation=45, ha="right", fontsize=8)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-mamba2,tiny-mamba1",
                        help=f"comma separated: {', '.join(FIXTURES)}, checkpoint directories or hub ids")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="float32", help="engine dtype (quamba checkpoints are float32)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per engine run")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache/vllm-quamba/quality"))
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks/results"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = "+".join(Path(m).name for m in args.model.split(","))
    stem = out_dir / f"quality-{models}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    return report


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:
        main()
