"""The fp SSM decode step of a W4A16 Mamba2 mixer: in_proj output -> out_proj input.

W4A16 layers keep the stock fp SSM (quamba.md section 2.5) with the SSM state in fp16, as
Quamba2's W4A16 models do ("W4A16: fp16 states"): half the bytes of an fp32 state, which every
decode step reads and writes once per sequence and layer (mamba2-130m: 19 MB of fp32 state a
sequence, more than a third of a W4A16 step's memory traffic at batch 1). Compute is fp32; only
the stored state is rounded.

One decode step per sequence (the references of each part are the spec):

    xbc, conv_state' = causal_conv1d_update_ref(xBC, conv_state, conv_weight, conv_bias)
    y, ssm_state'    = mamba2_state_update_ref(ssm_state, x, dt, A, B, C, D, dt_bias)
                       (the new state in ssm_state's dtype: fp16 in the cache)
    out              = gated_rmsnorm_ref(y, z, norm_weight, I // n_groups, eps)
                       [then hadamard_transform_ref(out): the online Hadamard of out_proj's input]

``mamba2_ssm_decode_cpu`` runs it for a batch in one C call (csrc/mamba2_ssm_decode.c, AVX-512),
states updated in place in vLLM's cache. Where it cannot run (no AVX-512, a non-fp32 model) the
mixer keeps vLLM's own CPU ops, which take fp16 states too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

import torch

from . import _simd
from .causal_conv1d import causal_conv1d_update_ref
from .gated_rmsnorm import gated_rmsnorm_ref
from .hadamard import hadamard_numba_constants, hadamard_transform_ref
from .quant import f32_contiguous
from .selective_state_update import mamba2_state_update_ref

# The SSM state dtype of W4A16 layers (the conv state keeps the model's dtype).
FP_SSM_STATE_DTYPE = torch.float16


@dataclasses.dataclass
class Mamba2SSMParams:
    """One W4A16 layer's fp SSM tensors (the stock mixer's, after loading: A = -exp(A_log))."""

    conv_weight: torch.Tensor  # [conv_dim, K]
    conv_bias: torch.Tensor | None  # [conv_dim]
    A: torch.Tensor  # [H]
    D: torch.Tensor  # [H]
    dt_bias: torch.Tensor  # [H]
    norm_weight: torch.Tensor  # [I]
    norm_eps: float
    n_groups: int
    state_size: int
    head_dim: int

    @property
    def num_heads(self) -> int:
        return self.A.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.conv_weight.shape[0]

    @property
    def in_proj_dim(self) -> int:
        return self.intermediate_size + self.conv_dim + self.num_heads


def mamba2_ssm_decode_ref(
    zxbcdt: torch.Tensor,
    p: Mamba2SSMParams,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    rotate_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """zxbcdt [B, in_proj_dim], conv_state [B, K-1, conv_dim], ssm_state [B, H, P, N] ->
    (out f32 [B, I], new conv_state, new ssm_state), new states in the given states' dtypes.

    Functional: the states are not modified.
    """
    batch, intermediate, gs = zxbcdt.shape[0], p.intermediate_size, p.n_groups * p.state_size
    z, xbc, dt = torch.split(zxbcdt.to(torch.float32), [intermediate, p.conv_dim, p.num_heads], dim=-1)
    xbc, conv_new = causal_conv1d_update_ref(xbc, conv_state, p.conv_weight, p.conv_bias)
    x, B, C = torch.split(xbc, [intermediate, gs, gs], dim=-1)
    y, ssm_new = mamba2_state_update_ref(
        ssm_state, x.reshape(batch, p.num_heads, p.head_dim), dt, p.A,
        B.reshape(batch, p.n_groups, p.state_size), C.reshape(batch, p.n_groups, p.state_size), p.D, p.dt_bias,
    )  # fmt: skip
    out = gated_rmsnorm_ref(y.reshape(batch, intermediate), z, p.norm_weight, intermediate // p.n_groups, p.norm_eps)
    return (hadamard_transform_ref(out) if rotate_output else out), conv_new, ssm_new


@functools.cache
def _simd_decode():
    """csrc/mamba2_ssm_decode.c's decode step, or None where this CPU lacks AVX-512 (the
    library's AVX-512 check is its VNNI one; every such CPU has the fp16 conversions too)."""
    p, i64 = _simd.POINTER, _simd.INT64
    return _simd.function(
        "quamba_mamba2_ssm_decode_avx512", "avx512_vnni", p, p, i64, p, p, i64, i64, i64, p, i64, p
    )


