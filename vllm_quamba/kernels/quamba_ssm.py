"""Quamba W8A8 SSM path of one Mamba1 mixer: the numerics between its four int8 linears.

The Mamba1 counterpart of ``quamba2_ssm``: the spec shared by the converter's simulated
quantization forward and the vLLM runtime mixer (quamba.md sections 1 and 2.4). Every
activation is int8 with a static per-tensor scale.

The mixer is in_proj -> [A] -> x_proj -> dt_proj -> [B] -> out_proj. The four linears are W8A8
GEMMs (int8 weight with per-output-channel scales, static per-tensor input scale) and stay
outside this module, so that the runtime can run them as vLLM's compressed-tensors int8
linears; this module holds the two pieces between them, each one fused op:

[A] ``quamba_conv_prefill_ref`` / ``quamba_conv_decode_ref``: in_proj output [.., 2I] (x then
    z) -> x and z quantized to int8 (``x_scale``, ``z_scale``); the causal depthwise conv1d with
    int8 weight and bias (per-tensor scales) on the int8 x, SiLU; its output u quantized to int8
    with x_proj's input scale (``u_scale``, percentile-calibrated). Returns u and z as int8 (the
    caller feeds u to x_proj and keeps z for [B]) and the int8 conv state. The conv state holds
    int8 x values, which lie on the int8 grid exactly, so storing it in int8 loses nothing.
[B] ``quamba_scan_prefill_ref`` / ``quamba_scan_decode_ref``: x_proj output [.., R+2N] and
    dt_proj output [.., I] -> B and C quantized with the x_proj output scale (shared by dt_low,
    B and C; dt_low is dt_proj's input, quantized by dt_proj itself with that same scale), dt
    with ``dt_scale``; the selective scan on the dequantized int8 u, dt, B, C, z with int8
    A_log, D and dt_bias (dequantized; softplus(dt + dt_bias)); z gating y * silu(z). Returns
    fp y (the caller applies the online Hadamard and the out_proj int8 linear, whose input
    quantization is that linear's own) and the final SSM state requantized to int8 with the
    per-tensor (percentile-calibrated) ``state_scale`` after every prefill and decode step.

Prefill works on one sequence (states None = a fresh sequence), decode on a batch of one token
per sequence. States are functional: new states are returned, never written in place.
"""

from __future__ import annotations

import dataclasses

import torch

from .causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from .quant import dequantize_int8, quantize_int8
from .selective_scan import mamba1_state_update_ref, selective_scan_ref


@dataclasses.dataclass
class QuambaSSMParams:
    """One layer's SSM parameters, int8 weights dequantized once so each call is plain math."""

    intermediate_size: int
    state_size: int
    time_step_rank: int
    x_scale: torch.Tensor  # [1]: in_proj output x, conv input and conv state
    z_scale: torch.Tensor  # [1]: in_proj output z
    u_scale: torch.Tensor  # [1]: conv output u = x_proj input (percentile)
    x_proj_out_scale: torch.Tensor  # [1]: x_proj output dt_low, B, C
    dt_scale: torch.Tensor  # [1]: dt_proj output
    conv_weight: torch.Tensor  # [I, K] fp32, dequantized from int8
    conv_bias: torch.Tensor  # [I] fp32, dequantized from int8
    A: torch.Tensor  # [I, N] = -exp(dequantized A_log)
    D: torch.Tensor  # [I]
    dt_bias: torch.Tensor  # [I], dequantized from int8
    state_scale: torch.Tensor  # [1]


def _split_in_proj(xz: torch.Tensor, p: QuambaSSMParams):
    x, z = torch.split(xz.float(), [p.intermediate_size, p.intermediate_size], dim=-1)
    return quantize_int8(x, p.x_scale), quantize_int8(z, p.z_scale)


def quamba_conv_prefill_ref(
    xz: torch.Tensor, p: QuambaSSMParams, conv_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence: in_proj output xz [T, 2I] -> (u int8 [T, I], z int8 [T, I], conv_state).

    conv_state is int8 [K-1, I] on the x_scale grid (None: a fresh sequence).
    """
    x_q, z_q = _split_in_proj(xz, p)
    initial = None if conv_state is None else dequantize_int8(conv_state, p.x_scale)
    u, final = causal_conv1d_ref(dequantize_int8(x_q, p.x_scale), p.conv_weight, p.conv_bias, initial, "silu")
    return quantize_int8(u, p.u_scale), z_q, quantize_int8(final, p.x_scale)


def quamba_conv_decode_ref(
    xz: torch.Tensor, p: QuambaSSMParams, conv_state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per sequence: xz [B, 2I], int8 conv_state [B, K-1, I] -> (u, z int8 [B, I], conv_state)."""
    x_q, z_q = _split_in_proj(xz, p)
    u, new = causal_conv1d_update_ref(
        dequantize_int8(x_q, p.x_scale), dequantize_int8(conv_state, p.x_scale), p.conv_weight, p.conv_bias, "silu"
    )
    return quantize_int8(u, p.u_scale), z_q, quantize_int8(new, p.x_scale)


def _scan_operands(u_q, z_q, x_dbl, dt, p: QuambaSSMParams):
    N, R = p.state_size, p.time_step_rank
    _, B, C = torch.split(x_dbl.float(), [R, N, N], dim=-1)
    fq = lambda t, s: dequantize_int8(quantize_int8(t, s), s)  # noqa: E731
    return (
        dequantize_int8(u_q, p.u_scale),
        fq(dt.float(), p.dt_scale),
        fq(B, p.x_proj_out_scale),
        fq(C, p.x_proj_out_scale),
        dequantize_int8(z_q, p.z_scale),
    )


def quamba_scan_prefill_ref(
    u_q: torch.Tensor,
    z_q: torch.Tensor,
    x_dbl: torch.Tensor,
    dt: torch.Tensor,
    p: QuambaSSMParams,
    ssm_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: int8 u, z [T, I], x_proj output [T, R+2N], dt_proj output [T, I]
    -> (y [T, I] fp32, ssm_state int8 [I, N]). ssm_state None: a fresh sequence."""
    u, dt_, B, C, z = _scan_operands(u_q, z_q, x_dbl, dt, p)
    initial = None if ssm_state is None else dequantize_int8(ssm_state, p.state_scale)
    y, final = selective_scan_ref(
        u, dt_, p.A, B, C, D=p.D, z=z, delta_bias=p.dt_bias, delta_softplus=True, initial_state=initial
    )
    return y, quantize_int8(final, p.state_scale)


def quamba_scan_decode_ref(
    u_q: torch.Tensor,
    z_q: torch.Tensor,
    x_dbl: torch.Tensor,
    dt: torch.Tensor,
    p: QuambaSSMParams,
    ssm_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence: int8 u, z [B, I], x_dbl [B, R+2N], dt [B, I], int8 ssm_state
    [B, I, N] -> (y [B, I] fp32, new int8 ssm_state)."""
    u, dt_, B, C, z = _scan_operands(u_q, z_q, x_dbl, dt, p)
    y, new = mamba1_state_update_ref(
        dequantize_int8(ssm_state, p.state_scale), u, dt_, p.A, B, C, p.D, z, p.dt_bias, dt_softplus=True
    )
    return y, quantize_int8(new, p.state_scale)
