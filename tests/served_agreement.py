"""Serve a quantized checkpoint in one vLLM engine and compare it with its simulated reference
on the same context, as the runtime tests of every recipe do.

The reference is fed the tokens vLLM chose; at every step the served token must be the
reference's argmax (>= 95% of steps) and the served top-5 logprobs must match the reference's:
most steps within a tight ``typical`` bound, every step within ``worst`` (the bounds and their
reasons are the calling test's).
"""

from __future__ import annotations

from typing import Callable

import torch

from tests.test_end_to_end import heldout_prompts
from tests.test_mamba1_quamba_vllm import reference_on
from tests.test_plugin import ENGINE_KWARGS, greedy, shutdown

NEW_TOKENS = 32


def serve_greedy(directory, probe: Callable) -> tuple[list, dict, list, list]:
    """(prompts, probe's result inside the worker, served tokens, served top-5 logprobs)."""
    from transformers import AutoTokenizer
    from vllm import LLM

    prompts = heldout_prompts(AutoTokenizer.from_pretrained(directory))
    llm = LLM(str(directory), **ENGINE_KWARGS)
    try:
        info = llm.apply_model(probe)[0]
        tokens, logprobs = greedy(llm, prompts, NEW_TOKENS, logprobs=5)
    finally:
        shutdown(llm)
    return prompts, info, tokens, logprobs


def stepwise(reference) -> Callable[[list[int], list[int]], torch.Tensor]:
    """Reference logprobs through its prefill and one decode step per token (any state)."""
    return lambda prompt, tokens: reference_on(reference, prompt, tokens)


def full_sequence(reference) -> Callable[[list[int], list[int]], torch.Tensor]:
    """Reference logprobs from one forward over prompt + tokens (fp states only)."""

    def want(prompt: list[int], tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor(prompt + tokens)
        return torch.log_softmax(reference.logits(ids), -1)[len(prompt) - 1:len(ids) - 1]

    return want


def check_same_context_agreement(want, prompts, tokens, logprobs, typical: float, worst: float) -> None:
    agree = total = 0
    differences = []
    for prompt, got, steps in zip(prompts, tokens, logprobs):
        expected = want(prompt, got)
        agree += sum(int(expected[i].argmax()) == t for i, t in enumerate(got))
        total += len(got)
        differences += [max(abs(expected[i, int(k)].item() - v) for k, v in step.items()) for i, step in enumerate(steps)]
    print(f"agreement {agree}/{total}, logprob difference median {sorted(differences)[total // 2]:.2e}, max {max(differences):.2e}")
    assert total == len(prompts) * NEW_TOKENS
    assert agree / total >= 0.95, f"greedy agreement {agree}/{total}"
    assert sum(d <= typical for d in differences) >= 0.95 * total
    assert max(differences) <= worst, f"largest logprob difference {max(differences):.4f}"
