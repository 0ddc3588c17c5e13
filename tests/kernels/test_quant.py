import pytest
import torch

from vllm_quamba.kernels.quant import (
    INT8_MAX,
    INT8_MIN,
    dequantize_int8,
    fake_quant_int8,
    quantize_int8,
    symmetric_scale,
)


def test_int8_bounds():
    assert (INT8_MIN, INT8_MAX) == (-128, 127)


def test_symmetric_scale_values():
    # amax / 127 in float32: exact comparison against the same float32 division.
    assert symmetric_scale(127.0).item() == 1.0
    assert symmetric_scale(torch.tensor(254.0, dtype=torch.float64)).dtype == torch.float32
    per_channel = symmetric_scale(torch.tensor([1.0, 12.7, 0.5]))
    torch.testing.assert_close(per_channel, torch.tensor([1.0, 12.7, 0.5]) / 127, rtol=0, atol=0)
    assert symmetric_scale(7.0, bits=4).item() == 1.0


def test_symmetric_scale_clamps_to_eps():
    scales = symmetric_scale(torch.tensor([0.0, 1e-9, 1.0]), eps=1e-6)
    assert scales[0].item() == pytest.approx(1e-6) and scales[1].item() == pytest.approx(1e-6)
    assert symmetric_scale(0.0, eps=1e-3).item() == pytest.approx(1e-3)


def test_rounding_is_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 0.51, -0.51])
    expected = torch.tensor([0, 2, 2, 4, 0, -2, -2, 0, 1, -1], dtype=torch.int8)
    q = quantize_int8(x, torch.tensor(1.0))
    assert q.dtype == torch.int8
    assert torch.equal(q, expected)
    # The rounding applies to x / scale, not to x.
    assert torch.equal(quantize_int8(torch.tensor([1.0, 3.0]), 2.0), torch.tensor([0, 2], dtype=torch.int8))


def test_saturates_at_int8_range():
    x = torch.tensor([1000.0, -1000.0, 127.4, 127.6, -128.4, -128.6, float("inf"), float("-inf")])
    expected = torch.tensor([127, -128, 127, 127, -128, -128, 127, -128], dtype=torch.int8)
    assert torch.equal(quantize_int8(x, 1.0), expected)


def test_per_channel_and_per_token_scales_broadcast():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 4
    channel_scales = torch.tensor([0.01, 0.1, 0.05])
    q = quantize_int8(x, channel_scales)
    for c in range(3):
        assert torch.equal(q[:, c], quantize_int8(x[:, c], channel_scales[c]))
    token_scales = torch.rand(5, 1, generator=torch.Generator().manual_seed(1)) * 0.1 + 0.01
    q = quantize_int8(x, token_scales)
    for t in range(5):
        assert torch.equal(q[t], quantize_int8(x[t], token_scales[t, 0]))
    deq = dequantize_int8(q, token_scales)
    assert deq.dtype == torch.float32
    torch.testing.assert_close(deq, q.float() * token_scales, rtol=0, atol=0)  # same float32 product


def test_fake_quant_round_trip():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    scale = symmetric_scale(x.abs().amax(dim=0))
    fq = fake_quant_int8(x, scale)
    assert fq.dtype == x.dtype
    # Inside the range the only error is rounding: at most half a step (plus float32 slack).
    assert ((fq - x).abs() <= scale / 2 * (1 + 1e-5)).all()
    half = fake_quant_int8(x.to(torch.bfloat16), scale)
    assert half.dtype == torch.bfloat16
