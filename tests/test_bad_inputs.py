"""Bad inputs caught and named: the rows of docs/bad_inputs.md that no other test file checks.

Each test gives one bad input and matches the key words of the error: what is wrong, and what to
do. None starts a vLLM engine: the engine pre-flight (``check_checkpoint_headers``) is called
directly, as vLLM's config step calls it in the caller's process.
"""

import errno
import json
import shutil

import pytest
import torch

from tests.tiny_models import make_byte_tokenizer, rewrite_checkpoint
from vllm_quamba.converters import quantize as quantize_module
from vllm_quamba.converters.calibration import CalibrationDataError
from vllm_quamba.converters.quantize import QuantizeError, quantize
from vllm_quamba.converters.source import SourceModelError
from vllm_quamba.format import WEIGHTS_FILE

FAST = dict(calib_samples=4, calib_seqlen=64)
IN_PROJ = "backbone.layers.0.mixer.in_proj.weight"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _only_inputs_left(tmp_path, *names):
    """Nothing was written beside the inputs: no output directory, no ``.partial`` temp dir."""
    return sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


# ----- source checkpoints given to the converter ---------------------------------------------------
def test_truncated_source_weights_fail_before_work(random_tiny_mamba2, tmp_path):
    broken = tmp_path / "src"
    shutil.copytree(random_tiny_mamba2, broken)
    _truncate(broken / WEIGHTS_FILE)
    with pytest.raises(SourceModelError, match="model.safetensors: unreadable safetensors file"):
        quantize(broken, tmp_path / "out", **FAST)
    assert _only_inputs_left(tmp_path, "src")


def _set_one(name, value):
    def edit(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value

    return edit


def _resize(name):
    return lambda t: t.update({name: t[name][:-1].contiguous()})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("backbone.layers.1.mixer.dt_bias"), r"missing tensor\(s\) \['backbone.layers.1.mixer.dt_bias'\]"),
        (lambda t: t.update({"backbone.layers.0.mixer.mystery": torch.zeros(3)}),
         r"unexpected tensor\(s\) \['backbone.layers.0.mixer.mystery'\]"),
        (_resize("backbone.layers.1.mixer.D"), r"backbone.layers.1.mixer.D has shape \(7,\), config says \(8,\)"),
        (_set_one(IN_PROJ, float("nan")), rf"\['{IN_PROJ}'\] contain NaN or Inf"),
        (_set_one("backbone.norm_f.weight", float("inf")), r"\['backbone.norm_f.weight'\] contain NaN or Inf"),
    ],
    ids=["missing-tensor", "extra-tensor", "wrong-shape", "nan-weight", "inf-weight"],
)
def test_source_weights_that_do_not_match_the_config_fail_before_work(random_tiny_mamba2, tmp_path, edit, message):
    bad = rewrite_checkpoint(random_tiny_mamba2, tmp_path / "src", edit_tensors=edit)
    with pytest.raises(SourceModelError, match=message) as caught:
        quantize(bad, tmp_path / "out", **FAST)
    assert "re-download" in str(caught.value)
    assert _only_inputs_left(tmp_path, "src")


def _tiny_mamba2_with_hidden_size(out_dir, hidden_size: int):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    tok = make_byte_tokenizer(out_dir)
    head_dim = 16
    cfg = Mamba2Config(
        vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=1, state_size=16, head_dim=head_dim,
        num_heads=2 * hidden_size // head_dim, n_groups=1, expand=2, conv_kernel=4, tie_word_embeddings=False,
    )
    Mamba2ForCausalLM(cfg).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def test_hidden_size_the_hadamard_transform_does_not_support_fails_before_calibration(tmp_path):
    from vllm_quamba.kernels.hadamard import is_supported_hadamard_size

    hidden_size = 72  # 9 * 8: no Hadamard matrix of order 9 * 2^k is built in
    assert not is_supported_hadamard_size(hidden_size)
    src = _tiny_mamba2_with_hidden_size(tmp_path / "src", hidden_size)
    with pytest.raises(QuantizeError, match="hidden_size 72 is not a size the Hadamard transform supports"):
        quantize(src, tmp_path / "out", calib=str(tmp_path / "never-read.txt"), **FAST)
    assert _only_inputs_left(tmp_path, "src")


# ----- calibration text ----------------------------------------------------------------------------
def _directory(tmp_path):
    path = tmp_path / "calib-dir"
    path.mkdir()
    return path


def _not_utf8(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_bytes(b"caf\xe9 latin-1 text, not UTF-8\n" * 200)
    return path


@pytest.mark.parametrize("make_calib", [_directory, _not_utf8], ids=["a-directory", "not-utf8"])
def test_unreadable_calibration_file_is_named(random_tiny_mamba2, tmp_path, make_calib):
    calib = make_calib(tmp_path)
    with pytest.raises(CalibrationDataError, match=f"calibration file {calib} is unreadable.*UTF-8 .txt"):
        quantize(random_tiny_mamba2, tmp_path / "out", calib=str(calib), **FAST)
    assert _only_inputs_left(tmp_path, calib.name)


# ----- writing the output --------------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "fail, error, message",
    [(_disk_full, QuantizeError, "No space left on device.*nothing was written"), (_interrupted, KeyboardInterrupt, None)],
    ids=["disk-full", "interrupted"],
)
def test_failed_write_leaves_no_half_checkpoint(random_tiny_mamba2, calib_file, tmp_path, monkeypatch, fail, error, message):
    monkeypatch.setattr(quantize_module, "save_file", fail)
    with pytest.raises(error, match=message):
        quantize(random_tiny_mamba2, tmp_path / "out", calib=str(calib_file), **FAST)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(quamba_ckpt, random_tiny_mamba2, calib_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(quamba_ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(quantize_module, "save_file", _disk_full)
    with pytest.raises(QuantizeError, match="No space left on device.*nothing was written"):
        quantize(random_tiny_mamba2, out, calib=str(calib_file), overwrite=True, **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _only_inputs_left(tmp_path, "out")


# ----- quamba checkpoints given to the engine pre-flight -------------------------------------------
def test_truncated_quamba_checkpoint_is_named_by_the_preflight(quamba_ckpt, tmp_path):
    from vllm_quamba.config import check_checkpoint_headers

    bad = rewrite_checkpoint(quamba_ckpt, tmp_path / "bad")
    _truncate(bad / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="model.safetensors.*(unreadable|truncated|corrupt)"):
        check_checkpoint_headers(str(bad), json.loads((bad / "config.json").read_text()))
