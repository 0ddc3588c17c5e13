"""Shared fixtures: the trained tiny fixtures, random tiny models, and converter outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_mamba1, make_tiny_mamba2

ASSETS = Path(__file__).parent / "assets"
TINY_MAMBA2 = ASSETS / "tiny-mamba2"
TINY_MAMBA1 = ASSETS / "tiny-mamba1"


@pytest.fixture(scope="session")
def random_tiny_mamba2(tmp_path_factory) -> Path:
    """A random-weight tiny Mamba2 (hidden 64, 2 layers, 8 heads of 16, state 16) + byte tokenizer."""
    return make_tiny_mamba2(tmp_path_factory.mktemp("tiny-mamba2-random") / "model", seed=0)


@pytest.fixture(scope="session")
def random_tiny_mamba1(tmp_path_factory) -> Path:
    """A random-weight tiny Mamba1 (hidden 64, 2 layers, state 16, dt_rank 4) + byte tokenizer."""
    return make_tiny_mamba1(tmp_path_factory.mktemp("tiny-mamba1-random") / "model", seed=0)


@pytest.fixture(scope="session")
def trained_tiny_mamba2() -> Path:
    """The bundled tiny Mamba2 trained on real text (tests/assets/train_tiny.py)."""
    return TINY_MAMBA2


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A small calibration text file (Python's own documentation topics)."""
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:60]))
    return path


@pytest.fixture(scope="session")
def quamba_ckpt(random_tiny_mamba2, calib_file, tmp_path_factory) -> Path:
    """The random tiny Mamba2 quantized W8A8 by the converter (fast: 4 short samples)."""
    from vllm_quamba.converters.quantize import quantize

    out = tmp_path_factory.mktemp("quamba-random") / "w8a8"
    return quantize(random_tiny_mamba2, out, calib=str(calib_file), calib_samples=4, calib_seqlen=64)


@pytest.fixture(scope="session")
def quantized_tiny(tmp_path_factory) -> Path:
    """The bundled trained tiny Mamba2, quantized W8A8 on the embedded calibration set."""
    from vllm_quamba.converters.quantize import quantize

    out = tmp_path_factory.mktemp("q") / "tiny-w8a8"
    return quantize(TINY_MAMBA2, out, calib_samples=32, calib_seqlen=256)


@pytest.fixture(scope="session")
def quantized_tiny_mamba1(tmp_path_factory) -> Path:
    """The bundled trained tiny Mamba1, quantized W8A8 (Quamba) on the embedded calibration set."""
    from vllm_quamba.converters.quantize import quantize

    out = tmp_path_factory.mktemp("q1") / "tiny-mamba1-w8a8"
    return quantize(TINY_MAMBA1, out, calib_samples=32, calib_seqlen=256)


def _quantize_tiny_mamba2(tmp_path_factory, recipe: str, **kwargs) -> Path:
    from vllm_quamba.converters.quantize import quantize

    name = f"tiny-{recipe}" + ("-rtn" if kwargs.get("gptq") is False else "")
    return quantize(TINY_MAMBA2, tmp_path_factory.mktemp("q4") / name, recipe=recipe, **kwargs)


@pytest.fixture(scope="session")
def quantized_tiny_w4a16(tmp_path_factory) -> Path:
    """The trained tiny Mamba2, W4A16 (GPTQ) with the default calibration (64 x 512 tokens)."""
    return _quantize_tiny_mamba2(tmp_path_factory, "w4a16")


@pytest.fixture(scope="session")
def quantized_tiny_w4ax(tmp_path_factory) -> Path:
    """The trained tiny Mamba2, W4AX with half its layers kept at W4A16 by measured sensitivity."""
    return _quantize_tiny_mamba2(tmp_path_factory, "w4ax", auto_precision=0.5)


@pytest.fixture(scope="session")
def quantized_tiny_w4a8(tmp_path_factory) -> Path:
    """The trained tiny Mamba2, W4A8 (GPTQ, int8 SSM) with the default calibration."""
    return _quantize_tiny_mamba2(tmp_path_factory, "w4a8")


def _quantize_tiny_mamba1(tmp_path_factory, recipe: str, **kwargs) -> Path:
    from vllm_quamba.converters.quantize import quantize

    name = f"tiny-mamba1-{recipe}" + ("-rtn" if kwargs.get("gptq") is False else "")
    return quantize(TINY_MAMBA1, tmp_path_factory.mktemp("q14") / name, recipe=recipe, **kwargs)


@pytest.fixture(scope="session")
def quantized_tiny_mamba1_w4a16(tmp_path_factory) -> Path:
    """The trained tiny Mamba1, W4A16 (GPTQ in/out_proj, RTN x_proj, fp SSM), default calibration."""
    return _quantize_tiny_mamba1(tmp_path_factory, "w4a16")


@pytest.fixture(scope="session")
def quantized_tiny_mamba1_w4a8(tmp_path_factory) -> Path:
    """The trained tiny Mamba1, W4A8 (GPTQ in/out_proj, RTN x_proj, W8A8 dt_proj, int8 SSM)."""
    return _quantize_tiny_mamba1(tmp_path_factory, "w4a8")


@pytest.fixture(scope="session")
def quantized_tiny_mamba1_w4ax(tmp_path_factory) -> Path:
    """The trained tiny Mamba1, W4AX with half its layers kept at W4A16 by measured sensitivity."""
    return _quantize_tiny_mamba1(tmp_path_factory, "w4ax", auto_precision=0.5)
