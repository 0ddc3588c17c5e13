"""Random-weight checkpoints with the shapes of real Mamba models, for benchmarks and tests.

Throughput and memory depend on shapes, not on trained values, so a benchmark can run on a
checkpoint built here instead of a downloaded one::

    from vllm_quamba.random_checkpoint import build_random_checkpoint
    path = build_random_checkpoint("mamba2-130m", "/tmp/mamba2-130m-random", seed=0)

The result is an ordinary transformers directory (``config.json``, ``generation_config.json``,
``model.safetensors``, tokenizer files) that transformers, vLLM and the quamba converter load
like a real checkpoint. Weights are deterministic for a given seed and follow the Mamba
initialisation (S4D-real ``A_log``, ``dt`` log-uniform in ``[dt_min, dt_max]`` stored as the
inverse softplus in the time-step bias, ``D = 1``), so activations stay numerically sane.

Without ``tokenizer_dir`` a byte-level tokenizer (256 byte tokens plus ``<|endoftext|>``) is
written; it needs no training and no download.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

__all__ = ["MODEL_SHAPES", "build_random_checkpoint"]

# Shapes of the public state-spaces checkpoints, as transformers config keyword arguments.
# Vocabulary sizes are the padded ones stored in those checkpoints (GPT-NeoX tokenizer, 50277
# tokens, padded to a multiple of 16 for Mamba2 and of 8 for Mamba1).
_COMMON = dict(
    conv_kernel=4,
    expand=2,
    use_conv_bias=True,
    use_bias=False,
    residual_in_fp32=True,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=True,
    time_step_min=0.001,
    time_step_max=0.1,
    time_step_floor=1e-4,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
_MAMBA2_COMMON = dict(_COMMON, state_size=128, head_dim=64, n_groups=1, chunk_size=256, rms_norm=True)

MODEL_SHAPES: dict[str, dict] = {
    "mamba2-130m": dict(
        _MAMBA2_COMMON, hidden_size=768, num_hidden_layers=24, num_heads=24, vocab_size=50288
    ),
    "mamba2-370m": dict(
        _MAMBA2_COMMON, hidden_size=1024, num_hidden_layers=48, num_heads=32, vocab_size=50288
    ),
    "mamba-130m": dict(
        _COMMON, hidden_size=768, num_hidden_layers=24, state_size=16, time_step_rank=48, vocab_size=50280
    ),
}

_ARCHITECTURES = {"mamba2-130m": "mamba2", "mamba2-370m": "mamba2", "mamba-130m": "mamba"}

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def build_random_checkpoint(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int | None = None,
    num_layers: int | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random-weight checkpoint with the shapes of ``name`` to ``out_dir``.

    ``vocab_size`` and ``num_layers`` override the real values (e.g. a 2-layer model with real
    widths for fast tests). The tokenizer is copied from ``tokenizer_dir`` or, when that is
    None, a byte-level one is generated; the model vocabulary must cover it.
    """
    overrides = _check_overrides(name, vocab_size, num_layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_size, eos_id = _write_tokenizer(out_dir, tokenizer_dir)
    special_ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    config = _make_config(name, {**overrides, **special_ids})
    if config.vocab_size < tokenizer_size:
        raise ValueError(
            f"vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer_size} tokens"
        )
    model = _make_model(config)
    initialise_mamba_weights(model, seed)
    model.to(dtype).save_pretrained(out_dir)
    return out_dir


def _check_overrides(name: str, vocab_size: int | None, num_layers: int | None) -> dict:
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_SHAPES))}")
    overrides = {}
    if vocab_size is not None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        overrides["vocab_size"] = vocab_size
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        overrides["num_hidden_layers"] = num_layers
    return overrides


def _make_config(name: str, overrides: dict):
    from transformers import Mamba2Config, MambaConfig

    config_class = Mamba2Config if _ARCHITECTURES[name] == "mamba2" else MambaConfig
    return config_class(**{**MODEL_SHAPES[name], **overrides})


def _make_model(config):
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaForCausalLM

    model_class = Mamba2ForCausalLM if isinstance(config, Mamba2Config) else MambaForCausalLM
    return model_class(config).eval()


# ----------------------------------------------------------------------------- initialisation


