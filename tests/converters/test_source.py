"""Source checkpoints in mamba_ssm format read as the same model as in transformers format."""

import json

import pytest
import torch

from vllm_quamba.converters.source import SourceModelError, load_source

from tests.tiny_models import make_tiny_mamba2


def build_tiny_mamba1(out):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2,
                         conv_kernel=4, time_step_rank=4, tie_word_embeddings=True)
    MambaForCausalLM(config).save_pretrained(out)
    return out


def mamba_ssm_config(cfg: dict) -> dict:
    common = {"d_model": cfg["hidden_size"], "n_layer": cfg["num_hidden_layers"], "vocab_size": cfg["vocab_size"],
              "pad_vocab_size_multiple": 1, "tie_embeddings": cfg.get("tie_word_embeddings", True)}
    if cfg["architectures"] == ["Mamba2ForCausalLM"]:
        return {**common, "ssm_cfg": {"layer": "Mamba2", "d_state": cfg["state_size"], "headdim": cfg["head_dim"],
                                      "ngroups": cfg["n_groups"], "chunk_size": cfg["chunk_size"]}}
    return {**common, "ssm_cfg": {"d_state": cfg["state_size"], "dt_rank": cfg["time_step_rank"]}}


@pytest.mark.parametrize("build", [make_tiny_mamba2, build_tiny_mamba1], ids=["mamba2", "mamba1"])
def test_mamba_ssm_format_reads_as_transformers(build, random_tiny_mamba2, tmp_path):
    hf = load_source(build(tmp_path / "hf"), tokenizer=random_tiny_mamba2)
    ssm_dir = tmp_path / "ssm"
    ssm_dir.mkdir()
    (ssm_dir / "config.json").write_text(json.dumps(mamba_ssm_config(hf.config)))
    renamed = {k.replace("backbone.embeddings.", "backbone.embedding."): v
               for k, v in hf.tensors.items() if k != "lm_head.weight" or not hf.config.get("tie_word_embeddings", True)}
    torch.save(renamed, ssm_dir / "pytorch_model.bin")
    ssm = load_source(ssm_dir, tokenizer=random_tiny_mamba2)
    assert ssm.architecture == hf.architecture
    for key in ("hidden_size", "num_hidden_layers", "state_size", "conv_kernel", "vocab_size"):
        assert ssm.config[key] == hf.config[key], key
    mamba2 = hf.architecture == "Mamba2ForCausalLM"
    for key in ("num_heads", "head_dim", "n_groups", "chunk_size") if mamba2 else ("time_step_rank", "intermediate_size"):
        assert ssm.config[key] == hf.config[key], key
    assert ssm.tensors.keys() == hf.tensors.keys()
    assert all(torch.equal(ssm.tensors[k], hf.tensors[k]) for k in hf.tensors)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(SourceModelError, match="no such directory"):
        load_source(tmp_path / "nothing-here")


def test_corrupt_weights_are_named(random_tiny_mamba2, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in random_tiny_mamba2.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceModelError, match="model.safetensors: unreadable"):
        load_source(broken)
