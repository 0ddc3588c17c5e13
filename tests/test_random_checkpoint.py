"""Tests of vllm_quamba.random_checkpoint: real shapes, loadable, finite, deterministic."""

from __future__ import annotations

import pytest
import torch

from vllm_quamba.random_checkpoint import MODEL_SHAPES, build_random_checkpoint

EXPECTED_CONFIG = {
    "mamba2-130m": dict(hidden_size=768, state_size=128, head_dim=64, num_heads=24, n_groups=1,
                        expand=2, conv_kernel=4, chunk_size=256, vocab_size=50288),
    "mamba-130m": dict(hidden_size=768, state_size=16, expand=2, conv_kernel=4, time_step_rank=48,
                       intermediate_size=1536, vocab_size=50280),
}


def load(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return config, model, tokenizer


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIG))
def test_two_layer_checkpoint_has_real_widths_and_runs(name, tmp_path):
    path = build_random_checkpoint(name, tmp_path / name, seed=0, num_layers=2)
    config, model, tokenizer = load(path)

    assert config.num_hidden_layers == 2
    for key, value in EXPECTED_CONFIG[name].items():
        assert getattr(config, key) == value, key
    assert config.vocab_size >= len(tokenizer)

    input_ids = tokenizer(["Hello, world! Mamba says hi."], return_tensors="pt").input_ids
    assert input_ids.max() < config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_mixer_parameters_follow_mamba_init(tmp_path):
    path = build_random_checkpoint("mamba2-130m", tmp_path / "m", num_layers=1, vocab_size=512)
    _, model, _ = load(path)
    mixer = model.backbone.layers[0].mixer
    a = mixer.A_log.exp()
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((a >= 1) & (a <= 16)).all()
    assert ((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))


def test_same_seed_gives_identical_file(tmp_path):
    def build(seed, folder):
        path = build_random_checkpoint(
            "mamba2-130m", tmp_path / folder, seed=seed, num_layers=1, vocab_size=1024
        )
        return (path / "model.safetensors").read_bytes()

    first = build(0, "a")
    assert build(0, "b") == first
    assert build(1, "c") != first


def test_same_seed_gives_identical_file_mamba1(tmp_path):
    build = lambda folder: (  # noqa: E731
        build_random_checkpoint("mamba-130m", tmp_path / folder, seed=3, num_layers=1, vocab_size=1024)
        / "model.safetensors"
    ).read_bytes()
    assert build("a") == build("b")


def test_unknown_name_lists_known_ones(tmp_path):
    with pytest.raises(ValueError) as error:
        build_random_checkpoint("mamba3-1b", tmp_path)
    for name in MODEL_SHAPES:
        assert name in str(error.value)


def test_vocab_must_cover_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_random_checkpoint("mamba-130m", tmp_path, num_layers=1, vocab_size=100)


def test_byte_tokenizer_round_trips_text(tmp_path):
    path = build_random_checkpoint("mamba-130m", tmp_path, num_layers=1, vocab_size=300)
    _, _, tokenizer = load(path)
    text = "naïve café – ∑ 🐍\tend"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 0
