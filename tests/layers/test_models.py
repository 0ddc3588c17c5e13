"""QuambaMamba2ForCausalLM's class-level pieces (no engine): state dtypes and the scoped mixer swap."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

pytest.importorskip("vllm")

from vllm.model_executor.custom_op import op_registry_oot  # noqa: E402
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2  # noqa: E402
from vllm.model_executor.models.mamba2 import Mamba2ForCausalLM  # noqa: E402

from vllm_quamba.config import QuambaConfig  # noqa: E402
from vllm_quamba.layers.mamba2_mixer import QuambaMixer2  # noqa: E402
from vllm_quamba.layers.models import (  # noqa: E402
    QuambaMamba2ForCausalLM,
    _pluggable_layer_replaced,
    quamba_recipe,
)


def _vllm_config(quant_config=None, quantization=None, hf_quant=None):
    return types.SimpleNamespace(
        quant_config=quant_config,
        model_config=types.SimpleNamespace(
            quantization=quantization, dtype=torch.float32,
            hf_config=types.SimpleNamespace(quantization_config=hf_quant),
        ),
        cache_config=types.SimpleNamespace(mamba_cache_dtype="auto", mamba_ssm_cache_dtype="float32"),
    )


def test_state_dtypes_int8_for_quamba_and_stock_otherwise(quamba_ckpt):
    quant_cfg = json.loads((quamba_ckpt / "config.json").read_text())["quantization_config"]
    quamba = _vllm_config(QuambaConfig.from_config(copy.deepcopy(quant_cfg)), "quamba")
    assert quamba_recipe(quamba) == "w8a8"
    assert QuambaMamba2ForCausalLM.get_mamba_state_dtype_from_config(quamba) == (torch.int8, torch.int8)
    # before the quant config object exists, the checkpoint's quamba section decides
    assert QuambaMamba2ForCausalLM.get_mamba_state_dtype_from_config(_vllm_config(None, "quamba", quant_cfg)) == (
        torch.int8, torch.int8,
    )
    stock = _vllm_config()
    assert quamba_recipe(stock) is None
    # W4A16 keeps the fp SSM: the stock conv state, the SSM state in fp16 (Quamba2's W4A16)
    w4a16_cfg = copy.deepcopy(quant_cfg)
    w4a16_cfg["quamba"]["recipe"] = "w4a16"
    stock_conv, _ = Mamba2ForCausalLM.get_mamba_state_dtype_from_config(stock)
    assert QuambaMamba2ForCausalLM.get_mamba_state_dtype_from_config(
        _vllm_config(None, "quamba", w4a16_cfg)
    ) == (stock_conv, torch.float16)
    assert QuambaMamba2ForCausalLM.get_mamba_state_dtype_from_config(
        stock
    ) == Mamba2ForCausalLM.get_mamba_state_dtype_from_config(stock)


def test_mixer_swap_is_scoped_and_restored():
    assert "MambaMixer2" not in op_registry_oot
    with pytest.raises(RuntimeError):
        with _pluggable_layer_replaced(MambaMixer2, QuambaMixer2):
            assert op_registry_oot["MambaMixer2"] is QuambaMixer2
            raise RuntimeError("model construction failed")
    assert "MambaMixer2" not in op_registry_oot

    class Other(MambaMixer2):
        pass

    op_registry_oot["MambaMixer2"] = Other  # another plugin's replacement is put back
    try:
        with _pluggable_layer_replaced(MambaMixer2, QuambaMixer2):
            assert op_registry_oot["MambaMixer2"] is QuambaMixer2
        assert op_registry_oot["MambaMixer2"] is Other
    finally:
        op_registry_oot.pop("MambaMixer2", None)


def test_model_keeps_the_stock_interfaces():
    from vllm.model_executor.models.interfaces import (
        has_inner_state,
        is_attention_free,
        supports_mamba_prefix_caching,
    )

    for check in (has_inner_state, is_attention_free, supports_mamba_prefix_caching):
        assert check(QuambaMamba2ForCausalLM)
    assert QuambaMamba2ForCausalLM.hf_to_vllm_mapper is Mamba2ForCausalLM.hf_to_vllm_mapper
