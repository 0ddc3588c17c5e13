"""The W4A16 fp SSM decode step (fp16 SSM state): its reference against vLLM's own CPU ops, and
the C kernel (csrc/mamba2_ssm_decode.c, skipped on CPUs without AVX-512) against the reference.

Tolerances. Both sides compute in fp32 but sum in other orders (the conv taps, y = state . C, the
norm's sum of squares) and take exp from different code (torch's, libm's, the kernel's
polynomial for SiLU): a few ulp of fp32 on values of unit size, which the norm and the Hadamard
carry through: rtol = atol = 1e-5 on the output. The fp16 state is rounded from those fp32
values, so where one sits within that error of a rounding tie the two fp16 values differ by one
fp16 step (2^-10 relative, 2^-24 absolute below the normal range), never by more, and only in
a small fraction of the entries (MAX_TIE_FRACTION).
"""

import pytest
import torch

from vllm_quamba.kernels import mamba2_ssm
from vllm_quamba.kernels.hadamard import hadamard_transform_ref
from vllm_quamba.kernels.mamba2_ssm import Mamba2SSMParams, mamba2_ssm_decode_cpu, mamba2_ssm_decode_ref

RTOL = ATOL = 1e-5
MAX_TIE_FRACTION = 1e-3
KERNEL = 4
NUM_SLOTS = 6


def _params(g, num_heads, head_dim, state_size, n_groups, conv_bias=True) -> Mamba2SSMParams:
    intermediate = num_heads * head_dim
    conv_dim = intermediate + 2 * n_groups * state_size
    return Mamba2SSMParams(
        conv_weight=0.5 * torch.randn(conv_dim, KERNEL, generator=g),
        conv_bias=0.1 * torch.randn(conv_dim, generator=g) if conv_bias else None,
        A=-4 * torch.rand(num_heads, generator=g),
        D=torch.randn(num_heads, generator=g),
        dt_bias=torch.randn(num_heads, generator=g),
        norm_weight=torch.randn(intermediate, generator=g),
        norm_eps=1e-5,
        n_groups=n_groups,
        state_size=state_size,
        head_dim=head_dim,
    )


def _caches(g, p: Mamba2SSMParams, conv_layout: str):
    """fp32 conv cache in vLLM's "DS" (channels strided) or "SD" layout, fp16 SSM cache."""
    if conv_layout == "DS":
        conv = torch.randn(NUM_SLOTS, p.conv_dim, KERNEL - 1, generator=g).transpose(1, 2)
    else:
        conv = torch.randn(NUM_SLOTS, KERNEL - 1, p.conv_dim, generator=g)
    ssm = torch.randn(NUM_SLOTS, p.num_heads, p.head_dim, p.state_size, generator=g).to(torch.float16)
    return conv, ssm


def assert_fp16_states_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """One fp16 step at most, and only at near-ties: a few in 1e5 of random entries (measured
    7e-5 at mamba2-130m's shapes); a wrong rounding mode would move half of them."""
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-10, atol=2**-24)
    assert (got != want).float().mean() <= MAX_TIE_FRACTION


@pytest.fixture(scope="module")
def kernel():
    if mamba2_ssm._simd_decode() is None:
        pytest.skip("no AVX-512 on this CPU (or the C kernels are not built)")


@pytest.mark.parametrize("conv_layout", ["DS", "SD"])
@pytest.mark.parametrize(
    "num_heads, head_dim, state_size, n_groups, rotate, conv_bias",
    [
        (24, 64, 128, 1, True, True),  # mamba2-130m's mixer, with its online Hadamard (n = 1536)
        (6, 8, 16, 2, True, False),  # n = 48 = 12 * 4: a base-12 Hadamard; no conv bias
        (4, 8, 20, 2, False, True),  # a state of 16 + a 4-value tail
        (6, 16, 7, 3, False, True),  # tail only, three groups
    ],
    ids=["mamba2-130m", "hadamard-48", "state-tail", "tail-only"],
)
def test_simd_decode_matches_reference(kernel, num_heads, head_dim, state_size, n_groups, rotate, conv_bias, conv_layout):
    g = torch.Generator().manual_seed(3)
    p = _params(g, num_heads, head_dim, state_size, n_groups, conv_bias)
    conv, ssm = _caches(g, p, conv_layout)
    before = (conv.clone(), ssm.clone())
    slots = torch.tensor([4, 0, 2])
    zxbcdt = 1.5 * torch.randn(len(slots), p.in_proj_dim, generator=g)

    out = torch.empty(len(slots), p.intermediate_size)
    mamba2_ssm_decode_cpu(zxbcdt, p, conv, ssm, slots, out, rotate_output=rotate)
    want, conv_want, ssm_want = mamba2_ssm_decode_ref(zxbcdt, p, before[0][slots], before[1][slots], rotate)

    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)
    assert torch.equal(conv[slots], conv_want)  # copies of inputs: exact
    assert_fp16_states_close(ssm[slots], ssm_want)
    others = [1, 3, 5]
    assert torch.equal(conv[others], before[0][others]) and torch.equal(ssm[others], before[1][others])


