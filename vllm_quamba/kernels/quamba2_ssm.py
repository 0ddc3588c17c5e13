"""Quamba2 W8A8 SSM path of one Mamba2 mixer: in_proj output -> gated-norm output.

This is the numerics spec shared by the converter's simulated-quantization forward and the
vLLM runtime mixer: both call these functions, so they quantize at the same points
(quamba.md section 2):

1. the in_proj output is split into z, xBC, dt and each part is quantized to int8 with a static
   per-tensor scale (x, B and C of xBC each have their own);
2. the int8 causal conv1d (int8 weight and bias, per-segment scales) with SiLU; its output x is
   requantized with the sort-and-cluster scales (one per SSD group, head group and dim group),
   B and C with one scale per SSD group;
3. the SSD scan on the dequantized int8 operands (A and D are int8 too, dt_bias stays fp);
   the final state is stored as int8 with per-(group, head group, dim group, state) scales;
4. the gated RMSNorm on the fp scan output and the dequantized int8 z.

The conv state holds int8 in_proj outputs, which lie exactly on the int8 grid, so keeping it in
int8 loses nothing. States are functional here: new states are returned, never written in place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from typing import NamedTuple

import numpy as np
import torch

from . import _simd
from .causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from .gated_rmsnorm import gated_rmsnorm_ref
from .hadamard import hadamard_numba_constants, hadamard_rows_cpu_
from .quant import dequantize_int8, f32_contiguous, quantize_int8
from .selective_state_update import mamba2_state_update_ref
from .ssd_chunk_scan import ssd_chunk_scan_ref


@dataclasses.dataclass
class Quamba2SSMParams:
    """One layer's SSM parameters, dequantized or expanded once so each call is plain math.

    Per-channel scales are expanded from the checkpoint's group scales; the int8 weights are
    kept beside their scales so that fast kernels can use them directly.
    """

    intermediate_size: int
    n_groups: int
    state_size: int
    head_dim: int
    chunk_size: int
    norm_eps: float
    z_scale: torch.Tensor  # [1]
    dt_scale: torch.Tensor  # [1]
    xbc_in_scale: torch.Tensor  # [conv_dim]: int8 grid of the conv input and conv state
    conv_weight: torch.Tensor  # [conv_dim, K] fp32, dequantized from int8
    conv_bias: torch.Tensor  # [conv_dim] fp32, dequantized from int8
    xbc_out_scale: torch.Tensor  # [conv_dim]: x by sort-and-cluster group, B and C by SSD group
    A: torch.Tensor  # [H] = -exp(dequantized A_log)
    D: torch.Tensor  # [H]
    dt_bias: torch.Tensor  # [H]
    norm_weight: torch.Tensor  # [I]
    state_scale: torch.Tensor  # [H, P, N]

    @property
    def num_heads(self) -> int:
        return self.intermediate_size // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def split_in_proj(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)


def expand_group_scales(
    group_scales: torch.Tensor,
    head_group_range: torch.Tensor,
    dim_group_range: torch.Tensor,
    num_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Per-(head, dim) scales from sort-and-cluster group scales.

    group_scales is [G, HG, DG, *rest]; the ranges are cumulative sizes ([G, HG] heads per
    head group inside each SSD group, [G, HG, DG] dims per dim group). A head's group is the
    number of boundaries at or below its offset. Returns [num_heads, head_dim, *rest].
    """
    n_groups = group_scales.shape[0]
    heads_per_group = num_heads // n_groups
    local_head = torch.arange(heads_per_group)
    dims = torch.arange(head_dim)
    rows = []
    for g in range(n_groups):
        head_group = (head_group_range[g].view(1, -1) <= local_head.view(-1, 1)).sum(1)
        for hg in head_group.tolist():
            dim_group = (dim_group_range[g, hg].view(1, -1) <= dims.view(-1, 1)).sum(1)
            rows.append(group_scales[g, hg, dim_group])
    return torch.stack(rows)


def _quantize_in_proj_output(zxbcdt: torch.Tensor, p: Quamba2SSMParams):
    z, xbc, dt = p.split_in_proj(zxbcdt.float())
    z = dequantize_int8(quantize_int8(z, p.z_scale), p.z_scale)
    xbc_q = quantize_int8(xbc, p.xbc_in_scale)
    dt = dequantize_int8(quantize_int8(dt, p.dt_scale), p.dt_scale)
    return z, xbc_q, dt


