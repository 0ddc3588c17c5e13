"""Held-out perplexity of the W8A8 tiny Mamba2 against its fp model, both in plain torch.

The issue's bar: W8A8 within 2% (relative) of the fp perplexity. The simulated reference has
the runtime's numerics (tests/test_end_to_end.py checks that), so this is the quality of the
recipe itself. Computed over the whole held-out split in windows of 256 tokens.
"""

import math

import torch
from transformers import AutoTokenizer

from vllm_quamba.converters.simulate import Mamba2Reference, QuantizedMamba2Reference
from vllm_quamba.converters.source import load_source

from ..conftest import ASSETS

WINDOW = 256


def perplexity(model, windows) -> float:
    nll = count = 0
    for ids in windows:
        logits = model.logits(ids)
        nll += torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def heldout_windows(tokenizer_dir) -> list[torch.Tensor]:
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)((ASSETS / "heldout.txt").read_text())["input_ids"]
    return [torch.tensor(ids[i:i + WINDOW]) for i in range(0, len(ids) - WINDOW + 1, WINDOW)]


def test_w8a8_perplexity_within_two_percent(quantized_tiny):
    windows = heldout_windows(quantized_tiny)
    source = load_source(ASSETS / "tiny-mamba2")
    fp = perplexity(Mamba2Reference(source.config, source.tensors), windows)
    w8a8 = perplexity(QuantizedMamba2Reference.from_checkpoint(quantized_tiny), windows)
    print(f"held-out perplexity: fp {fp:.3f}, w8a8 {w8a8:.3f} ({100 * (w8a8 / fp - 1):+.2f}%)")
    assert fp < 200, "the fixture is not a trained language model"
    assert abs(w8a8 / fp - 1) <= 0.02
