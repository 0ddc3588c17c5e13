"""kernels/quamba_ssm.py: the Mamba1 W8A8 SSM path, prefill vs decode and its int8 states."""

import torch

from vllm_quamba.kernels.quamba_ssm import (
    QuambaSSMParams,
    quamba_conv_decode_ref,
    quamba_conv_prefill_ref,
    quamba_scan_decode_ref,
    quamba_scan_prefill_ref,
)
from vllm_quamba.kernels.quant import quantize_int8

I, N, R, K = 24, 8, 4, 4


def _params(g: torch.Generator) -> QuambaSSMParams:
    s = lambda v: torch.tensor([v])  # noqa: E731
    return QuambaSSMParams(
        intermediate_size=I, state_size=N, time_step_rank=R,
        x_scale=s(0.02), z_scale=s(0.03), u_scale=s(0.015), x_proj_out_scale=s(0.02), dt_scale=s(0.01),
        conv_weight=torch.randn(I, K, generator=g) * 0.5, conv_bias=torch.randn(I, generator=g) * 0.1,
        A=-torch.rand(I, N, generator=g) - 0.5, D=torch.randn(I, generator=g),
        dt_bias=torch.randn(I, generator=g) * 0.5 - 2, state_scale=s(0.01),
    )


def _step_inputs(g, T):
    return torch.randn(T, 2 * I, generator=g), torch.randn(T, R + 2 * N, generator=g), torch.randn(T, I, generator=g)


def test_conv_state_holds_the_int8_x_exactly():
    g = torch.Generator().manual_seed(0)
    p = _params(g)
    xz, _, _ = _step_inputs(g, 7)
    _, _, conv_state = quamba_conv_prefill_ref(xz, p, None)
    assert conv_state.dtype == torch.int8
    assert torch.equal(conv_state, quantize_int8(xz[-(K - 1):, :I], p.x_scale))


def test_decode_equals_one_token_prefill_from_the_same_states():
    """A decode step and a one-token prefill from the same int8 states are the same math
    (token loop of length 1 vs one batched step). Tolerance 1e-5 on y of magnitude ~1:
    fp32 reassociation only. int8 states: equal up to one step at a rounding boundary."""
    g = torch.Generator().manual_seed(1)
    p = _params(g)
    xz, x_dbl, dt = _step_inputs(g, 9)
    u_q, z_q, conv = quamba_conv_prefill_ref(xz[:8], p, None)
    _, ssm = quamba_scan_prefill_ref(u_q, z_q, x_dbl[:8], dt[:8], p, None)
    assert ssm.dtype == torch.int8 and ssm.shape == (I, N)

    u1, z1, conv1 = quamba_conv_prefill_ref(xz[8:], p, conv)
    y1, ssm1 = quamba_scan_prefill_ref(u1, z1, x_dbl[8:], dt[8:], p, ssm)
    u2, z2, conv2 = quamba_conv_decode_ref(xz[8:], p, conv[None])
    y2, ssm2 = quamba_scan_decode_ref(u2, z2, x_dbl[8:], dt[8:], p, ssm[None])
    assert torch.equal(u1, u2) and torch.equal(z1, z2) and torch.equal(conv1, conv2[0])
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=0)
    assert (ssm1.int() - ssm2[0].int()).abs().max() <= 1