class _DecodeLayer(ctypes.Structure):
    """csrc/mamba2_ssm_decode.c's struct mamba2_decode_layer: pointers into the fp32 arrays kept
    with it (``_LayerArrays``) and the layer's scalars."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in (
            "conv_weight_t", "conv_bias", "dt_bias", "A", "D", "norm_weight", "hadamard_base",
        )),
        ("hadamard_m", ctypes.c_int64),
        ("hadamard_scale", ctypes.c_float),
        ("norm_eps", ctypes.c_float),
        *((name, ctypes.c_int64) for name in ("num_heads", "head_dim", "state_size", "n_groups", "conv_kernel")),
    ]  # fmt: skip


@dataclasses.dataclass
class _LayerArrays:
    """The C struct and the fp32 copies its pointers point into (kept alive together)."""

    struct: _DecodeLayer
    tensors: tuple


def _decode_layer(p: Mamba2SSMParams, rotate: bool) -> _DecodeLayer:
    """The C kernel's layer struct for p (with or without the output rotation), built once and
    kept on p: the layer's tensors never change after loading."""
    key = f"_decode_layer_{rotate}"
    arrays = p.__dict__.get(key)
    if arrays is None:
        f32 = [f32_contiguous(t.detach()) for t in (p.conv_weight.T, p.dt_bias, p.A, p.D, p.norm_weight)]
        bias = None if p.conv_bias is None else f32_contiguous(p.conv_bias.detach())
        base, scale = hadamard_numba_constants(p.intermediate_size) if rotate else (None, 0.0)
        conv_weight_t, dt_bias, A, D, norm_weight = f32
        struct = _DecodeLayer(
            conv_weight_t=conv_weight_t.data_ptr(), conv_bias=None if bias is None else bias.data_ptr(),
            dt_bias=dt_bias.data_ptr(), A=A.data_ptr(), D=D.data_ptr(), norm_weight=norm_weight.data_ptr(),
            hadamard_base=None if base is None else base.ctypes.data, hadamard_m=0 if base is None else base.shape[0],
            hadamard_scale=scale,
            norm_eps=p.norm_eps, num_heads=p.num_heads, head_dim=p.head_dim, state_size=p.state_size,
            n_groups=p.n_groups, conv_kernel=p.conv_weight.shape[1],
        )  # fmt: skip
        arrays = p.__dict__[key] = _LayerArrays(struct, (*f32, bias, base))
    return arrays.struct


def simd_decode_runs(zxbcdt: torch.Tensor, conv_cache: torch.Tensor, ssm_cache: torch.Tensor) -> bool:
    """Whether mamba2_ssm_decode_cpu can take this step: an AVX-512 CPU, fp32 activations and
    conv state, the fp16 SSM state."""
    return (
        _simd_decode() is not None
        and zxbcdt.dtype == conv_cache.dtype == torch.float32
        and ssm_cache.dtype == FP_SSM_STATE_DTYPE
    )


def _check_caches(p: Mamba2SSMParams, conv_cache: torch.Tensor, ssm_cache: torch.Tensor) -> None:
    conv_shape = (p.conv_weight.shape[1] - 1, p.conv_dim)
    ssm_shape = (p.num_heads, p.head_dim, p.state_size)
    if conv_cache.dtype != torch.float32 or tuple(conv_cache.shape[1:]) != conv_shape:
        raise ValueError(f"the conv cache must hold float32 {conv_shape} slots, got {conv_cache.dtype} {tuple(conv_cache.shape)}")
    contiguous_slot = (ssm_shape[1] * ssm_shape[2], ssm_shape[2], 1)
    if (
        ssm_cache.dtype != FP_SSM_STATE_DTYPE
        or tuple(ssm_cache.shape[1:]) != ssm_shape
        or ssm_cache.stride()[1:] != contiguous_slot
    ):
        raise ValueError(
            f"the SSM cache must hold contiguous {FP_SSM_STATE_DTYPE} {ssm_shape} slots, got "
            f"{ssm_cache.dtype} {tuple(ssm_cache.shape)} strides {ssm_cache.stride()}"
        )


def mamba2_ssm_decode_cpu(
    zxbcdt: torch.Tensor,
    p: Mamba2SSMParams,
    conv_cache: torch.Tensor,
    ssm_cache: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor,
    rotate_output: bool = False,
) -> torch.Tensor:
    """mamba2_ssm_decode_ref for B sequences in one C call, states updated in place.

    zxbcdt f32 [B, in_proj_dim]; conv_cache f32 [num_slots, K-1, conv_dim] (any strides);
    ssm_cache fp16 [num_slots, H, P, N] (each slot contiguous); slots [B] distinct slot numbers;
    out f32 [B, I], contiguous. Raises RuntimeError where simd_decode_runs says no kernel runs.
    """
    kernel = _simd_decode()
    if kernel is None:
        raise RuntimeError("the fp SSM decode kernel needs an x86 CPU with AVX-512 and the built C kernels")
    _check_caches(p, conv_cache, ssm_cache)
    if slots.dim() != 1 or zxbcdt.shape != (slots.shape[0], p.in_proj_dim):
        raise ValueError(
            f"zxbcdt must be [{slots.shape[0] if slots.dim() == 1 else 'B'}, {p.in_proj_dim}] for one slot "
            f"per row, got zxbcdt {tuple(zxbcdt.shape)} and slots {tuple(slots.shape)}"
        )
    if out.dtype != torch.float32 or not out.is_contiguous() or out.shape != (zxbcdt.shape[0], p.intermediate_size):
        raise ValueError(f"out must be a contiguous float32 [{zxbcdt.shape[0]}, {p.intermediate_size}] tensor")
    zxbcdt = f32_contiguous(zxbcdt)
    slots = slots.to(torch.int64).contiguous()
    status = kernel(
        ctypes.byref(_decode_layer(p, rotate_output)), zxbcdt.data_ptr(), zxbcdt.shape[0], slots.data_ptr(),
        conv_cache.data_ptr(), *conv_cache.stride(), ssm_cache.data_ptr(), ssm_cache.stride(0), out.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the fp SSM decode kernel could not allocate its work space")
    return out
