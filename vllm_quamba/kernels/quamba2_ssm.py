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

import dataclasses

import torch

from .causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from .gated_rmsnorm import gated_rmsnorm_ref
from .quant import dequantize_int8, quantize_int8
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
