"""The naive W8A8 baseline for Mamba2 (``hadamard=False, percentile_alpha=None``): no rotation,
no sort-and-cluster, one absmax scale per tensor, written in the W8A8 format; and the switches
the converter refuses for Mamba2."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from vllm_quamba.converters import transforms
from vllm_quamba.converters.calibration import calibration_samples
from vllm_quamba.converters.quantize import QuantizeError, quantize
from vllm_quamba.converters.simulate import Mamba2Reference, QuantizedMamba2Reference
from vllm_quamba.converters.source import load_source
from vllm_quamba.format import Mamba2Shapes, check_tensor, mamba2_mixer_tensors, mixer_prefix, quamba_section
from vllm_quamba.kernels.quant import dequantize_int8

FAST = dict(calib_samples=4, calib_seqlen=64)
NAIVE = dict(hadamard=False, percentile_alpha=None)


@pytest.fixture(scope="module")
def naive(random_tiny_mamba2, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("naive") / "out"
    return quantize(random_tiny_mamba2, out, calib=str(calib_file), **FAST, **NAIVE)


@pytest.fixture(scope="module")
def checkpoint(naive):
    config = json.loads((naive / "config.json").read_text())
    return config, Mamba2Shapes.from_config(config), load_file(naive / "model.safetensors")


def test_checkpoint_follows_the_format_and_records_no_hadamard(checkpoint):
    config, shapes, tensors = checkpoint
    section = quamba_section(config["quantization_config"])
    assert section["recipe"] == "w8a8" and section["hadamard"] is None
    assert (section["x_head_groups"], section["x_dim_groups"]) == (1, 1)
    for layer in range(shapes.num_layers):
        for name, (shape, dtype) in mamba2_mixer_tensors(shapes).items():
            check_tensor(name, tensors[mixer_prefix(layer) + name], shape, dtype)


def test_weights_are_the_folded_source_unrotated_and_unpermuted(checkpoint, random_tiny_mamba2):
    _, shapes, tensors = checkpoint
    folded = transforms.fold_norms(load_source(random_tiny_mamba2).tensors)
    assert torch.equal(tensors["backbone.embeddings.weight"], folded["backbone.embeddings.weight"])
    assert torch.equal(tensors["lm_head.weight"], folded["lm_head.weight"])
    for layer in range(shapes.num_layers):
        prefix = mixer_prefix(layer)
        for linear in ("in_proj", "out_proj"):
            weight, scale = tensors[prefix + linear + ".weight"], tensors[prefix + linear + ".weight_scale"]
            # Round to nearest: within half an int8 step of the folded fp weight (plus fp32 slack).
            error = (dequantize_int8(weight, scale) - folded[prefix + linear + ".weight"]).abs()
            assert (error <= scale * 0.5001).all(), f"{prefix}{linear} is rotated or permuted"
        assert torch.equal(tensors[prefix + "dt_bias"], folded[prefix + "dt_bias"])
        assert torch.equal(tensors[prefix + "norm.weight"], folded[prefix + "norm.weight"])


def test_x_b_c_and_state_have_one_absmax_scale_each(checkpoint, random_tiny_mamba2, calib_file):
    config, shapes, tensors = checkpoint
    source = load_source(random_tiny_mamba2)
    absmax = {}

    def observe(layer, point, t):
        if point in ("x", "B", "C", "ssm_state"):
            absmax[layer, point] = max(absmax.get((layer, point), 0.0), t.abs().max().item())

    reference = Mamba2Reference(source.config, transforms.fold_norms(source.tensors), observer=observe)
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    for ids in calibration_samples(str(calib_file), tokenizer, FAST["calib_samples"], FAST["calib_seqlen"]):
        reference.logits(ids)
    heads_per_group = shapes.num_heads // shapes.n_groups
    for layer in range(shapes.num_layers):
        prefix = mixer_prefix(layer)
        for point, name in (("x", "x_scales"), ("B", "B_scale"), ("C", "C_scale"), ("ssm_state", "ssm_state_scale")):
            # The converter observes the same fp32 forward: the same maxima up to fp32 rounding.
            expected = torch.full_like(tensors[prefix + name], absmax[layer, point] / 127)
            torch.testing.assert_close(tensors[prefix + name], expected, rtol=1e-6, atol=0)
        assert (tensors[prefix + "x_head_group_range"] == heads_per_group).all()
        assert (tensors[prefix + "x_dim_group_range"] == shapes.head_dim).all()


def test_simulator_skips_the_online_hadamard(naive):
    reference = QuantizedMamba2Reference.from_checkpoint(naive)
    assert reference.online_hadamard is False
    y = torch.randn(3, reference.shapes.intermediate_size)
    expected = reference._linear(0, "out_proj", y)
    torch.testing.assert_close(reference._out_proj(0, y), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "switches, message",
    [
        (dict(hadamard=False), "--no-hadamard and --no-percentile go together"),
        (dict(percentile_alpha=None), "--no-hadamard and --no-percentile go together"),
        (dict(percentile_alpha=0.999), "the Quamba2 recipe uses no percentile clipping"),
        (dict(recipe="w4a8", **NAIVE), "implemented for recipe 'w8a8' only, not 'w4a8'"),
        (dict(recipe="w4a16", **NAIVE), "the naive 4-bit baseline is --rtn"),
    ],
)
def test_other_switch_combinations_are_refused_before_work(switches, message, random_tiny_mamba2, tmp_path):
    with pytest.raises(QuantizeError, match=message):
        quantize(random_tiny_mamba2, tmp_path / "out", **switches)
    assert list(tmp_path.iterdir()) == []