def _requantize_conv_output(xbc: torch.Tensor, p: Quamba2SSMParams):
    xbc = dequantize_int8(quantize_int8(xbc, p.xbc_out_scale), p.xbc_out_scale)
    group_state = p.n_groups * p.state_size
    x, B, C = torch.split(xbc, [p.intermediate_size, group_state, group_state], dim=-1)
    lead = x.shape[:-1]
    return (
        x.reshape(*lead, p.num_heads, p.head_dim),
        B.reshape(*lead, p.n_groups, p.state_size),
        C.reshape(*lead, p.n_groups, p.state_size),
    )


def _gated_norm(y: torch.Tensor, z: torch.Tensor, p: Quamba2SSMParams) -> torch.Tensor:
    y = y.reshape(*y.shape[:-2], p.intermediate_size)
    return gated_rmsnorm_ref(
        y, z, p.norm_weight, p.intermediate_size // p.n_groups, p.norm_eps
    )


def quamba2_ssm_prefill_ref(
    zxbcdt: torch.Tensor,
    p: Quamba2SSMParams,
    conv_state: torch.Tensor | None,
    ssm_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence of T tokens: zxbcdt [T, in_proj_dim] -> (y [T, I], conv_state, ssm_state).

    conv_state [K-1, conv_dim] and ssm_state [H, P, N] are int8 (None: a fresh sequence).
    """
    z, xbc_q, dt = _quantize_in_proj_output(zxbcdt, p)
    initial_conv = None if conv_state is None else dequantize_int8(conv_state, p.xbc_in_scale)
    xbc, final_conv = causal_conv1d_ref(
        dequantize_int8(xbc_q, p.xbc_in_scale), p.conv_weight, p.conv_bias, initial_conv, "silu"
    )
    x, B, C = _requantize_conv_output(xbc, p)
    initial_ssm = None if ssm_state is None else dequantize_int8(ssm_state, p.state_scale)
    y, final_ssm = ssd_chunk_scan_ref(
        x, dt, p.A, B, C, p.chunk_size, D=p.D, dt_bias=p.dt_bias, dt_softplus=True,
        initial_state=initial_ssm,
    )
    return (
        _gated_norm(y, z, p),
        quantize_int8(final_conv, p.xbc_in_scale),
        quantize_int8(final_ssm, p.state_scale),
    )


def quamba2_ssm_decode_ref(
    zxbcdt: torch.Tensor,
    p: Quamba2SSMParams,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token for each of B sequences: zxbcdt [B, in_proj_dim] -> (y [B, I], states).

    conv_state [B, K-1, conv_dim] and ssm_state [B, H, P, N] are int8.
    """
    z, xbc_q, dt = _quantize_in_proj_output(zxbcdt, p)
    xbc, new_conv = causal_conv1d_update_ref(
        dequantize_int8(xbc_q, p.xbc_in_scale),
        dequantize_int8(conv_state, p.xbc_in_scale),
        p.conv_weight,
        p.conv_bias,
        "silu",
    )
    x, B, C = _requantize_conv_output(xbc, p)
    y, new_ssm = mamba2_state_update_ref(
        dequantize_int8(ssm_state, p.state_scale), x, dt, p.A, B, C, p.D, p.dt_bias,
        dt_softplus=True,
    )
    return (
        _gated_norm(y, z, p),
        quantize_int8(new_conv, p.xbc_in_scale),
        quantize_int8(new_ssm, p.state_scale),
    )


# ----------------------------------------------------------------------------- CPU fast path
#
# The whole batch per call, states read and written in place in the int8 cache, the output
# already gated-normed and (if asked) rotated by the online Hadamard transform. A decode step -
# the conv and dt, the int8 state update (it streams the states, 192 KiB per sequence and layer
# at mamba2-130m), the gated norm and the Hadamard transform - is one call of the C kernel
# csrc/quamba2_ssm_decode.c where the CPU has AVX-512 VNNI (at mamba2-130m, batch 1: 44 us a
# layer, against 95 us for numba's phases around the C state update, ~24 us of it their calls),
# else of numba's decode_kernel; both make the same fp32 operations, so their int8 states are
# equal and their outputs differ only in the order of two sums. Prefills are one numba call,
# then the Hadamard transform of all rows (hadamard.hadamard_rows_cpu_). Equal to the
# references above up to fp32 rounding order (exp, the conv and y = state . C sums, the
# Hadamard base matmul), which moves an int8 value by one step only where the reference's
# value lies within rounding error of a tie.


class Quamba2CpuWeights(NamedTuple):
    """A layer's Quamba2SSMParams as the numba kernels read them (numpy, fp32 unless noted).

    The inverse scales are torch's fp32 reciprocals, the ones quant.quantize_int8 multiplies
    by. The SSM state scale [H, P, N] repeats one N-vector per (group, head group, dim group):
    it is kept as those distinct rows (state_scale_table [R, N]) and each state row's index
    into them (state_scale_row [H*P], int64), so a decode step reads kilobytes of scales.
    """

    xbc_in_scale: np.ndarray
    xbc_in_inv: np.ndarray
    conv_weight_t: np.ndarray  # [K, conv_dim]: taps outermost, channels contiguous
    conv_bias: np.ndarray
    xbc_out_scale: np.ndarray
    xbc_out_inv: np.ndarray
    z_scale: np.float32
    z_inv: np.float32
    dt_scale: np.float32
    dt_inv: np.float32
    dt_bias: np.ndarray
    A: np.ndarray
    D: np.ndarray
    norm_weight: np.ndarray
    norm_eps: np.float32
    state_scale_row: np.ndarray
    state_scale_table: np.ndarray
    state_inv_table: np.ndarray
    hadamard_base: np.ndarray  # [m, m] +-1 base matrix of hadamard.py for n = I
    hadamard_scale: np.float32
    rotate: bool  # whether numba's decode ends with the Hadamard transform
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int


def _numpy_f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _scalar_pair(scale: torch.Tensor) -> tuple[np.float32, np.float32]:
    scale = scale.to(torch.float32).reshape(())
    return np.float32(scale.item()), np.float32(scale.reciprocal().item())


def _cpu_weights(p: Quamba2SSMParams) -> Quamba2CpuWeights:
    rows = p.state_scale.reshape(-1, p.state_size).to(torch.float32)
    table, row_index = torch.unique(rows, dim=0, return_inverse=True)
    z_scale, z_inv = _scalar_pair(p.z_scale)
    dt_scale, dt_inv = _scalar_pair(p.dt_scale)
    hadamard_base, hadamard_scale = hadamard_numba_constants(p.intermediate_size)
    return Quamba2CpuWeights(
        xbc_in_scale=_numpy_f32(p.xbc_in_scale),
        xbc_in_inv=_numpy_f32(p.xbc_in_scale.to(torch.float32).reciprocal()),
        conv_weight_t=_numpy_f32(p.conv_weight.T),
        conv_bias=_numpy_f32(p.conv_bias),
        xbc_out_scale=_numpy_f32(p.xbc_out_scale),
        xbc_out_inv=_numpy_f32(p.xbc_out_scale.to(torch.float32).reciprocal()),
        z_scale=z_scale, z_inv=z_inv, dt_scale=dt_scale, dt_inv=dt_inv,
        dt_bias=_numpy_f32(p.dt_bias),
        A=_numpy_f32(p.A),
        D=_numpy_f32(p.D),
        norm_weight=_numpy_f32(p.norm_weight),
        norm_eps=np.float32(p.norm_eps),
        state_scale_row=row_index.to(torch.int64).contiguous().numpy(),
        state_scale_table=_numpy_f32(table),
        state_inv_table=_numpy_f32(table.reciprocal()),
        hadamard_base=hadamard_base,
        hadamard_scale=hadamard_scale,
        rotate=False,
        num_heads=p.num_heads, head_dim=p.head_dim, state_size=p.state_size, n_groups=p.n_groups,
    )  # fmt: skip


def cpu_weights(p: Quamba2SSMParams) -> Quamba2CpuWeights:
    """The kernels' arrays of p, built on first use and kept on p (its tensors never change
    after loading)."""
    weights = p.__dict__.get("_cpu_weights")
    if weights is None:
        weights = p.__dict__["_cpu_weights"] = _cpu_weights(p)
    return weights


def quamba2_ssm_decode_state_shapes(p: Quamba2SSMParams) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Per-sequence int8 (conv, ssm) state shapes: (K-1, conv_dim) and (H, P, N)."""
    return (p.conv_weight.shape[1] - 1, p.conv_dim), (p.num_heads, p.head_dim, p.state_size)


def _check_int8_cache(cache: torch.Tensor) -> None:
    if cache.dtype != torch.int8:
        raise TypeError(f"quamba states are int8, got a {cache.dtype} cache")


def _flat_storage(cache: torch.Tensor) -> np.ndarray:
    """The whole storage under an int8 cache view, as a 1-D numpy array (vLLM's caches are
    strided views into shared pages; the kernels address slots by element offset)."""
    _check_int8_cache(cache)
    return torch.empty(0, dtype=torch.int8).set_(cache.untyped_storage()).numpy()


def _check_ssm_cache(p: Quamba2SSMParams, ssm_cache: torch.Tensor) -> None:
    _, ssm_shape = quamba2_ssm_decode_state_shapes(p)
    contiguous_slot = (ssm_shape[1] * ssm_shape[2], ssm_shape[2], 1)
    _check_int8_cache(ssm_cache)
    if tuple(ssm_cache.shape[1:]) != ssm_shape or ssm_cache.stride()[1:] != contiguous_slot:
        raise ValueError(
            f"the SSM cache must hold contiguous {ssm_shape} slots, got shape "
            f"{tuple(ssm_cache.shape)} strides {ssm_cache.stride()}"
        )


def _conv_view(conv_cache: torch.Tensor):
    """The numba kernels' handle on the conv cache: (flat storage, storage offset, strides...);
    the kernels find a slot's window from it, so no per-call offset arithmetic runs in torch."""
    return (_flat_storage(conv_cache), conv_cache.storage_offset(), *conv_cache.stride())


def _cache_views(p: Quamba2SSMParams, conv_cache: torch.Tensor, ssm_cache: torch.Tensor):
    """The numba kernels' handles on both caches (the SSM's as (flat storage, storage offset,
    slot stride))."""
    _check_ssm_cache(p, ssm_cache)
    ssm = (_flat_storage(ssm_cache), ssm_cache.storage_offset(), ssm_cache.stride(0))
    return _conv_view(conv_cache), ssm


def _check_slots(slots: torch.Tensor) -> None:
    if slots.dim() != 1:
        raise ValueError(f"slots must be one index per sequence, got shape {tuple(slots.shape)}")


def _slot_numbers(slots: torch.Tensor) -> np.ndarray:
    _check_slots(slots)
    return slots.numpy()


def _f32_rows(t: torch.Tensor) -> np.ndarray:
    return f32_contiguous(t).numpy()


def _output(zxbcdt: torch.Tensor, p: Quamba2SSMParams, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return zxbcdt.new_empty((zxbcdt.shape[0], p.intermediate_size), dtype=torch.float32)
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor")
    return out


@functools.cache
def _simd_decode():
    """csrc/quamba2_ssm_decode.c's whole decode step, or None where this CPU lacks AVX-512 VNNI."""
    p, i64 = _simd.POINTER, _simd.INT64
    return _simd.function(
        "quamba_quamba2_ssm_decode_avx512_vnni", "avx512_vnni",
        p, p, i64, p, p, i64, i64, i64, p, i64, p,
    )  # fmt: skip


# The layer arrays the C decode reads, by their Quamba2CpuWeights names.
_DECODE_LAYER_ARRAYS = (
    "xbc_in_scale", "xbc_in_inv", "conv_weight_t", "conv_bias", "xbc_out_scale", "xbc_out_inv",
    "dt_bias", "A", "D", "norm_weight", "state_scale_row", "state_scale_table", "state_inv_table",
)  # fmt: skip


class _DecodeLayer(ctypes.Structure):
    """csrc/quamba2_ssm_decode.c's struct quamba2_decode_layer: pointers into a
    Quamba2CpuWeights' arrays (kept alive with it on the params) and its scalars."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in (*_DECODE_LAYER_ARRAYS, "hadamard_base")),
        ("hadamard_m", ctypes.c_int64),
        *((name, ctypes.c_float) for name in (
            "hadamard_scale", "z_scale", "z_inv", "dt_scale", "dt_inv", "norm_eps",
        )),
        *((name, ctypes.c_int64) for name in (
            "num_heads", "head_dim", "state_size", "n_groups", "conv_kernel",
        )),
    ]  # fmt: skip


def _decode_layer(p: Quamba2SSMParams, rotate: bool) -> _DecodeLayer:
    """The C kernel's layer struct for p (with or without the output rotation), built once and
    kept on p: numpy's .ctypes.data costs a microsecond per array."""
    key = f"_decode_layer_{rotate}"
    layer = p.__dict__.get(key)
    if layer is None:
        w = cpu_weights(p)
        arrays = {name: getattr(w, name).ctypes.data for name in _DECODE_LAYER_ARRAYS}
        layer = p.__dict__[key] = _DecodeLayer(
            **arrays,
            hadamard_base=w.hadamard_base.ctypes.data if rotate else None,
            hadamard_m=w.hadamard_base.shape[0], hadamard_scale=w.hadamard_scale,
            z_scale=w.z_scale, z_inv=w.z_inv, dt_scale=w.dt_scale, dt_inv=w.dt_inv, norm_eps=w.norm_eps,
            num_heads=w.num_heads, head_dim=w.head_dim, state_size=w.state_size, n_groups=w.n_groups,
            conv_kernel=w.conv_weight_t.shape[0],
        )  # fmt: skip
    return layer


def _decode_simd(kernel, zxbcdt: torch.Tensor, p: Quamba2SSMParams, slots: torch.Tensor, conv_cache, ssm_cache, out, rotate):
    _check_ssm_cache(p, ssm_cache)
    in_proj_dim = p.intermediate_size + p.conv_dim + p.num_heads
    if zxbcdt.shape[-1] != in_proj_dim:
        raise ValueError(f"zxbcdt rows must hold {in_proj_dim} values, got {zxbcdt.shape[-1]}")
    _check_int8_cache(conv_cache)
    slots = slots.to(torch.int64).contiguous()
    status = kernel(
        ctypes.byref(_decode_layer(p, rotate)), zxbcdt.data_ptr(), zxbcdt.shape[0], slots.data_ptr(),
        conv_cache.data_ptr(), *conv_cache.stride(), ssm_cache.data_ptr(), ssm_cache.stride(0), out.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the Quamba2 decode kernel could not allocate its work space")


def quamba2_ssm_decode_cpu(
    zxbcdt: torch.Tensor,
    p: Quamba2SSMParams,
    conv_cache: torch.Tensor,
    ssm_cache: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor | None = None,
    rotate_output: bool = False,
) -> torch.Tensor:
    """quamba2_ssm_decode_ref for B sequences, states updated in place in their cache slots.

    zxbcdt [B, in_proj_dim]; conv_cache int8 [num_slots, K-1, conv_dim] (any strides),
    ssm_cache int8 [num_slots, H, P, N] (each slot contiguous); slots [B] the sequences'
    slots (distinct). Returns out f32 [B, I]: the reference's y, or
    hadamard_transform_ref(y) when rotate_output.
    """
    out = _output(zxbcdt, p, out)
    kernel = _simd_decode()
    if kernel is not None:
        _check_slots(slots)
        _decode_simd(kernel, f32_contiguous(zxbcdt), p, slots, conv_cache, ssm_cache, out, rotate_output)
        return out
    from . import _quamba2_ssm_numba  # numba loads on first use only: see DESIGN.md

    weights = cpu_weights(p)._replace(rotate=rotate_output)
    _quamba2_ssm_numba.decode_kernel(
        _f32_rows(zxbcdt), weights, _slot_numbers(slots), *_cache_views(p, conv_cache, ssm_cache),
        out.numpy(),
    )  # fmt: skip
    return out


def quamba2_ssm_prefill_cpu(
    zxbcdt: torch.Tensor,
    p: Quamba2SSMParams,
    conv_cache: torch.Tensor,
    ssm_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    out: torch.Tensor | None = None,
    rotate_output: bool = False,
) -> torch.Tensor:
    """quamba2_ssm_prefill_ref for S sequences packed in zxbcdt [T, in_proj_dim] in one call.

    Sequence s owns rows query_start_loc[s]:query_start_loc[s + 1] and cache slot slots[s];
    it continues from its cached states when has_initial_state[s] (a chunked prefill), else
    starts fresh; its final states are written to its slot. Caches as in the decode.
    Returns out f32 [T, I] as quamba2_ssm_decode_cpu.
    """
    from . import _quamba2_ssm_numba

    out = _output(zxbcdt, p, out)
    starts = query_start_loc.to(torch.int64).contiguous().numpy()
    has_initial = has_initial_state.to(torch.bool).contiguous().numpy()
    _quamba2_ssm_numba.prefill_kernel(
        _f32_rows(zxbcdt), starts, has_initial, cpu_weights(p), _slot_numbers(slots),
        *_cache_views(p, conv_cache, ssm_cache), out.numpy(),
    )  # fmt: skip
    # Rotated afterwards by the C transform where it runs (3x numba's at mamba2-130m's 1536).
    return hadamard_rows_cpu_(out) if rotate_output else out
