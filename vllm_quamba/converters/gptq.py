"""4-bit group-wise weight quantizers: GPTQ (with error feedback) and round-to-nearest.

The quantizer is Quamba's W4 one (quamba.md section 2.6): symmetric, per output row and
``group_size`` input columns,

    s = max|w_group| * 2 / (2^bits - 1)          (4 bits: amax * 2 / 15)
    q = clamp(round_half_to_even(w / s), -2^(bits-1), 2^(bits-1) - 1)     ([-8, 7])
    w_hat = q * s

which is ``clamp(round(w / s) + 8, 0, 15) - 8`` in the unsigned zero-point-8 view that
compressed-tensors' ``pack_to_int32`` stores. GPTQ takes each group's scale from the
error-updated weights at the moment its first column is quantized, as Quamba's GPTQ does.

Pure torch, CPU or GPU; one layer at a time: the Hessian of a linear with K inputs is K x K.
"""

from __future__ import annotations

import torch

# Floor for a group scale: an all-zero group (e.g. only dead input channels) still gets a
# positive scale, and its weights quantize to 0.
MIN_SCALE = 1e-8


class HessianAccumulator:
    """H = 2/n * sum_t x_t x_t^T over every input vector x_t fed so far (n counts vectors).

    Held in float64: a layer's Hessian sums many thousands of outer products whose entries span
    several orders of magnitude (outlier channels), and its inverse Cholesky factor drives every
    GPTQ update; float32 accumulation would lose the small channels' digits. Memory is
    8 * K^2 bytes (512 MiB at K = 8192), one layer at a time.

    The running-count update (H <- H * n/(n+m) + 2/(n+m) * X^T X) is GPTQ's; n counts vectors
    rather than sequences, so H does not depend on how the calibration tokens were batched.
    GPTQ's result is invariant to a positive scale of H, so this changes no quantized bit.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Feed activations ``x`` [..., K] of the layer's input."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected activations with {self.in_features} features, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(device=self.hessian.device, dtype=torch.float64)
        new_count = self.count + rows.shape[0]
        if new_count == 0:
            return
        self.hessian.mul_(self.count / new_count)
        self.hessian.addmm_(rows.t(), rows, alpha=2.0 / new_count)
        self.count = new_count


def _check_groups(in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size != 0:
        raise ValueError(
            f"group_size {group_size} does not divide the layer's {in_features} input features; "
            f"pass a group_size that divides it (e.g. min(128, {in_features}))"
        )


def _int_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_scale(weights: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Scale of each row of ``weights`` [..., group]: amax * 2 / (2^bits - 1), float32."""
    amax = weights.abs().amax(dim=-1).to(torch.float32)
    return (amax * 2 / (2**bits - 1)).clamp(min=MIN_SCALE)


def quantize_with_scale(weights: torch.Tensor, scale: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """clamp(round(w / s), -2^(bits-1), 2^(bits-1) - 1) as int8; ``scale`` broadcasts against w."""
    low, high = _int_range(bits)
    return torch.round(weights.to(torch.float32) / scale).clamp(low, high).to(torch.int8)


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: weight [N, K] -> (q int8 [N, K], scale float32 [N, K // group_size])."""
    rows, in_features = weight.shape
    _check_groups(in_features, group_size)
    groups = weight.to(torch.float32).reshape(rows, in_features // group_size, group_size)
    scale = group_scale(groups, bits)
    q = quantize_with_scale(groups, scale.unsqueeze(-1), bits)
    return q.reshape(rows, in_features), scale


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [N, K] (int) and scale [N, K // group_size] -> float32 [N, K]."""
    return (q.to(torch.float32).reshape(*scale.shape, group_size) * scale.unsqueeze(-1)).reshape(q.shape)


def layer_output_error(
    weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int, x: torch.Tensor
) -> float:
    """Relative output error ||x W^T - x W_hat^T||_F^2 / ||x W^T||_F^2 on activations x [..., K]."""
    x = x.reshape(-1, weight.shape[1]).to(torch.float64)
    reference = x @ weight.to(torch.float64).t()
    error = x @ (weight.to(torch.float64) - dequantize_groups(q, scale, group_size).to(torch.float64)).t()
    return float(error.pow(2).sum() / reference.pow(2).sum())


def _inverse_cholesky_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + percdamp * mean(diag H) * I)^-1, float64."""
    damped = hessian.clone()
    damped.diagonal().add_(percdamp * damped.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
    return torch.linalg.cholesky(inverse, upper=True)


def _quantize_block(
    weights: torch.Tensor, block: torch.Tensor, factor: torch.Tensor, start: int,
    q: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int,
) -> torch.Tensor:
    """Quantize ``block`` (columns start.. of ``weights``) column by column with error feedback
    inside the block; fill q and scale; return the scaled errors for the lazy update."""
    errors = torch.zeros_like(block)
    for i in range(block.shape[1]):
        column = start + i
        if column % group_size == 0:
            # The group's current (error-updated) weights: inside this block, or, for groups
            # wider than a block, starting at it (i == 0, before any update inside the block).
            if i + group_size <= block.shape[1]:
                current = block[:, i:i + group_size]
            else:
                current = weights[:, column:column + group_size]
            scale[:, column // group_size] = group_scale(current, bits)
        column_scale = scale[:, column // group_size]
        w = block[:, i]
        q_column = quantize_with_scale(w, column_scale, bits)
        q[:, column] = q_column
        error = (w - q_column.to(torch.float32) * column_scale) / factor[i, i]
        block[:, i:].sub_(error.unsqueeze(1) * factor[i, i:].unsqueeze(0))
        errors[:, i] = error
    return errors


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: weight [N, K], input Hessian [K, K] -> (q int8 [N, K], scale float32 [N, K // group_size]).

    Columns are quantized in order, each column's rounding error fed back onto the columns not
    yet quantized through the Cholesky factor of the damped inverse Hessian; updates beyond the
    current ``block_size`` columns are applied lazily, one matmul per block. Input channels the
    calibration never excited (diag H = 0) get weight 0 and diag 1, as GPTQ does.

    ``act_order`` quantizes columns by descending diag(H). It needs group_size == K: with
    several groups the scales would belong to groups of permuted columns, which the
    contiguous-group format (no g_idx) cannot store, so that combination is refused.
    """
    rows, in_features = weight.shape
    _check_groups(in_features, group_size)
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight's {in_features} input features")
    if block_size % group_size and group_size % block_size:
        raise ValueError(f"block_size {block_size} and group_size {group_size} must divide one another")
    if act_order and group_size != in_features:
        raise ValueError(
            "act_order with several groups per row is not supported: the scale groups would be "
            "permuted columns, which the contiguous-group checkpoint format cannot store; use "
            f"act_order=False or group_size={in_features}"
        )

    weights = weight.to(torch.float32).clone()
    hessian = hessian.to(device=weights.device, dtype=torch.float64).clone()
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1.0
    weights[:, dead] = 0.0

    order = None
    if act_order:
        order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
        weights, hessian = weights[:, order], hessian[order][:, order]

    factor = _inverse_cholesky_factor(hessian, percdamp).to(torch.float32)
    q = torch.empty(rows, in_features, dtype=torch.int8, device=weights.device)
    scale = torch.empty(rows, in_features // group_size, dtype=torch.float32, device=weights.device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = weights[:, start:end].clone()
        errors = _quantize_block(weights, block, factor[start:end, start:end], start, q, scale, group_size, bits)
        weights[:, end:].sub_(errors @ factor[start:end, end:])

    if order is not None:
        q = q[:, torch.argsort(order)]
    return q, scale
