"""Smoke test of benchmarks/throughput.py on the tiny Mamba2 fixture, at minimal sizes."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.vllm
def test_throughput_fp32_vs_w8a8_on_tiny_fixture(tmp_path):
    benchmark = _load_benchmark()
    out_dir = tmp_path / "results"
    report = benchmark.main([
        "--model", "tiny-mamba2", "--configs", "w8a8", "--batch-sizes", "1,2", "--prompt-len", "8",
        "--output-len", "16", "--repeats", "3", "--enforce-eager", "--calib-samples", "2",
        "--calib-seqlen", "32", "--bandwidth-gib", "0.0625", "--work-dir", str(tmp_path / "work"),
        "--out-dir", str(out_dir),
    ])  # fmt: skip

    summary = report["summary"]
    assert list(summary) == ["fp32", "w8a8"], "fp32 is always added as the baseline"
    for name, figures in summary.items():
        assert "error" not in figures, f"{name}: {figures.get('error')}"
        for batch in figures["batches"]:
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "fraction_of_bound"):
                assert math.isfinite(batch[key]) and batch[key] > 0, f"{name} batch {batch['batch_size']} {key}"
    # Both configurations have the same state shapes; quamba keeps them in int8, the fp32 engine
    # in float32: exactly a quarter of the bytes (exact integer arithmetic, no tolerance).
    assert report["raw"]["w8a8"]["engine"]["state_dtypes"] == ["int8", "int8"]
    assert summary["w8a8"]["x_fp32"]["state_bytes_per_sequence"] == 0.25
    # int8 mixer linears against fp32: the checkpoint must be smaller (the fp32 embedding and
    # lm_head keep the ratio well above a quarter on this tiny model).
    assert summary["w8a8"]["x_fp32"]["weight_bytes"] < 1
    # The fp32 fixture loads at float32: its weight bytes are exactly its tensors' bytes.
    stored = load_file(benchmark.FIXTURES["tiny-mamba2"] / "model.safetensors")
    assert summary["fp32"]["weight_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    written = sorted(p.suffix for p in out_dir.iterdir())
    assert written == [".json", ".png"]
    saved = json.loads(next(out_dir.glob("*.json")).read_text())
    assert saved["summary"]["w8a8"]["batches"] == summary["w8a8"]["batches"]
