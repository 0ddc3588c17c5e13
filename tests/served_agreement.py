"""Serve a quantized checkpoint in one vLLM engine and compare it with its simulated reference
on the same context, as the runtime tests of every recipe do.

The reference is fed the tokens vLLM chose; at every step the served token must be the
reference's argmax (>= 95% of steps) and the served top-5 logprobs must match the reference's:
the median step within a tight ``typical`` bound, every step within ``worst`` (the bounds and
their reasons are the calling test's). The median, not a higher quantile: with an int8 SSM
state, one fp32 rounding difference that crosses an int8 rounding boundary early in a prompt
stays in that prompt's state to its end (on some CPUs one of the 8 prompts has such a flip in
its prefill, 1/8 of all steps), while a wrong scale, permutation or state update moves every
step.
"""

from __future__ import annotations

from typing import Callable

import torch

from tests.conftest import ASSETS
from tests.test_plugin import ENGINE_KWARGS, greedy, shutdown

NEW_TOKENS = 32


def heldout_prompts(tokenizer, count=8, length=16) -> list[list[int]]:
    lines = [line for line in (ASSETS / "heldout.txt").read_text().splitlines() if len(line) > 80]
    step = len(lines) // count
    return [tokenizer(lines[i * step], add_special_tokens=False)["input_ids"][:length] for i in range(count)]


def reference_on(reference, prompt: list[int], tokens: list[int], chunk: int | None = None) -> torch.Tensor:
    """The reference's logprobs at each step, fed ``tokens`` (prefill, in chunks of ``chunk``
    tokens if given, then one decode each)."""
    states = None
    for start in range(0, len(prompt), chunk or len(prompt)):
        logits, states = reference.prefill(torch.tensor(prompt[start:start + (chunk or len(prompt))]), states)
    steps = [logits[-1]]
    states = [(c.unsqueeze(0), s.unsqueeze(0)) for c, s in states]
    for token in tokens[:-1]:
        logits, states = reference.decode(torch.tensor([token]), states)
        steps.append(logits[0])
    return torch.log_softmax(torch.stack(steps), dim=-1)


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
    assert sorted(differences)[total // 2] <= typical, "median logprob difference over the bound"
    assert max(differences) <= worst, f"largest logprob difference {max(differences):.4f}"
