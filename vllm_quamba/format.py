"""The quamba checkpoint format, defined once.

The converter writes it (``converters/``) and the vLLM plugin reads it (``config.py``,
``layers/``); both import this module, which imports neither vLLM nor the converter.

A quamba checkpoint is a transformers-style directory (``config.json`` with the original
``architectures``, tokenizer files, ``model.safetensors``) whose ``config.json`` carries a
``quantization_config`` built from compressed-tensors' own models, with ``quant_method``
set to ``"quamba"`` and a ``"quamba"`` section for everything compressed-tensors has no
field for.

Tensor names keep the transformers names of the source model (``backbone.layers.{i}.mixer.*``)
so that vLLM's Mamba loaders find them. Per quantized Mamba2 mixer (W8A8), besides the
unchanged fp ``dt_bias`` and gated-norm ``norm.weight`` (both already permuted):

==============================  ==========  ===========================  =========================
name (under ``...mixer.``)      dtype       shape                        meaning
==============================  ==========  ===========================  =========================
in_proj.weight                  int8        [2I+2GN+H, D]                rows permuted, Hadamard fused
in_proj.weight_scale            float32     [2I+2GN+H, 1]                per output channel
in_proj.input_scale             float32     [1]                          static, block-norm output
out_proj.weight                 int8        [D, I]                       both Hadamards fused
out_proj.weight_scale           float32     [D, 1]                       per output channel
out_proj.input_scale            float32     [1]                          static, after online Hadamard
z_scale                         float32     [1]                          in_proj output z
dt_scale                        float32     [1]                          in_proj output dt (raw)
conv1d.input_scale              float32     [3]                          in_proj output x, B, C
conv1d.weight                   int8        [I+2GN, 1, K]                per-segment scales
conv1d.weight_scale             float32     [3]                          x, B, C segments
conv1d.bias                     int8        [I+2GN]
conv1d.bias_scale               float32     [3]                          x, B, C segments
x_scales                        float32     [G, HG, DG]                  conv output x (SSM input)
x_head_group_range              int32       [G, HG]                      cumsum of head-group sizes
x_dim_group_range               int32       [G, HG, DG]                  cumsum of dim-group sizes
B_scale, C_scale                float32     [G]                          conv output B and C
A_log                           int8        [H]
A_log_scale                     float32     [1]
D                               int8        [H]
D_scale                         float32     [1]
ssm_state_scale                 float32     [G, HG, DG, N]               int8 decode state
==============================  ==========  ===========================  =========================

I = d_inner (intermediate_size), G = n_groups, N = d_state (state_size), H = num_heads,
D = hidden_size, K = conv_kernel, HG/DG = head/dim groups of the sort-and-cluster step.
Heads and channels are already permuted: the checkpoint is self-consistent.

Per quantized Mamba1 mixer (Quamba W8A8, quamba.md sections 1 and 2.4; the numerics are
``kernels.quamba_ssm``). The fp ``dt_proj.bias`` of the source becomes the int8 ``dt_bias``:

==============================  ==========  ===========================  =========================
name (under ``...mixer.``)      dtype       shape                        meaning
==============================  ==========  ===========================  =========================
in_proj.weight                  int8        [2I, D]                      rows x then z; Hadamard fused
in_proj.weight_scale            float32     [2I, 1]                      per output channel
in_proj.input_scale             float32     [1]                          static, block-norm output
x_scale                         float32     [1]                          in_proj output x (conv input)
z_scale                         float32     [1]                          in_proj output z (gate)
conv1d.weight                   int8        [I, 1, K]                    depthwise
conv1d.weight_scale             float32     [1]                          per tensor
conv1d.bias                     int8        [I]
conv1d.bias_scale               float32     [1]                          per tensor
x_proj.weight                   int8        [R+2N, I]                    rows dt_low, B, C
x_proj.weight_scale             float32     [R+2N, 1]                    per output channel
x_proj.input_scale              float32     [1]                          SSM input u (percentile)
x_proj.output_scale             float32     [1]                          shared by dt_low, B and C
dt_proj.weight                  int8        [I, R]                       no bias (it is dt_bias)
dt_proj.weight_scale            float32     [I, 1]                       per output channel
dt_proj.input_scale             float32     [1]                          = x_proj.output_scale
dt_scale                        float32     [1]                          dt_proj output (raw dt)
A_log                           int8        [I, N]
A_log_scale                     float32     [1]
D                               int8        [I]
D_scale                         float32     [1]
dt_bias                         int8        [I]                          added before softplus
dt_bias_scale                   float32     [1]
ssm_state_scale                 float32     [1]                          int8 state (percentile)
out_proj.weight                 int8        [D, I]                       Hadamards fused
out_proj.weight_scale           float32     [D, 1]                       per output channel
out_proj.input_scale            float32     [1]                          after the online Hadamard
==============================  ==========  ===========================  =========================

R = time_step_rank (dt_rank). Whether the residual stream is rotated and out_proj's input gets
the online Hadamard is recorded in ``quamba.hadamard`` (null: neither, the naive baseline), for
both architectures. The Mamba2 naive W8A8 baseline keeps the W8A8 table above with no
sort-and-cluster: heads and channels in their source order, ``quamba.x_head_groups`` and
``x_dim_groups`` 1, every head and dim in the first group (``x_head_group_range`` all
H/G, ``x_dim_group_range`` all P = head_dim), and one absmax scale each for x, B, C and the
SSM state, repeated over its scale tensor.
Mamba1 W4A8 and W4A16 (Quamba2, quamba.md section 2.5): ``mamba1_mixer_tensors``; the 4-bit
linears are ``linear_tensors`` and dt_proj's precision is ``mamba1_linear_precision``.

W4AX (both architectures): recipe ``"w4ax"`` and ``quamba.layer_precision``, a list with one of
``W4_PRECISIONS`` per decoder layer; each layer's mixer holds exactly the tensors of its
precision's table (``layer_precision(section, layer)``), and ``ssm_state_dtype`` is "int8" when
any layer keeps int8 states.

Head to toe (Mamba2, ``--quantize-embedding`` / ``--quantize-lm-head``; ``quamba.embedding`` is
null, "int8" or "int4" and ``quamba.lm_head`` null or a precision). The untied ``lm_head`` is a
linear [V, D] at the recipe's precision, exactly ``linear_tensors(V, D, precision)`` (its static
``input_scale`` is calibrated on the final-norm output). The embedding is compressed-tensors'
``pack-quantized`` channel-wise weight-only format, the one vLLM's own
``CompressedTensorsEmbeddingWNA16Int`` reads (``embedding_tensors(V, D, bits)``):

==============================  ==========  ===========================  =========================
name (under ``backbone.``)      dtype       shape                        meaning
==============================  ==========  ===========================  =========================
embeddings.weight_packed        int32       [V, D * bits / 32]           pack_to_int32(q, bits)
embeddings.weight_scale         float32     [V, 1]                       per row: q * scale
embeddings.weight_shape         int64       [2]                          [V, D]
==============================  ==========  ===========================  =========================

V = vocab_size. 8-bit rows use absmax/127; 4-bit rows absmax*2/15 with q clamped to [-8, 7].
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .kernels.quamba2_ssm import Quamba2SSMParams
    from .kernels.quamba_ssm import QuambaSSMParams

QUANT_METHOD = "quamba"
METHOD_VERSION = 1
RECIPES = ("w8a8", "w4a8", "w4a16", "w4ax")
SUPPORTED_ARCHITECTURES = {"Mamba2ForCausalLM": "mamba2", "MambaForCausalLM": "mamba"}

# Sort-and-cluster group counts of Quamba2 (quamba.md section 2.1).
HEAD_GROUPS = 4
DIM_GROUPS = 4

WEIGHTS_FILE = "model.safetensors"
# Per-layer precisions: a recipe gives every layer one (w4ax: one per layer, from the
# ``quamba.layer_precision`` list).
PRECISIONS = ("w8a8", "w4a8", "w4a16")
W4_PRECISIONS = ("w4a8", "w4a16")
W4_GROUP_SIZE = 128
# The two linears of a Mamba2 mixer that every recipe quantizes.
MAMBA2_QUANTIZED_LINEARS = ("in_proj", "out_proj")
# The four linears of a Mamba1 mixer that the W8A8 recipe quantizes.
MAMBA1_QUANTIZED_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")
# Module names of the head-to-toe layers (--quantize-embedding / --quantize-lm-head).
EMBEDDING = "backbone.embeddings"
LM_HEAD = "lm_head"


@dataclasses.dataclass(frozen=True)
class Mamba2Shapes:
    """The sizes of one Mamba2 mixer, read from a transformers ``Mamba2Config`` dict."""

    hidden_size: int
    intermediate_size: int
    n_groups: int
    state_size: int
    num_heads: int
    head_dim: int
    conv_kernel: int
    num_layers: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Mamba2Shapes":
        hidden = cfg["hidden_size"]
        heads = cfg["num_heads"]
        head_dim = cfg["head_dim"]
        intermediate = cfg.get("intermediate_size") or int(cfg.get("expand", 2) * hidden)
        if heads * head_dim != intermediate:
            raise ValueError(
                f"num_heads*head_dim = {heads}*{head_dim} != intermediate_size {intermediate}"
            )
        return cls(
            hidden_size=hidden,
            intermediate_size=intermediate,
            n_groups=cfg.get("n_groups", 1),
            state_size=cfg["state_size"],
            num_heads=heads,
            head_dim=head_dim,
            conv_kernel=cfg.get("conv_kernel", 4),
            num_layers=cfg["num_hidden_layers"],
        )

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def in_proj_dim(self) -> int:
        return self.intermediate_size + self.conv_dim + self.num_heads


def linear_tensors(
    rows: int, cols: int, precision: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Relative name -> (shape, dtype) of one quantized linear [rows, cols] at ``precision``.

    W8A8: compressed-tensors ``int-quantized`` (int8 ``weight``, per-row ``weight_scale``,
    static per-tensor ``input_scale``). W4A8/W4A16: ``pack-quantized`` (``weight_packed`` int32
    holding 8 nibbles along the input dim, ``weight_scale`` per row and ``w4_group_size``
    group, ``weight_shape``); W4A8 adds the static int8 ``input_scale``.
    """
    f32 = torch.float32
    if precision == "w8a8":
        return {
            "weight": ((rows, cols), torch.int8),
            "weight_scale": ((rows, 1), f32),
            "input_scale": ((1,), f32),
        }
    if precision not in W4_PRECISIONS:
        raise QuambaFormatError(f"unknown layer precision {precision!r}; expected one of {PRECISIONS}")
    table = {
        "weight_packed": ((rows, -(-cols // 8)), torch.int32),
        "weight_scale": ((rows, cols // w4_group_size(cols)), f32),
        "weight_shape": ((2,), torch.int64),
    }
    if precision == "w4a8":
        table["input_scale"] = ((1,), f32)
    return table


def w4_group_size(cols: int) -> int:
    """The 4-bit group size along a linear's input dim: 128, or the whole row when shorter."""
    group = min(W4_GROUP_SIZE, cols)
    if cols % group:
        raise QuambaFormatError(
            f"a 4-bit linear with {cols} input features cannot use groups of {group}"
        )
    return group


EMBEDDING_BITS = {"int8": 8, "int4": 4}


def embedding_tensors(rows: int, cols: int, bits: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Relative name -> (shape, dtype) of a ``bits``-bit quantized embedding [rows, cols]."""
    values_per_word = 32 // bits
    if bits not in EMBEDDING_BITS.values() or cols % values_per_word:
        raise QuambaFormatError(
            f"a {bits}-bit embedding of width {cols} cannot be packed ({values_per_word} values per int32)"
        )
    return {
        "weight_packed": ((rows, cols // values_per_word), torch.int32),
        "weight_scale": ((rows, 1), torch.float32),
        "weight_shape": ((2,), torch.int64),
    }


def head_to_toe_tensors(
    section: dict[str, Any], vocab_size: int, hidden_size: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Full name -> (shape, dtype) of the quantized embedding and lm_head that a ``quamba``
    section declares; empty when it quantizes neither."""
    table = {}
    if section.get("embedding"):
        bits = EMBEDDING_BITS[section["embedding"]]
        for rel, spec in embedding_tensors(vocab_size, hidden_size, bits).items():
            table[f"{EMBEDDING}.{rel}"] = spec
    if section.get("lm_head"):
        for rel, spec in linear_tensors(vocab_size, hidden_size, section["lm_head"]).items():
            table[f"{LM_HEAD}.{rel}"] = spec
    return table


def mamba2_mixer_tensors(
    s: Mamba2Shapes, precision: str = "w8a8"
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor of one Mamba2 mixer at ``precision``.

    W8A8 and W4A8 share the int8 SSM tensors of the table above and differ in their two
    linears. W4A16 keeps the fp SSM tensors of the source (already rotated, not permuted).
    """
    f32 = torch.float32
    linears = {
        f"{name}.{rel}": spec
        for name, (rows, cols) in (
            ("in_proj", (s.in_proj_dim, s.hidden_size)),
            ("out_proj", (s.hidden_size, s.intermediate_size)),
        )
        for rel, spec in linear_tensors(rows, cols, precision).items()
    }
    if precision == "w4a16":
        H = s.num_heads
        return {
            **linears,
            "conv1d.weight": ((s.conv_dim, 1, s.conv_kernel), f32),
            "conv1d.bias": ((s.conv_dim,), f32),
            "A_log": ((H,), f32),
            "D": ((H,), f32),
            "dt_bias": ((H,), f32),
            "norm.weight": ((s.intermediate_size,), f32),
        }
    return {**linears, **_mamba2_int8_ssm_tensors(s)}


def _mamba2_int8_ssm_tensors(s: Mamba2Shapes) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    f32, i8, i32 = torch.float32, torch.int8, torch.int32
    G, N, H = s.n_groups, s.state_size, s.num_heads
    return {
        "z_scale": ((1,), f32),
        "dt_scale": ((1,), f32),
        "conv1d.input_scale": ((3,), f32),
        "conv1d.weight": ((s.conv_dim, 1, s.conv_kernel), i8),
        "conv1d.weight_scale": ((3,), f32),
        "conv1d.bias": ((s.conv_dim,), i8),
        "conv1d.bias_scale": ((3,), f32),
        "x_scales": ((G, HEAD_GROUPS, DIM_GROUPS), f32),
        "x_head_group_range": ((G, HEAD_GROUPS), i32),
        "x_dim_group_range": ((G, HEAD_GROUPS, DIM_GROUPS), i32),
        "B_scale": ((G,), f32),
        "C_scale": ((G,), f32),
        "A_log": ((H,), i8),
        "A_log_scale": ((1,), f32),
        "D": ((H,), i8),
        "D_scale": ((1,), f32),
        "dt_bias": ((H,), f32),
        "norm.weight": ((s.intermediate_size,), f32),
        "ssm_state_scale": ((G, HEAD_GROUPS, DIM_GROUPS, N), f32),
    }


@dataclasses.dataclass(frozen=True)
class MambaShapes:
    """The sizes of one Mamba1 mixer, read from a transformers ``MambaConfig`` dict."""

    hidden_size: int
    intermediate_size: int
    state_size: int
    time_step_rank: int
    conv_kernel: int
    num_layers: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "MambaShapes":
        hidden = cfg["hidden_size"]
        rank = cfg.get("time_step_rank", "auto")
        return cls(
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size") or int(cfg.get("expand", 2) * hidden),
            state_size=cfg.get("state_size", 16),
            time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
            conv_kernel=cfg.get("conv_kernel", 4),
            num_layers=cfg["num_hidden_layers"],
        )

    @property
    def x_proj_dim(self) -> int:
        return self.time_step_rank + 2 * self.state_size


def mamba1_linear_precision(layer_precision: str, linear: str) -> str | None:
    """The precision of Mamba1 mixer ``linear`` in a layer at ``layer_precision``; None: fp.

    Quamba2's 4-bit kernel cannot take K = dt_rank, so dt_proj stays W8A8 in W4A8 layers and
    fp in W4A16 ones (quamba.md section 2.5); every other linear has its layer's precision.
    """
    if linear == "dt_proj" and layer_precision in W4_PRECISIONS:
        return "w8a8" if layer_precision == "w4a8" else None
    return layer_precision


def mamba1_mixer_tensors(
    s: MambaShapes, precision: str = "w8a8"
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor of one Mamba1 mixer at ``precision``.

    W8A8 is the table above; W4A8 has the same tensors except that in_proj, x_proj and
    out_proj are 4-bit (``linear_tensors``). W4A16 keeps the fp SSM of the source (rotated):
    4-bit in_proj/x_proj/out_proj, fp dt_proj (with its bias), conv1d, A_log and D.
    """
    f32 = torch.float32
    I, D, N, R = s.intermediate_size, s.hidden_size, s.state_size, s.time_step_rank
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for linear, (rows, cols) in (
        ("in_proj", (2 * I, D)), ("x_proj", (R + 2 * N, I)), ("dt_proj", (I, R)), ("out_proj", (D, I))
    ):
        linear_precision = mamba1_linear_precision(precision, linear)
        if linear_precision is not None:
            out.update({f"{linear}.{rel}": spec for rel, spec in linear_tensors(rows, cols, linear_precision).items()})
    if precision == "w4a16":
        out.update({
            "dt_proj.weight": ((I, R), f32),
            "dt_proj.bias": ((I,), f32),
            "conv1d.weight": ((I, 1, s.conv_kernel), f32),
            "conv1d.bias": ((I,), f32),
            "A_log": ((I, N), f32),
            "D": ((I,), f32),
        })
        return out
    return {**out, **_mamba1_int8_ssm_tensors(s)}


def _mamba1_int8_ssm_tensors(s: MambaShapes) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    f32, i8 = torch.float32, torch.int8
    I, N = s.intermediate_size, s.state_size
    one = ((1,), f32)
    return {
        "x_scale": one,
        "z_scale": one,
        "x_proj.output_scale": one,
        "dt_scale": one,
        "conv1d.weight": ((I, 1, s.conv_kernel), i8),
        "conv1d.weight_scale": one,
        "conv1d.bias": ((I,), i8),
        "conv1d.bias_scale": one,
        "A_log": ((I, N), i8),
        "A_log_scale": one,
        "D": ((I,), i8),
        "D_scale": one,
        "dt_bias": ((I,), i8),
        "dt_bias_scale": one,
        "ssm_state_scale": one,
    }


def mixer_prefix(layer: int) -> str:
    return f"backbone.layers.{layer}.mixer."


class QuambaFormatError(ValueError):
    """A checkpoint that does not follow this format; the message names the tensor or field."""


def check_spec(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, expected_shape: tuple[int, ...], expected_dtype: torch.dtype
) -> None:
    """Raise QuambaFormatError naming ``name`` unless its shape and dtype are the expected ones."""
    if tuple(shape) != tuple(expected_shape):
        raise QuambaFormatError(
            f"quamba checkpoint tensor {name!r} has shape {tuple(shape)}, expected {tuple(expected_shape)}"
        )
    if dtype != expected_dtype:
        raise QuambaFormatError(
            f"quamba checkpoint tensor {name!r} has dtype {dtype}, expected {expected_dtype}"
        )


def check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise QuambaFormatError naming ``name`` unless the tensor has this shape, dtype, finite values."""
    check_spec(name, tensor.shape, tensor.dtype, shape, dtype)
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise QuambaFormatError(f"quamba checkpoint tensor {name!r} contains NaN or Inf")


def quamba_section(quantization_config: dict[str, Any]) -> dict[str, Any]:
    """The ``quamba`` section of a ``quantization_config``, validated."""
    method = str(quantization_config.get("quant_method", "")).lower()
    if method != QUANT_METHOD:
        raise QuambaFormatError(
            f"quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}"
        )
    section = quantization_config.get("quamba")
    if not isinstance(section, dict):
        raise QuambaFormatError("quantization_config has no 'quamba' section")
    for key in ("recipe", "method_version", "architecture"):
        if key not in section:
            raise QuambaFormatError(f"quantization_config.quamba.{key} is missing")
    if section["recipe"] not in RECIPES:
        raise QuambaFormatError(
            f"quantization_config.quamba.recipe is {section['recipe']!r}, expected one of {RECIPES}"
        )
    if section["recipe"] == "w4ax":
        chosen = section.get("layer_precision")
        if not isinstance(chosen, list) or not chosen or any(p not in W4_PRECISIONS for p in chosen):
            raise QuambaFormatError(
                "quantization_config.quamba.layer_precision must list one of "
                f"{W4_PRECISIONS} per layer for recipe 'w4ax', got {chosen!r}"
            )
    if section["method_version"] != METHOD_VERSION:
        raise QuambaFormatError(
            f"quantization_config.quamba.method_version is {section['method_version']!r}; "
            f"this vllm-quamba reads version {METHOD_VERSION}"
        )
    for key, allowed in (("embedding", tuple(EMBEDDING_BITS)), ("lm_head", PRECISIONS)):
        if section.get(key) not in (None, *allowed):
            raise QuambaFormatError(
                f"quantization_config.quamba.{key} is {section[key]!r}, expected null or one of {allowed}"
            )
        if section.get(key) and section["architecture"] != "mamba2":
            raise QuambaFormatError(
                f"quantization_config.quamba.{key} is set, but a quantized embedding/lm_head is "
                f"implemented for Mamba2 only (architecture {section['architecture']!r})"
            )
    return section


def check_layer_count(section: dict[str, Any], num_layers: int) -> None:
    """A validated W4AX ``quamba`` section lists one precision per decoder layer, no more, no
    fewer (``num_layers``: the model's num_hidden_layers)."""
    if section["recipe"] == "w4ax" and len(section["layer_precision"]) != num_layers:
        raise QuambaFormatError(
            f"quantization_config.quamba.layer_precision has {len(section['layer_precision'])} "
            f"entries, but the model has {num_layers} layers (num_hidden_layers): it needs one "
            "per layer; convert the checkpoint again"
        )


def layer_precision(section: dict[str, Any], layer: int) -> str:
    """The precision of decoder layer ``layer`` under a validated ``quamba`` section."""
    if section["recipe"] != "w4ax":
        return section["recipe"]
    chosen = section["layer_precision"]
    if not 0 <= layer < len(chosen):
        raise QuambaFormatError(
            f"quantization_config.quamba.layer_precision has {len(chosen)} entries; layer {layer} has none"
        )
    return chosen[layer]


def online_hadamard(section: dict[str, Any]) -> bool:
    """Whether out_proj's input gets the online Hadamard under a ``quamba`` section: unless
    ``hadamard`` is null (the naive baseline)."""
    return section.get("hadamard") is not None


def _per_segment(scales: torch.Tensor, s: Mamba2Shapes) -> torch.Tensor:
    """Expand [3] per-segment (x, B, C) scales to one per conv channel."""
    group_state = s.n_groups * s.state_size
    sizes = torch.tensor([s.intermediate_size, group_state, group_state])
    return scales.float().repeat_interleave(sizes)


def mamba2_ssm_params(
    tensors: dict[str, torch.Tensor], s: Mamba2Shapes, norm_eps: float, chunk_size: int
) -> "Quamba2SSMParams":
    """Build the runtime/simulation parameters of one W8A8 Mamba2 mixer from its tensors.

    ``tensors`` maps the mixer-relative names of the table above to tensors.
    """
    from .kernels.quamba2_ssm import Quamba2SSMParams, expand_group_scales
    from .kernels.quant import dequantize_int8

    t = tensors
    head_range, dim_range = t["x_head_group_range"].long(), t["x_dim_group_range"].long()
    x_scale = expand_group_scales(t["x_scales"], head_range, dim_range, s.num_heads, s.head_dim)
    conv_weight_scale = _per_segment(t["conv1d.weight_scale"], s)
    return Quamba2SSMParams(
        intermediate_size=s.intermediate_size,
        n_groups=s.n_groups,
        state_size=s.state_size,
        head_dim=s.head_dim,
        chunk_size=chunk_size,
        norm_eps=norm_eps,
        z_scale=t["z_scale"].float(),
        dt_scale=t["dt_scale"].float(),
        xbc_in_scale=_per_segment(t["conv1d.input_scale"], s),
        conv_weight=dequantize_int8(t["conv1d.weight"].reshape(s.conv_dim, -1), conv_weight_scale[:, None]),
        conv_bias=dequantize_int8(t["conv1d.bias"], _per_segment(t["conv1d.bias_scale"], s)),
        xbc_out_scale=torch.cat(
            [x_scale.reshape(-1)]
            + [t[name].float().repeat_interleave(s.state_size) for name in ("B_scale", "C_scale")]
        ),
        A=-torch.exp(dequantize_int8(t["A_log"], t["A_log_scale"])),
        D=dequantize_int8(t["D"], t["D_scale"]),
        dt_bias=t["dt_bias"].float(),
        norm_weight=t["norm.weight"].float(),
        state_scale=expand_group_scales(
            t["ssm_state_scale"], head_range, dim_range, s.num_heads, s.head_dim
        ),
    )


def mamba1_ssm_params(tensors: dict[str, torch.Tensor], s: MambaShapes) -> "QuambaSSMParams":
    """Build the runtime/simulation parameters of one W8A8 Mamba1 mixer from its tensors.

    ``tensors`` maps the mixer-relative names of the Mamba1 table above to tensors.
    """
    from .kernels.quamba_ssm import QuambaSSMParams
    from .kernels.quant import dequantize_int8

    t = tensors
    return QuambaSSMParams(
        intermediate_size=s.intermediate_size,
        state_size=s.state_size,
        time_step_rank=s.time_step_rank,
        x_scale=t["x_scale"].float(),
        z_scale=t["z_scale"].float(),
        u_scale=t["x_proj.input_scale"].float(),
        x_proj_out_scale=t["x_proj.output_scale"].float(),
        dt_scale=t["dt_scale"].float(),
        conv_weight=dequantize_int8(t["conv1d.weight"].reshape(s.intermediate_size, -1), t["conv1d.weight_scale"]),
        conv_bias=dequantize_int8(t["conv1d.bias"], t["conv1d.bias_scale"]),
        A=-torch.exp(dequantize_int8(t["A_log"], t["A_log_scale"])),
        D=dequantize_int8(t["D"], t["D_scale"]),
        dt_bias=dequantize_int8(t["dt_bias"], t["dt_bias_scale"]),
        state_scale=t["ssm_state_scale"].float(),
    )
