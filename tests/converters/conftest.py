"""Small random Mamba2 checkpoints (with a real tokenizer) for converter tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _byte_level_tokenizer(vocab_size: int):
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:100], trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)


def build_tiny_mamba2(out: Path, n_groups: int = 1, seed: int = 0) -> Path:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(
        vocab_size=320, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16,
        num_heads=8 * n_groups, expand=2 * n_groups, n_groups=n_groups, chunk_size=16,
        conv_kernel=4, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    Mamba2ForCausalLM(config).save_pretrained(out)
    _byte_level_tokenizer(300).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_mamba2(tmp_path_factory) -> Path:
    return build_tiny_mamba2(tmp_path_factory.mktemp("tiny-mamba2-random"))


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:60]))
    return path
