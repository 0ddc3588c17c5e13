"""Smoke test of benchmarks/profile_decode.py on the tiny Mamba2 fixture (fp32 and W8A8 engines)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_decode.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("profile_decode_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.vllm
def test_profile_decode_fp32_and_w8a8_on_tiny_fixture(tmp_path):
    profile = _load_script()
    report = profile.main([
        "--model", "tiny-mamba2", "--configs", "w8a8", "--batch-sizes", "1", "--steps", "8",
        "--calib-samples", "2", "--calib-seqlen", "32", "--work-dir", str(tmp_path), "--out-dir", str(tmp_path),
    ])  # fmt: skip

    assert list(report["results"]) == ["fp32", "w8a8"], "fp32 is always added as the baseline"
    for name, result in report["results"].items():
        assert "error" not in result, f"{name}: {result.get('error')}"
        (run,) = result["runs"]
        categories = run["categories_ms"]
        assert list(categories) == list(profile.CATEGORIES)
        # Every category is a cumulative time, or a parent's less its disjoint children: >= 0.
        assert all(math.isfinite(ms) and ms >= 0 for ms in categories.values()), f"{name}: {categories}"
        # They add up to the profiled step by construction; 1e-6 relative leaves room for the
        # float rounding of six sums and differences, nothing more.
        assert sum(categories.values()) == pytest.approx(run["profiled_step_ms"], rel=1e-6)
        assert run["unprofiled_step_ms"] > 0
        # The function names still match this vLLM: the mixer op and the linears were seen.
        assert categories["ssm"] > 0 and categories["linears"] > 0, f"{name}: {categories}"
        assert run["profiled_engine_steps"] == 7, "the 7 steps after the prefill"

    written = {path.suffix: path for path in tmp_path.glob("profile-decode-tiny-mamba2-*")}
    assert set(written) == {".json", ".md"}
    assert json.loads(written[".json"].read_text())["results"]["w8a8"]["runs"] == report["results"]["w8a8"]["runs"]
    assert "| unprofiled step |" in written[".md"].read_text()
