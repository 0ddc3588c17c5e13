"""Symmetric int8 quantization (and f32_contiguous, the fp32 form the CPU kernels read).

    scale = max(amax / (2^(bits-1) - 1), eps)
    q     = clamp(round_half_to_even(x / scale), -128, 127)
    x_hat = q * scale

`scale` broadcasts against x with ordinary torch broadcasting (per-tensor scalar, or e.g.
a per-channel [C] scale against x of shape [T, C]).
"""

import torch

INT8_MIN, INT8_MAX = -128, 127


def symmetric_scale(amax: torch.Tensor | float, bits: int = 8, eps: float = 1e-6) -> torch.Tensor:
    """float32 scale mapping |x| <= amax onto [-(2^(bits-1) - 1), 2^(bits-1) - 1]."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (amax / (2 ** (bits - 1) - 1)).clamp(min=eps)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    # Multiply by the reciprocal as vLLM's static int8 quant op does, so that both round the
    # same fp32 value; torch.round rounds half to even (rint), as that op does too.
    q = torch.round(x.to(torch.float32) * scale.reciprocal())
    return q.clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    return q.to(torch.float32) * scale


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize-dequantize round trip, returned in x's dtype."""
    return dequantize_int8(quantize_int8(x, scale), scale).to(x.dtype)


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one absmax scale per output row: (int8 weight, scales [rows, 1])."""
    scale = symmetric_scale(weight.abs().amax(dim=1, keepdim=True))
    return quantize_int8(weight, scale), scale


def quantize_per_tensor_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one absmax scale: (int8 tensor, scale [1])."""
    scale = symmetric_scale(t.abs().amax()).reshape(1)
    return quantize_int8(t, scale), scale


def f32_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t as float32 and C-contiguous, copying only when dtype or layout differ (each torch call
    costs about a microsecond, a sizeable share of a decode-sized kernel call)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()
