"""Held-out perplexity of the W8A8 tiny Mamba2 and Mamba1 against their fp models, in plain torch.

The issue's bar: W8A8 within 2% (relative) of the fp perplexity. The simulated reference has
the runtime's numerics (tests/test_end_to_end.py checks that), so this is the quality of the
recipe itself. Computed over the whole held-out split in windows of 256 tokens.
"""

import math
import shutil

import torch
from transformers import AutoTokenizer

from vllm_quamba.converters.quantize import quantize
from vllm_quamba.converters.simulate import (
    MambaReference,
    Mamba2Reference,
    QuantizedMambaReference,
    QuantizedMamba2Reference,
)
from vllm_quamba.converters.source import load_source

from ..conftest import ASSETS

WINDOW = 256


def perplexity(model, windows) -> float:
    nll = count = 0
    for ids in windows:
        logits = model.logits(ids)
        nll += torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def heldout_windows(tokenizer_dir) -> list[torch.Tensor]:
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)((ASSETS / "heldout.txt").read_text())["input_ids"]
    return [torch.tensor(ids[i:i + WINDOW]) for i in range(0, len(ids) - WINDOW + 1, WINDOW)]


def _check_within_two_percent(name, fp_reference, quantized_dir):
    source = load_source(ASSETS / name)
    windows = heldout_windows(quantized_dir)
    fp = perplexity(fp_reference(source.config, source.tensors), windows)
    quantized_class = QuantizedMamba2Reference if source.kind == "mamba2" else QuantizedMambaReference
    w8a8 = perplexity(quantized_class.from_checkpoint(quantized_dir), windows)
    print(f"{name} held-out perplexity: fp {fp:.3f}, w8a8 {w8a8:.3f} ({100 * (w8a8 / fp - 1):+.2f}%)")
    assert fp < 200, "the fixture is not a trained language model"
    assert abs(w8a8 / fp - 1) <= 0.02


def test_w8a8_perplexity_within_two_percent(quantized_tiny):
    _check_within_two_percent("tiny-mamba2", Mamba2Reference, quantized_tiny)


def test_mamba1_w8a8_perplexity_within_two_percent(quantized_tiny_mamba1):
    _check_within_two_percent("tiny-mamba1", MambaReference, quantized_tiny_mamba1)


OUTLIER_CHANNELS = [3, 50, 101, 200]
OUTLIER_FACTOR = 50.0


def _with_outlier_channels(tmp_path):
    """tiny-mamba1 with in_proj's x rows OUTLIER_CHANNELS scaled by 50, the matching conv1d
    weight rows divided by 50 (every layer). The conv is depthwise and linear before its bias,
    so conv(50 x)/50 = conv(x): the fp model is exactly invariant (up to fp32 rounding), while
    in_proj's x output gets 4 outlier channels 50x larger than the rest."""
    from safetensors.torch import load_file, save_file

    src = ASSETS / "tiny-mamba1"
    dst = tmp_path / "tiny-mamba1-outliers"
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    layers = {name.split(".")[2] for name in tensors if name.startswith("backbone.layers.")}
    for layer in layers:
        mixer = f"backbone.layers.{layer}.mixer."
        in_proj, conv = tensors[mixer + "in_proj.weight"].clone(), tensors[mixer + "conv1d.weight"].clone()
        in_proj[OUTLIER_CHANNELS] *= OUTLIER_FACTOR
        conv[OUTLIER_CHANNELS] /= OUTLIER_FACTOR
        tensors[mixer + "in_proj.weight"], tensors[mixer + "conv1d.weight"] = in_proj, conv
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_naive_w8a8_is_worse_than_quamba_on_outlier_channels(tmp_path):
    """The naive baseline (no Hadamard, absmax everywhere) loses more perplexity than Quamba.

    Model: tiny-mamba1 with 4 outlier channels in in_proj's x output (see _with_outlier_channels;
    the fp logits are unchanged, checked to 1e-4). Measured (32 calibration samples
    of 256): fp 54.25; Quamba +8.3%, naive +9.2% (on the unmodified fixture: +0.33% and +1.16%).
    Honest reading: the x outliers hurt both recipes about equally, because both quantize
    in_proj's x output with one absmax scale (Quamba's percentile covers only the SSM input u
    and the state, its Hadamards only the residual stream and out_proj's input). The gap between
    the two is the one the Quamba tools give on the fixture itself (residual rotation,
    out_proj-input Hadamard and percentile clipping), which survives the outliers. An exactly
    invariant rescaling cannot move outliers to the points Quamba treats in Mamba1: u and y come
    out of nonlinearities (SiLU, the z gate), and the residual stream sits behind RMSNorm, where
    only orthogonal maps are invariant (measured: mapping its top principal direction onto one
    channel, a 3x outlier, changes neither recipe by more than 0.1 points).
    """
    model_dir = _with_outlier_channels(tmp_path)
    windows = heldout_windows(model_dir)
    source = load_source(model_dir)
    fp = perplexity(MambaReference(source.config, source.tensors), windows)
    original = load_source(ASSETS / "tiny-mamba1")
    torch.testing.assert_close(  # fp32 rounding of the x50 and /50 only: ~1e-5 on logits of ~10
        MambaReference(source.config, source.tensors).logits(windows[0]),
        MambaReference(original.config, original.tensors).logits(windows[0]), atol=1e-4, rtol=0,
    )
    calib = dict(calib_samples=32, calib_seqlen=256)
    quamba = quantize(model_dir, tmp_path / "quamba", **calib)
    naive = quantize(model_dir, tmp_path / "naive", hadamard=False, percentile_alpha=None, **calib)
    increase = {
        name: perplexity(QuantizedMambaReference.from_checkpoint(ckpt), windows) / fp - 1
        for name, ckpt in (("quamba", quamba), ("naive", naive))
    }
    print(f"outlier model: fp {fp:.3f}, quamba {100 * increase['quamba']:+.2f}%, naive {100 * increase['naive']:+.2f}%")
    assert increase["naive"] > increase["quamba"]


def test_mamba2_naive_w8a8_is_worse_than_quamba2(quantized_tiny, tmp_path):
    """The naive W8A8 baseline (no Hadamard, no sort-and-cluster, per-tensor absmax) loses more
    held-out perplexity than Quamba2 W8A8, both calibrated alike (32 x 256 tokens, embedded set).

    Measured on the trained tiny Mamba2: fp 37.617, Quamba2 37.659 (+0.11%), naive 37.736
    (+0.32%). Both are deterministic for these inputs, so the 0.2-point gap is not noise; it is
    small because this 128-wide model has few activation outliers. The bar is the ordering, and
    the naive baseline stays within the issue's 2%, since nothing in it is broken.
    """
    source = load_source(ASSETS / "tiny-mamba2")
    naive = quantize(ASSETS / "tiny-mamba2", tmp_path / "naive", hadamard=False, percentile_alpha=None,
                     calib_samples=32, calib_seqlen=256)  # fmt: skip
    windows = heldout_windows(naive)
    fp = perplexity(Mamba2Reference(source.config, source.tensors), windows)
    increase = {
        name: perplexity(QuantizedMamba2Reference.from_checkpoint(ckpt), windows) / fp - 1
        for name, ckpt in (("quamba2", quantized_tiny), ("naive", naive))
    }
    print(f"tiny-mamba2: fp {fp:.3f}, quamba2 {100 * increase['quamba2']:+.2f}%, naive {100 * increase['naive']:+.2f}%")
    assert increase["quamba2"] < increase["naive"] <= 0.02
