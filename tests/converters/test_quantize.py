"""The W8A8 Mamba2 converter: output format, determinism, and bad input caught before work."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from vllm_quamba.converters.calibration import CalibrationDataError
from vllm_quamba.converters.quantize import QuantizeError, quantize
from vllm_quamba.converters.source import SourceModelError
from vllm_quamba.format import (
    Mamba2Shapes,
    check_tensor,
    mamba2_mixer_tensors,
    mixer_prefix,
    quamba_section,
)

FAST = dict(calib_samples=4, calib_seqlen=64)


@pytest.fixture(scope="module")
def quantized(random_tiny_mamba2, calib_file, tmp_path_factory):
    return quantize(random_tiny_mamba2, tmp_path_factory.mktemp("q") / "out", calib=str(calib_file), **FAST)


def test_checkpoint_follows_the_format(quantized):
    config = json.loads((quantized / "config.json").read_text())
    section = quamba_section(config["quantization_config"])
    assert section["recipe"] == "w8a8" and config["tie_word_embeddings"] is False
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    shapes = Mamba2Shapes.from_config(config)
    tensors = load_file(quantized / "model.safetensors")
    for layer in range(shapes.num_layers):
        for name, (shape, dtype) in mamba2_mixer_tensors(shapes).items():
            check_tensor(name, tensors[mixer_prefix(layer) + name], shape, dtype)
    mixer_names = {n for n in tensors if ".mixer." in n}
    assert len(mixer_names) == shapes.num_layers * len(mamba2_mixer_tensors(shapes))
    assert (quantized / "tokenizer.json").is_file()


def test_same_inputs_give_byte_identical_files(quantized, random_tiny_mamba2, calib_file, tmp_path):
    again = quantize(random_tiny_mamba2, tmp_path / "again", calib=str(calib_file), **FAST)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (quantized / name).read_bytes(), name


def test_unknown_recipe_fails_before_work(random_tiny_mamba2, tmp_path):
    with pytest.raises(QuantizeError, match="unknown recipe 'w3a3'"):
        quantize(random_tiny_mamba2, tmp_path / "out", recipe="w3a3")
    assert list(tmp_path.iterdir()) == []


def test_non_mamba_model_fails_before_work(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(SourceModelError, match="unsupported architecture.*LlamaForCausalLM"):
        quantize(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_existing_output_is_refused_unless_overwrite(quantized, random_tiny_mamba2, calib_file):
    before = (quantized / "model.safetensors").read_bytes()
    with pytest.raises(QuantizeError, match="exists; pass --overwrite"):
        quantize(random_tiny_mamba2, quantized, calib=str(calib_file), **FAST)
    assert (quantized / "model.safetensors").read_bytes() == before


def test_calibration_errors_leave_nothing_behind(random_tiny_mamba2, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CalibrationDataError, match="holds no text"):
        quantize(random_tiny_mamba2, tmp_path / "out1", calib=str(empty), **FAST)
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill one sample.")
    with pytest.raises(CalibrationDataError, match="fewer than one sample"):
        quantize(random_tiny_mamba2, tmp_path / "out2", calib=str(short), **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "short.txt"]


def test_mamba_ssm_package_is_never_imported(random_tiny_mamba2, calib_file, tmp_path):
    code = (
        "import sys; from vllm_quamba.converters.quantize import quantize; "
        f"quantize({str(random_tiny_mamba2)!r}, {str(tmp_path / 'o')!r}, calib={str(calib_file)!r}, calib_samples=2, calib_seqlen=32); "
        "assert 'mamba_ssm' not in sys.modules and 'vllm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_cli_help_and_error_exit(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "vllm_quamba.converters.cli", "quantize", "--help"], capture_output=True, text=True
    )
    assert "--recipe" in help_text.stdout and "--calib-seqlen" in help_text.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "vllm_quamba.converters.cli", "quantize", str(tmp_path / "missing"),
         "--recipe", "w8a8", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "vllm-quamba: error:" in bad.stderr
