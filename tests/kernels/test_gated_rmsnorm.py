import pytest
import torch
import torch.nn.functional as F

from vllm_quamba.kernels.gated_rmsnorm import gated_rmsnorm_ref

TOKENS, CHANNELS, EPS = 6, 32, 1e-5
# fp32 mean of <= 32 squares and one rsqrt, computed in a different order: a few ulps, 1e-5.
NORM_TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(TOKENS, CHANNELS, generator=g) * 3
    z = torch.randn(TOKENS, CHANNELS, generator=g)
    weight = torch.randn(CHANNELS, generator=g)
    return y, z, weight


@pytest.mark.parametrize("group_size", [4, 16, 32])
def test_matches_per_group_formula(group_size):
    y, z, weight = _inputs()
    out = gated_rmsnorm_ref(y, z, weight, group_size, EPS)
    h = y * F.silu(z)
    expected = torch.empty_like(h)
    for start in range(0, CHANNELS, group_size):
        block = h[:, start : start + group_size]
        rms = torch.sqrt(block.pow(2).mean(dim=-1, keepdim=True) + EPS)
        expected[:, start : start + group_size] = block / rms * weight[start : start + group_size]
    torch.testing.assert_close(out, expected, **NORM_TOL)


def test_matches_transformers_norm_over_the_full_width():
    modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    y, z, weight = _inputs(1)
    hf_norm = modeling_mamba2.MambaRMSNormGated(CHANNELS, eps=EPS)
    with torch.no_grad():
        hf_norm.weight.copy_(weight)
        expected = hf_norm(y, z)
    torch.testing.assert_close(gated_rmsnorm_ref(y, z, weight, CHANNELS, EPS), expected, **NORM_TOL)


def test_grouped_norm_is_transformers_norm_per_group():
    # transformers' MambaRMSNormGated ignores n_groups (one RMS over all channels); the
    # mamba_ssm / vLLM grouped norm is that same norm applied to each channel group.
    modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    y, z, weight = _inputs(2)
    group_size = CHANNELS // 4
    pieces = []
    for start in range(0, CHANNELS, group_size):
        piece = slice(start, start + group_size)
        hf_norm = modeling_mamba2.MambaRMSNormGated(group_size, eps=EPS)
        with torch.no_grad():
            hf_norm.weight.copy_(weight[piece])
            pieces.append(hf_norm(y[:, piece], z[:, piece]))
    grouped = gated_rmsnorm_ref(y, z, weight, group_size, EPS)
    torch.testing.assert_close(grouped, torch.cat(pieces, dim=-1), **NORM_TOL)
    # ... and it is not the full-width norm: the convention matters as soon as n_groups > 1.
    full_width = gated_rmsnorm_ref(y, z, weight, CHANNELS, EPS)
    assert (grouped - full_width).abs().max() > 1e-2


def test_leading_dims_and_dtype():
    y, z, weight = _inputs(3)
    out = gated_rmsnorm_ref(y.to(torch.bfloat16)[None], z.to(torch.bfloat16)[None], weight, 8, EPS)
    assert out.shape == (1, TOKENS, CHANNELS) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("group_size", [0, 5, 64])
def test_group_size_must_divide_channels(group_size):
    y, z, weight = _inputs()
    with pytest.raises(ValueError):
        gated_rmsnorm_ref(y, z, weight, group_size, EPS)