@torch.no_grad()
def initialise_mamba_weights(model, seed: int) -> None:
    """Overwrite every parameter of a transformers Mamba/Mamba2 model, deterministically.

    Linear and convolution weights use PyTorch's default uniform(+-1/sqrt(fan_in)), residual
    output projections are scaled by 1/sqrt(num_layers), embeddings are N(0, 0.02), norms are
    one, biases zero; the SSM parameters follow the Mamba papers.
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    for param_name, param in model.named_parameters():
        param.copy_(_initial_value(param_name, param, config, generator))


def _initial_value(param_name: str, param: torch.Tensor, config, generator: torch.Generator) -> torch.Tensor:
    shape = param.shape
    owner, leaf = (["", *param_name.split(".")])[-2:]
    if param_name.endswith("embeddings.weight"):
        return torch.randn(shape, generator=generator) * 0.02
    if leaf == "A_log":
        return _a_log(shape, generator)
    if leaf == "D" or owner in ("norm", "norm_f"):
        return torch.ones(shape)
    if leaf == "dt_bias" or (owner == "dt_proj" and leaf == "bias"):
        return _inverse_softplus_dt(shape, config, generator)
    if owner == "dt_proj":  # Mamba1 dt_proj.weight
        dt_init_std = int(config.time_step_rank) ** -0.5 * getattr(config, "time_step_scale", 1.0)
        return _uniform(shape, dt_init_std, generator)
    if leaf == "bias" and owner == "conv1d":
        return _uniform(shape, 1 / math.sqrt(config.conv_kernel), generator)
    if leaf == "bias":
        return torch.zeros(shape)
    bound = 1 / math.sqrt(math.prod(shape[1:]))  # PyTorch's default for Linear and Conv1d
    residual_scale = 1 / math.sqrt(config.num_hidden_layers) if owner == "out_proj" else 1.0
    return _uniform(shape, bound, generator) * residual_scale


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _a_log(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Mamba1: A[d, n] = n + 1 (S4D-real); Mamba2: one A per head, uniform in [1, 16]."""
    if len(shape) == 2:
        return torch.arange(1, shape[1] + 1, dtype=torch.float32).log().expand(shape).clone()
    return (1 + 15 * torch.rand(shape, generator=generator)).log()


def _inverse_softplus_dt(shape: torch.Size, config, generator: torch.Generator) -> torch.Tensor:
    """Bias whose softplus is dt ~ log-uniform[dt_min, dt_max], floored at dt_floor."""
    log_min, log_max = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = torch.exp(torch.rand(shape, generator=generator) * (log_max - log_min) + log_min)
    dt = dt.clamp(min=config.time_step_floor)
    return dt + torch.log(-torch.expm1(-dt))


# ----------------------------------------------------------------------------- tokenizer


def _write_tokenizer(out_dir: Path, tokenizer_dir: str | Path | None) -> tuple[int, int]:
    """Put tokenizer files into ``out_dir``; returns (number of tokens, end-of-text id)."""
    if tokenizer_dir is None:
        _write_byte_tokenizer(out_dir)
    else:
        _copy_tokenizer(Path(tokenizer_dir), out_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return len(tokenizer), eos_id


def _copy_tokenizer(source: Path, out_dir: Path) -> None:
    found = [source / f for f in TOKENIZER_FILES if (source / f).is_file()]
    if not found:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source}")
    for path in found:
        shutil.copyfile(path, out_dir / path.name)


def _write_byte_tokenizer(out_dir: Path) -> None:
    """Byte-level BPE without merges: id 0 is ``<|endoftext|>``, ids 1..256 the bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_symbol)
    vocab = {EOS_TOKEN: 0, **{symbol: i + 1 for i, symbol in enumerate(byte_symbols)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([EOS_TOKEN])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {key: EOS_TOKEN for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _is_printable_byte(code: int) -> bool:
    """Bytes that GPT-2's byte-to-unicode table maps to themselves."""
    return ord("!") <= code <= ord("~") or ord("¡") <= code <= ord("¬") or ord("®") <= code <= ord("ÿ")


def _byte_of_symbol(symbol: str) -> int:
    """Inverse of the GPT-2 byte-to-unicode table used by the ByteLevel pre-tokenizer."""
    code = ord(symbol)
    return code if _is_printable_byte(code) else _NON_PRINTABLE_BYTES[code - 256]


_NON_PRINTABLE_BYTES = [b for b in range(256) if not _is_printable_byte(b)]
