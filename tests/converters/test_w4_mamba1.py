"""The 4-bit Mamba1 recipes (Quamba2 W4A8 and W4A16): checkpoint format, packing, quality.

W4A8: in_proj/out_proj 4-bit by GPTQ, x_proj 4-bit by round-to-nearest, dt_proj W8A8, the int8
SSM of the W8A8 recipe (simulated by ``QuantizedMambaReference``). W4A16: the same three 4-bit
linears weight-only, the fp SSM and an fp dt_proj (simulated by ``MambaReference`` on the
checkpoint). Quality is held-out perplexity against the fp model, with the bars of the issue:
W4A16 within 4%, W4A8 within 6%; round-to-nearest everywhere (``gptq=False``) must be worse.
"""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file

from vllm_quamba.converters import recipe_mamba1
from vllm_quamba.converters.gptq import rtn_quantize
from vllm_quamba.converters.simulate import MambaReference, QuantizedMambaReference
from vllm_quamba.converters.source import load_source
from vllm_quamba.format import (
    MambaShapes,
    mamba1_linear_precision,
    mamba1_mixer_tensors,
    mixer_prefix,
    quamba_section,
    w4_group_size,
)

from ..conftest import TINY_MAMBA1, _quantize_tiny_mamba1
from .test_quality import heldout_windows, perplexity

QUALITY_BAR = {"w4a16": 0.04, "w4a8": 0.06}
FP_SSM_TENSORS = ("dt_proj.weight", "dt_proj.bias", "conv1d.weight", "conv1d.bias", "A_log", "D")


@pytest.fixture(scope="module")
def checkpoints(quantized_tiny_mamba1_w4a16, quantized_tiny_mamba1_w4a8):
    return {"w4a16": quantized_tiny_mamba1_w4a16, "w4a8": quantized_tiny_mamba1_w4a8}


def simulated(directory):
    """The simulated model of a 4-bit Mamba1 checkpoint."""
    config = json.loads((directory / "config.json").read_text())
    if config["quantization_config"]["quamba"]["recipe"] == "w4a16":
        return MambaReference(config, load_file(directory / "model.safetensors"), online_hadamard=True)
    return QuantizedMambaReference.from_checkpoint(directory)


def _scheme_precision(scheme) -> str:
    if scheme.weights.num_bits == 8:
        return "w8a8"
    return "w4a8" if scheme.input_activations is not None else "w4a16"


@pytest.mark.parametrize("recipe", ["w4a16", "w4a8"])
def test_checkpoint_follows_the_format(recipe, checkpoints):
    directory = checkpoints[recipe]
    config = json.loads((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    shapes = MambaShapes.from_config(config)
    table = mamba1_mixer_tensors(shapes, recipe)
    for layer in range(shapes.num_layers):
        prefix = mixer_prefix(layer)
        assert {n[len(prefix):] for n in tensors if n.startswith(prefix)} == set(table)
        for rel, (shape, dtype) in table.items():
            assert tuple(tensors[prefix + rel].shape) == shape and tensors[prefix + rel].dtype == dtype, rel
    quant = config["quantization_config"]
    section = quamba_section(quant)
    assert (section["recipe"], section["architecture"]) == (recipe, "mamba")
    assert section["ssm_state_dtype"] == (None if recipe == "w4a16" else "int8")
    parsed = QuantizationConfig.model_validate({k: v for k, v in quant.items() if k not in ("quant_method", "quamba")})
    precision_of = {
        target.split("\\.")[-1].rstrip("$"): _scheme_precision(scheme)
        for scheme in parsed.config_groups.values()
        for target in scheme.targets
    }
    expected = {
        linear: mamba1_linear_precision(recipe, linear)
        for linear in ("in_proj", "x_proj", "dt_proj", "out_proj")
        if mamba1_linear_precision(recipe, linear) is not None
    }
    assert precision_of == expected
    assert expected.get("dt_proj") == ("w8a8" if recipe == "w4a8" else None)
    for scheme in parsed.config_groups.values():
        if scheme.weights.num_bits == 4:
            assert scheme.format == "pack-quantized"
            assert (scheme.weights.strategy, scheme.weights.group_size) == ("group", 128)


def test_w4a16_keeps_the_rotated_fp_ssm(quantized_tiny_mamba1_w4a16):
    tensors = load_file(quantized_tiny_mamba1_w4a16 / "model.safetensors")
    rotated = recipe_mamba1.transformed_tensors(load_source(TINY_MAMBA1).tensors, hadamard=True)
    for layer in range(MambaShapes.from_config(load_source(TINY_MAMBA1).config).num_layers):
        for name in FP_SSM_TENSORS:
            key = mixer_prefix(layer) + name
            assert torch.equal(tensors[key], rotated[key].float()), key


@pytest.mark.parametrize("recipe", ["w4a16", "w4a8"])
def test_packed_weights_read_back_bit_exactly_and_x_proj_is_round_to_nearest(recipe, checkpoints):
    tensors = load_file(checkpoints[recipe] / "model.safetensors")
    rotated = recipe_mamba1.transformed_tensors(load_source(TINY_MAMBA1).tensors, hadamard=True)
    unpacked = {}
    for linear in ("in_proj", "x_proj", "out_proj"):
        prefix = mixer_prefix(0) + linear + "."
        packed, scale, shape = (tensors[prefix + n] for n in ("weight_packed", "weight_scale", "weight_shape"))
        q = unpack_from_int32(packed, 4, torch.Size(shape.tolist()))
        assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
        assert torch.equal(pack_to_int32(q, 4), packed)
        weight = rotated[prefix + "weight"].float()
        rtn_q, rtn_scale = rtn_quantize(weight, 4, w4_group_size(weight.shape[1]))
        unpacked[linear] = (q, scale, rtn_q, rtn_scale)
    # Quamba2 rounds x_proj to nearest: exactly our RTN of the rotated weight ...
    q, scale, rtn_q, rtn_scale = unpacked["x_proj"]
    assert torch.equal(q, rtn_q.to(torch.int8)) and torch.equal(scale, rtn_scale.float())
    # ... and GPTQ's error feedback moves some of in_proj's and out_proj's values off it.
    for linear in ("in_proj", "out_proj"):
        q, _, rtn_q, _ = unpacked[linear]
        assert not torch.equal(q, rtn_q.to(torch.int8)), linear


@pytest.mark.parametrize("recipe", ["w4a16", "w4a8"])
def test_perplexity_within_bar_and_gptq_beats_round_to_nearest(recipe, checkpoints, tmp_path_factory):
    source = load_source(TINY_MAMBA1)
    windows = heldout_windows(TINY_MAMBA1)
    fp = perplexity(MambaReference(source.config, source.tensors), windows)
    gptq = perplexity(simulated(checkpoints[recipe]), windows)
    rtn = perplexity(simulated(_quantize_tiny_mamba1(tmp_path_factory, recipe, gptq=False)), windows)
    change = lambda ppl: f"{ppl:.3f} ({100 * (ppl / fp - 1):+.2f}%)"  # noqa: E731
    print(f"mamba1 {recipe}: fp {fp:.3f}, GPTQ {change(gptq)}, RTN {change(rtn)}")
    assert gptq / fp - 1 <= QUALITY_BAR[recipe]
    assert rtn > gptq

