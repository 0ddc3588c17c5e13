"""Read a source Mamba checkpoint: transformers format or mamba_ssm format, local or hub.

mamba_ssm checkpoints (``config.json`` with ``d_model``/``n_layer``/``ssm_cfg`` and a
``pytorch_model.bin``, as the state-spaces models ship) are read by our own loader: importing
``mamba_ssm`` fails on a machine without its CUDA extension.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..format import SUPPORTED_ARCHITECTURES

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# The state-spaces checkpoints ship no tokenizer; their model cards name this one.
MAMBA_SSM_DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"


class SourceModelError(ValueError):
    """The source is not a checkpoint the converter can read; the message says why."""


@dataclasses.dataclass
class SourceModel:
    """An fp32 source checkpoint: transformers config dict, tensors by transformers name."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer_dir: Path | None

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]

    @property
    def kind(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]


def resolve_model_dir(model: str | Path) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (needs network)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise SourceModelError(f"{model}: not a directory")
    if path.is_absolute() or str(model).startswith((".", "~")) or str(model).count("/") != 1:
        raise SourceModelError(f"{model}: no such directory (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as exc:  # network errors, unknown repo, offline mode
        raise SourceModelError(
            f"{model}: no such local directory, and fetching it from the hub failed ({exc})"
        ) from exc


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise SourceModelError(f"{model_dir}: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SourceModelError(f"{path}: not valid JSON ({exc})") from exc


def is_mamba_ssm_config(cfg: dict[str, Any]) -> bool:
    return "d_model" in cfg and "n_layer" in cfg


def architecture_of(cfg: dict[str, Any]) -> str:
    """The transformers architecture name, or SourceModelError for anything not Mamba."""
    if is_mamba_ssm_config(cfg):
        layer = (cfg.get("ssm_cfg") or {}).get("layer", "Mamba1")
        return "Mamba2ForCausalLM" if layer == "Mamba2" else "MambaForCausalLM"
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise SourceModelError(
        f"unsupported architecture {archs or cfg.get('model_type')!r}: vllm-quamba quantizes "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (and mamba_ssm checkpoints of them)"
    )


def _padded_vocab(cfg: dict[str, Any]) -> int:
    multiple = cfg.get("pad_vocab_size_multiple", 8)
    vocab = cfg["vocab_size"]
    return vocab + (-vocab) % multiple


def mamba_ssm_to_transformers_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Translate a mamba_ssm MambaConfig dict into a transformers config dict."""
    ssm = dict(cfg.get("ssm_cfg") or {})
    common = {
        "hidden_size": cfg["d_model"],
        "num_hidden_layers": cfg["n_layer"],
        "vocab_size": _padded_vocab(cfg),
        "layer_norm_epsilon": cfg.get("norm_epsilon", 1e-5),
        "residual_in_fp32": cfg.get("residual_in_fp32", True),
        "tie_word_embeddings": cfg.get("tie_embeddings", True),
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    expand = ssm.get("expand", 2)
    if ssm.get("layer") == "Mamba2":
        head_dim = ssm.get("headdim", 64)
        intermediate = expand * cfg["d_model"]
        return {
            **common,
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "state_size": ssm.get("d_state", 128),
            "conv_kernel": ssm.get("d_conv", 4),
            "expand": expand,
            "head_dim": head_dim,
            "num_heads": intermediate // head_dim,
            "n_groups": ssm.get("ngroups", 1),
            "chunk_size": ssm.get("chunk_size", 256),
            "use_bias": ssm.get("bias", False),
            "use_conv_bias": ssm.get("conv_bias", True),
            "time_step_limit": [0.0, float("inf")],
        }
    return {
        **common,
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "state_size": ssm.get("d_state", 16),
        "conv_kernel": ssm.get("d_conv", 4),
        "expand": expand,
        "intermediate_size": expand * cfg["d_model"],
        "time_step_rank": ssm.get("dt_rank", "auto"),
        "use_bias": ssm.get("bias", False),
        "use_conv_bias": ssm.get("conv_bias", True),
    }


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            try:
                tensors.update(load_file(shard))
            except Exception as exc:
                raise SourceModelError(f"{shard}: unreadable safetensors file ({exc})") from exc
        return tensors
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise SourceModelError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights")
    tensors = {}
    for path in bins:
        try:
            tensors.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise SourceModelError(f"{path}: unreadable weights file ({exc})") from exc
    return tensors


def _mamba_ssm_tensor_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mamba_ssm names differ from transformers' only in the embedding."""
    renamed = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in tensors.items()}
    if "lm_head.weight" not in renamed:
        renamed["lm_head.weight"] = renamed["backbone.embeddings.weight"]
    return renamed


def _expected_shapes(model_dir: Path, cfg: dict[str, Any], arch: str, mamba_ssm: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the transformers model of this config holds (built on the
    meta device, so it costs no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(**cfg) if mamba_ssm else AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers' config validation: wrong types, inconsistent sizes
        raise SourceModelError(f"{model_dir}/config.json does not describe a valid {arch} ({exc})") from exc
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_tensors(model_dir: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """The weights are exactly the config's tensors, at its shapes, and finite."""
    mismatch = "the weights do not match config.json: re-download or re-export the checkpoint"
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise SourceModelError(f"{model_dir}: missing tensor(s) {missing[:8]}; {mismatch}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise SourceModelError(f"{model_dir}: unexpected tensor(s) {unexpected[:8]}; {mismatch}")
    misshapen = [
        f"{name} has shape {tuple(t.shape)}, config says {expected[name]}"
        for name, t in sorted(tensors.items())
        if tuple(t.shape) != expected[name]
    ]
    if misshapen:
        raise SourceModelError(f"{model_dir}: {'; '.join(misshapen[:4])}; {mismatch}")
    non_finite = [name for name, t in sorted(tensors.items()) if not torch.isfinite(t).all()]
    if non_finite:
        raise SourceModelError(
            f"{model_dir}: tensor(s) {non_finite[:8]} contain NaN or Inf; the source weights are "
            "damaged: re-download the checkpoint, or fix the training run that wrote it"
        )


def _find_tokenizer(model_dir: Path, tokenizer: str | Path | None, mamba_ssm: bool) -> Path | None:
    if tokenizer is not None:
        return resolve_model_dir(tokenizer)
    if any((model_dir / name).exists() for name in TOKENIZER_FILES):
        return model_dir
    if mamba_ssm:
        return resolve_model_dir(MAMBA_SSM_DEFAULT_TOKENIZER)
    raise SourceModelError(f"{model_dir}: no tokenizer files; pass --tokenizer DIR_OR_ID")


def check_source(model: str | Path) -> tuple[Path, dict[str, Any], str]:
    """Resolve the model and check its architecture without reading any weights."""
    model_dir = resolve_model_dir(model)
    cfg = read_config(model_dir)
    return model_dir, cfg, architecture_of(cfg)


def load_source(model: str | Path, tokenizer: str | Path | None = None) -> SourceModel:
    model_dir, cfg, arch = check_source(model)
    mamba_ssm = is_mamba_ssm_config(cfg)
    tensors = _read_tensors(model_dir)
    if mamba_ssm:
        cfg = mamba_ssm_to_transformers_config(cfg)
        tensors = _mamba_ssm_tensor_names(tensors)
    cfg = {**cfg, "architectures": [arch]}
    tensors = {name: t.float() for name, t in tensors.items()}
    if "lm_head.weight" not in tensors and "backbone.embeddings.weight" in tensors:
        tensors["lm_head.weight"] = tensors["backbone.embeddings.weight"]  # tied: only the embedding is saved
    _check_tensors(model_dir, tensors, _expected_shapes(model_dir, cfg, arch, mamba_ssm))
    return SourceModel(cfg, tensors, _find_tokenizer(model_dir, tokenizer, mamba_ssm))
