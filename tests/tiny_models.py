"""Random-weight tiny Mamba1/Mamba2 checkpoints built on the fly, and checkpoint editing for bad-input tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vllm_quamba.format import WEIGHTS_FILE

TINY_MAMBA2 = dict(
    hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, num_heads=8, n_groups=1,
    expand=2, conv_kernel=4, chunk_size=256,
)


def make_byte_tokenizer(out_dir: Path):
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <eos> (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_mamba2(out_dir: Path, seed: int = 0, n_groups: int = 1, chunk_size: int = 256) -> Path:
    """A random-weight tiny Mamba2ForCausalLM (fp32, byte tokenizer, untied lm_head).

    Embeddings are N(0, 1) and the RMSNorm weights 1 + 0.1·N(0, 1), so that logits are not flat
    and folding the norms is not a no-op. ``n_groups`` > 1 keeps 8 heads per SSD group.
    """
    from transformers import Mamba2Config, Mamba2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_byte_tokenizer(out_dir)
    torch.manual_seed(seed)
    shape = {**TINY_MAMBA2, "n_groups": n_groups, "num_heads": 8 * n_groups, "expand": 2 * n_groups, "chunk_size": chunk_size}
    cfg = Mamba2Config(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **shape,
    )
    model = Mamba2ForCausalLM(cfg).float().eval()
    return _save_with_spread_weights(model, out_dir)


TINY_MAMBA1 = dict(hidden_size=64, num_hidden_layers=2, state_size=16, expand=2, conv_kernel=4, time_step_rank="auto")


def make_tiny_mamba1(out_dir: Path, seed: int = 0) -> Path:
    """A random-weight tiny MambaForCausalLM (fp32, byte tokenizer, untied lm_head, dt_rank 4).

    Embeddings are N(0, 1) and the RMSNorm weights 1 + 0.1·N(0, 1), so that logits are not flat
    and folding the norms is not a no-op.
    """
    from transformers import MambaConfig, MambaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_byte_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **TINY_MAMBA1,
    )
    model = MambaForCausalLM(cfg).float().eval()
    return _save_with_spread_weights(model, out_dir)


def _save_with_spread_weights(model, out_dir: Path) -> Path:
    """N(0, 1) embeddings and 1 + 0.1·N(0, 1) norm weights: logits are not flat, folding is not a no-op."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embeddings.weight"):
                p.normal_(0.0, 1.0)
            if name.endswith(("norm.weight", "norm_f.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def rewrite_checkpoint(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """Copy a checkpoint, applying edit_tensors(dict) / edit_config(dict) in place."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = load_file(str(src / WEIGHTS_FILE))
        edit_tensors(tensors)
        save_file(tensors, str(dst / WEIGHTS_FILE))
    if edit_config is not None:
        cfg = json.loads((src / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
