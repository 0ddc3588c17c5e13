"""4-bit Mamba1 checkpoints (W4A16, W4A8) served by vLLM-CPU through the plugin, against the
converter's simulated references, one engine per recipe (module-scoped).

Agreement is measured on the same context, as in tests/test_w4_vllm.py: the reference is fed
the tokens vLLM chose, and at every one of the 8 x 32 steps the served token must be the
reference's argmax (>= 95% of steps) and the served top-5 logprobs must match the reference's.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.converters.test_w4_mamba1 import simulated
from tests.served_agreement import check_same_context_agreement, full_sequence, serve_greedy, stepwise
from tests.test_plugin import engine_env  # noqa: F401  (the module's autouse env fixture)

pytestmark = pytest.mark.vllm

# (typical, worst) logprob difference: 95% of steps within the first, every step within the
# second. W4A16 runs the fp SSM: runtime and reference differ only in fp32 summation order
# (the 4-bit kernel against dequantize-then-matmul, vLLM's conv/scan ops against ours):
# measured at most 3.1e-6, so 1e-3 leaves two orders of magnitude, and a wrong group scale, a
# missing Hadamard or a lost state misses it by whole units. W4A8 quantizes at the same points
# with the same scales as its reference: measured at most 5.3e-6 (all 256 steps); but a fp32
# rounding difference that moves a value across an int8 rounding boundary is carried by the
# int8 SSM state for the rest of its sequence (5.0e-2 measured for W8A8 Mamba1, same int8
# SSM path: tests/test_mamba1_quamba_vllm.py), hence 0.1 for the worst step.
TOLERANCES = {"w4a16": (1e-3, 1e-3), "w4a8": (1e-3, 0.1)}


def _probe(model) -> dict:
    # Module level: vLLM pickles apply_model's function by reference into the worker.
    mixers = [m for m in model.modules() if hasattr(m, "kv_cache") and hasattr(m, "get_state_dtype")]
    return {
        "mixers": sorted({type(m).__name__ for m in mixers}),
        "state_dtypes": sorted({str(t.dtype) for m in mixers for t in m.kv_cache}),
        "schemes": sorted({type(m.scheme).__name__ for m in model.modules() if hasattr(m, "scheme")}),
        "fp_dt_proj": sorted({type(m.dt_proj.quant_method).__name__ for m in mixers}),
    }


@pytest.fixture(scope="module", params=["w4a16", "w4a8"])
def served(request, quantized_tiny_mamba1_w4a16, quantized_tiny_mamba1_w4a8):
    directory = {"w4a16": quantized_tiny_mamba1_w4a16, "w4a8": quantized_tiny_mamba1_w4a8}[request.param]
    return (request.param, directory, *serve_greedy(directory, _probe))


def test_layers_schemes_and_state_dtypes(served):
    recipe, _, _, info, _, _ = served
    if recipe == "w4a16":  # the stock fp SSM and fp dt_proj; in/x/out_proj 4-bit
        assert info["mixers"] == ["QuambaW4A16Mixer"] and info["state_dtypes"] == ["torch.float32"]
        assert info["schemes"] == ["QuambaW4Linear"]
        assert info["fp_dt_proj"] == ["UnquantizedLinearMethod"]
    else:  # dt_proj W8A8, the other three W4A8
        assert info["mixers"] == ["QuambaMixer"] and info["state_dtypes"] == ["torch.int8"]
        assert info["schemes"] == ["QuambaW4Linear", "QuambaW8A8Int8"]


def test_checkpoint_headers_pass_the_preflight_and_a_wrong_dt_proj_fails(served, tmp_path):
    from safetensors.torch import load_file, save_file

    from vllm_quamba.config import check_checkpoint_headers
    from vllm_quamba.format import QuambaFormatError

    recipe, directory, _, _, _, _ = served
    config = json.loads((directory / "config.json").read_text())
    check_checkpoint_headers(str(directory), config)
    tensors = load_file(directory / "model.safetensors")
    name = "backbone.layers.0.mixer.dt_proj.weight"
    tensors[name] = tensors[name].float() if recipe == "w4a8" else tensors[name].to(torch.int8)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(QuambaFormatError, match="dt_proj.weight"):
        check_checkpoint_headers(str(tmp_path), config)


def test_greedy_matches_simulated_reference_on_the_same_context(served):
    recipe, directory, prompts, _, tokens, logprobs = served
    # W4A16's reference keeps fp states and no decode path: one forward over prompt + tokens
    want = (full_sequence if recipe == "w4a16" else stepwise)(simulated(directory))
    check_same_context_agreement(want, prompts, tokens, logprobs, *TOLERANCES[recipe])


@pytest.mark.parametrize("recipe", ["w4a16", "w4a8"])
def test_config_expects_each_linear_at_its_format_precision(
    recipe, quantized_tiny_mamba1_w4a16, quantized_tiny_mamba1_w4a8
):
    """dt_proj is W8A8 in a W4A8 layer and fp in a W4A16 one; the other three are the layer's."""
    import types

    from compressed_tensors.quantization import QuantizationStrategy

    from vllm_quamba.config import QuambaConfig
    from vllm_quamba.format import QuambaFormatError
    from vllm_quamba.layers.linear_schemes import QuambaW4Linear, QuambaW8A8Int8

    directory = {"w4a16": quantized_tiny_mamba1_w4a16, "w4a8": quantized_tiny_mamba1_w4a8}[recipe]
    config = QuambaConfig.from_config(json.loads((directory / "config.json").read_text())["quantization_config"])
    schemes = {
        "w8a8": QuambaW8A8Int8(QuantizationStrategy.CHANNEL, True, True),
        "w4a8": QuambaW4Linear(128, static_int8_input=True),
        "w4a16": QuambaW4Linear(128, static_int8_input=False),
        None: None,
    }
    expected = {linear: recipe for linear in ("in_proj", "x_proj", "out_proj")}
    expected["dt_proj"] = "w8a8" if recipe == "w4a8" else None
    for linear, precision in expected.items():
        prefix = f"backbone.layers.1.mixer.{linear}"
        for given, scheme in schemes.items():
            layer = types.SimpleNamespace(scheme=scheme)
            if given == precision:
                config._check_mixer_linear(layer, prefix)
            else:
                with pytest.raises(QuambaFormatError, match=prefix):
                    config._check_mixer_linear(layer, prefix)