def test_reference_is_vllms_decode():
    """The spec is the stock mixer's decode: vLLM's causal_conv1d_update and
    selective_state_update CPU ops (which take the fp16 state too), the gated norm as
    Mixer2RMSNormGated.forward_native computes it, then the Hadamard transform."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.mamba.ops.cpu.causal_conv1d import causal_conv1d_update_cpu

    g = torch.Generator().manual_seed(5)
    H, P, N, G = 6, 8, 16, 2
    p = _params(g, H, P, N, G)
    conv, ssm = _caches(g, p, "DS")
    slots = torch.tensor([3, 1])
    B = len(slots)
    zxbcdt = 1.5 * torch.randn(B, p.in_proj_dim, generator=g)
    want, conv_want, ssm_want = mamba2_ssm_decode_ref(zxbcdt, p, conv[slots], ssm[slots], rotate_output=True)

    I, gs = p.intermediate_size, G * N
    z, xbc, dt = torch.split(zxbcdt, [I, p.conv_dim, H], dim=-1)
    conv_dim_first = conv.transpose(1, 2)  # the (dim, K-1) view vLLM's conv op takes
    indices = slots.to(torch.int32)
    xbc = causal_conv1d_update_cpu(xbc.contiguous(), conv_dim_first, p.conv_weight, p.conv_bias, "silu", conv_state_indices=indices)
    x, Bm, Cm = torch.split(xbc, [I, gs, gs], dim=-1)
    y = torch.empty(B, H, P)
    ops.selective_state_update_cpu(
        ssm, x.reshape(B, H, P), dt[:, :, None].expand(-1, -1, P), p.A[:, None, None].expand(-1, P, N),
        Bm.reshape(B, G, N), Cm.reshape(B, G, N), p.D[:, None].expand(-1, P), None,
        p.dt_bias[:, None].expand(-1, P), True, indices, indices, -1, y, None, None,
    )  # fmt: skip
    gated = (y.reshape(B, I) * torch.nn.functional.silu(z)).reshape(B, G, I // G)
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + p.norm_eps)
    stock = hadamard_transform_ref(p.norm_weight * normed.reshape(B, I))

    torch.testing.assert_close(want, stock, rtol=RTOL, atol=ATOL)
    assert torch.equal(conv[slots], conv_want)
    assert_fp16_states_close(ssm[slots], ssm_want)


def test_bad_inputs_are_named(kernel):
    g = torch.Generator().manual_seed(0)
    p = _params(g, 4, 8, 16, 1)
    conv, ssm = _caches(g, p, "SD")
    zxbcdt, out, slots = torch.randn(2, p.in_proj_dim), torch.empty(2, p.intermediate_size), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="SSM cache must hold contiguous torch.float16"):
        mamba2_ssm_decode_cpu(zxbcdt, p, conv, ssm.float(), slots, out)
    with pytest.raises(ValueError, match="conv cache must hold float32"):
        mamba2_ssm_decode_cpu(zxbcdt, p, conv.to(torch.bfloat16), ssm, slots, out)
    with pytest.raises(ValueError, match="zxbcdt must be"):
        mamba2_ssm_decode_cpu(zxbcdt, p, conv, ssm, torch.tensor([0]), out)
    with pytest.raises(ValueError, match="out must be"):
        mamba2_ssm_decode_cpu(zxbcdt, p, conv, ssm, slots, torch.empty(2, p.intermediate_size + 1))


def test_simd_decode_runs_only_on_fp32_models_with_fp16_states(kernel):
    f32, f16, bf16 = (torch.empty(1, 2, dtype=d) for d in (torch.float32, torch.float16, torch.bfloat16))
    assert mamba2_ssm.simd_decode_runs(f32, f32, f16)
    assert not mamba2_ssm.simd_decode_runs(bf16, bf16, f16)
    assert not mamba2_ssm.simd_decode_runs(f32, f32, f32)
