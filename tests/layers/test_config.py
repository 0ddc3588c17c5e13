"""QuambaConfig: parsing, method detection and the checkpoint pre-flight check (no engine)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

pytest.importorskip("vllm")

from vllm_quamba.config import QuambaConfig, check_checkpoint_headers  # noqa: E402
from vllm_quamba.format import QuambaFormatError  # noqa: E402

from tests.tiny_models import rewrite_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def quant_cfg(quamba_ckpt) -> dict:
    return json.loads((quamba_ckpt / "config.json").read_text())["quantization_config"]


def test_from_config_parses_linears_and_quamba_section(quant_cfg):
    cfg = QuambaConfig.from_config(copy.deepcopy(quant_cfg))
    assert cfg.get_name() == "quamba"
    assert cfg.recipe == "w8a8"
    assert cfg.quamba["architecture"] == "mamba2"
    assert set(cfg.target_scheme_map) == {r"re:.*mixer\.in_proj$", r"re:.*mixer\.out_proj$"}
    assert cfg.ignore == ["lm_head"]
    assert {torch.float32, torch.bfloat16, torch.float16} <= set(cfg.get_supported_act_dtypes())
    assert QuambaConfig.get_min_capability() == -1


def test_config_survives_pickling(quant_cfg):
    # vLLM pickles the config into the engine and worker processes.
    cfg = pickle.loads(pickle.dumps(QuambaConfig.from_config(copy.deepcopy(quant_cfg))))
    assert isinstance(cfg, QuambaConfig) and cfg.recipe == "w8a8"


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c.pop("quamba"), "'quamba' section"),
        (lambda c: c["quamba"].pop("recipe"), "quantization_config.quamba.recipe"),
        (lambda c: c["quamba"].update(method_version=99), "quantization_config.quamba.method_version"),
        (lambda c: c["quamba"].update(recipe="w2a2"), "quantization_config.quamba.recipe"),
        (lambda c: c["quamba"].update(recipe="w4ax"), "quantization_config.quamba.layer_precision"),
        (lambda c: c.update(quant_method="gptq"), "quantization_config.quant_method"),
    ],
)
def test_bad_quamba_section_names_the_field(quant_cfg, edit, field):
    bad = copy.deepcopy(quant_cfg)
    edit(bad)
    with pytest.raises(QuambaFormatError, match=field):
        QuambaConfig.from_config(bad)


def test_override_quantization_method(quant_cfg):
    assert QuambaConfig.override_quantization_method(quant_cfg, None) == "quamba"
    assert QuambaConfig.override_quantization_method(quant_cfg, "quamba") == "quamba"
    other = {"quant_method": "compressed-tensors", "config_groups": {}}
    assert QuambaConfig.override_quantization_method(other, None) is None
    assert QuambaConfig.override_quantization_method(other, "compressed-tensors") is None
    with pytest.raises(QuambaFormatError, match="not a quamba checkpoint.*'compressed-tensors'"):
        QuambaConfig.override_quantization_method(other, "quamba")


def test_no_arg_construction_explains_missing_quantization_config():
    # What vLLM does for quantization="quamba" on a model whose config.json has none.
    with pytest.raises(QuambaFormatError, match="no quantization_config"):
        QuambaConfig()


@pytest.mark.parametrize(
    "checkpoint",
    [
        "quamba_ckpt", "quantized_tiny_mamba1", "quantized_tiny_w4a8", "quantized_tiny_w4a16",
        "quantized_tiny_w4ax", "quantized_tiny_mamba1_w4a8", "quantized_tiny_mamba1_w4a16",
        "quantized_tiny_mamba1_w4ax",
    ],
)
def test_preflight_accepts_every_converter_checkpoint(checkpoint, request):
    directory = request.getfixturevalue(checkpoint)
    cfg = json.loads((directory / "config.json").read_text())
    check_checkpoint_headers(str(directory), cfg)
    assert QuambaConfig.from_config(copy.deepcopy(cfg["quantization_config"])).recipe == cfg["quantization_config"]["quamba"]["recipe"]


def _drop(name):
    return lambda t: t.pop(name)


def _truncate(name):
    return lambda t: t.update({name: t[name][:-1].contiguous()})


def _retype(name, dtype):
    return lambda t: t.update({name: t[name].to(dtype)})


def _add(name):
    return lambda t: t.update({name: torch.zeros(3)})


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("backbone.layers.1.mixer.B_scale"), "missing tensor.*'backbone.layers.1.mixer.B_scale'"),
        (_drop("backbone.layers.0.mixer.in_proj.input_scale"), "'backbone.layers.0.mixer.in_proj.input_scale'"),
        (_truncate("backbone.layers.0.mixer.in_proj.weight_scale"),
         "'backbone.layers.0.mixer.in_proj.weight_scale' has shape"),
        (_truncate("backbone.layers.1.mixer.ssm_state_scale"), "'backbone.layers.1.mixer.ssm_state_scale' has shape"),
        (_retype("backbone.layers.0.mixer.conv1d.weight", torch.float32),
         "'backbone.layers.0.mixer.conv1d.weight' has dtype torch.float32"),
        (_add("backbone.layers.0.mixer.mystery_scale"), "unknown mixer tensor.*mystery_scale"),
    ],
)
def test_preflight_names_the_bad_tensor(quamba_ckpt, tmp_path, edit, message):
    bad = rewrite_checkpoint(quamba_ckpt, tmp_path / "bad", edit_tensors=edit)
    cfg = json.loads((bad / "config.json").read_text())
    with pytest.raises(QuambaFormatError, match=message):
        check_checkpoint_headers(str(bad), cfg)


@pytest.mark.parametrize(
    "resize", [lambda chosen: chosen[:-1], lambda chosen: [*chosen, "w4a8"]], ids=["shorter", "longer"]
)
def test_preflight_refuses_a_layer_precision_list_of_the_wrong_length(quantized_tiny_w4ax, resize):
    cfg = json.loads((quantized_tiny_w4ax / "config.json").read_text())
    section = cfg["quantization_config"]["quamba"]
    section["layer_precision"] = resize(section["layer_precision"])
    entries, layers = len(section["layer_precision"]), cfg["num_hidden_layers"]
    message = f"layer_precision has {entries} entries, but the model has {layers} layers"
    with pytest.raises(QuambaFormatError, match=message):
        check_checkpoint_headers(str(quantized_tiny_w4ax), cfg)
