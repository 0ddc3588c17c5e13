"""Smoke test of benchmarks/throughput.py on the tiny Mamba2 fixture, at minimal sizes."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.vllm
def test_throughput_fp32_vs_head_to_toe_w8a8_on_tiny_fixture(tmp_path):
    benchmark = _load_benchmark()
    out_dir = tmp_path / "results"
    report = benchmark.main([
        "--model", "tiny-mamba2", "--configs", "w8a8-h2t", "--batch-sizes", "1,2", "--prompt-len", "8",
        "--output-len", "16", "--repeats", "3", "--enforce-eager", "--calib-samples", "2",
        "--calib-seqlen", "32", "--bandwidth-gib", "0.0625", "--work-dir", str(tmp_path / "work"),
        "--out-dir", str(out_dir),
    ])  # fmt: skip

    summary = report["summary"]
    assert list(summary) == ["fp32", "w8a8-h2t"], "fp32 is always added as the baseline"
    for name, figures in summary.items():
        assert "error" not in figures, f"{name}: {figures.get('error')}"
        for batch in figures["batches"]:
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "fraction_of_bound"):
                assert math.isfinite(batch[key]) and batch[key] > 0, f"{name} batch {batch['batch_size']} {key}"
    quantized = summary["w8a8-h2t"]
    # Both configurations have the same state shapes; quamba keeps them in int8, the fp32 engine
    # in float32: exactly a quarter of the bytes (exact integer arithmetic, no tolerance).
    assert report["raw"]["w8a8-h2t"]["engine"]["state_dtypes"] == ["int8", "int8"]
    assert quantized["x_fp32"]["state_bytes_per_sequence"] == 0.25

    # Disk bytes. The fp32 fixture loads at float32: exactly its tensors' bytes.
    fp32_tensors = load_file(benchmark.FIXTURES["tiny-mamba2"] / "model.safetensors")
    assert summary["fp32"]["disk_weight_bytes"] == _bytes(fp32_tensors.values())
    # Head to toe, every linear, the embedding and the lm_head are int8: a quarter of their fp32
    # bytes, plus per-row scales and the fp32 norms, conv biases and SSM scales, which weigh
    # more on this 128-wide model (0.36 of fp32 measured). Half catches an fp32 embedding or
    # lm_head left in (either would bring the ratio to about 0.64).
    assert quantized["x_fp32"]["disk_weight_bytes"] < 0.5
    # The bandwidth model reads every tensor per step except the quantized embedding's, which a
    # step gathers rows of: its packed table and row scales are left out, the int8 lm_head is in.
    h2t_tensors = load_file(Path(quantized["checkpoint"]) / "model.safetensors")
    embedding = {name: t for name, t in h2t_tensors.items() if name.startswith("backbone.embeddings.")}
    assert {"backbone.embeddings.weight_packed", "backbone.embeddings.weight_scale"} <= set(embedding)
    assert quantized["weight_bytes_read_per_step"] == _bytes(h2t_tensors.values()) - _bytes(embedding.values())
    assert h2t_tensors["lm_head.weight"].dtype == torch.int8

    # Resident bytes, measured in the engine's model worker. fp32: every checkpoint tensor is
    # loaded at its size (oneDNN-packed linears counted by their handles' shapes), so at least
    # the disk bytes. Head to toe W8A8 keeps int8 weights (and fp32 SSM parameters and kernel
    # arrays, small beside them): below fp32's resident bytes, and at least its own int8 lm_head.
    fp32_resident = summary["fp32"]["resident_weight_bytes"]
    assert fp32_resident >= summary["fp32"]["disk_weight_bytes"]
    assert h2t_tensors["lm_head.weight"].numel() <= quantized["resident_weight_bytes"] < fp32_resident

    written = sorted(p.suffix for p in out_dir.iterdir())
    assert written == [".json", ".png"]
    saved = json.loads(next(out_dir.glob("*.json")).read_text())
    assert saved["summary"]["w8a8-h2t"]["batches"] == quantized["batches"]
    assert saved["summary"]["w8a8-h2t"]["resident_weight_bytes"] == quantized["resident_weight_bytes"]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_head_to_toe_configs_refused_for_mamba1(tmp_path):
    benchmark = _load_benchmark()
    with pytest.raises(SystemExit, match="Mamba2 models only"):
        benchmark.main(["--model", "tiny-mamba1", "--configs", "w8a8,w8a8-h2t", "--work-dir", str(tmp_path)])
