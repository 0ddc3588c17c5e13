"""Mamba2 gated RMSNorm (norm_before_gate=False), normalized per channel group.

    h   = y * silu(z)
    out = h / sqrt(mean_{group}(h^2) + eps) * weight

The mean runs over each contiguous block of `group_size` channels. mamba_ssm and vLLM
use group_size = intermediate_size // n_groups; transformers' MambaRMSNormGated
normalizes over the whole intermediate size (group_size = intermediate_size) whatever
n_groups is. The two agree only for n_groups == 1.
Compute is float32; the result comes back in y's dtype.
"""

import torch
import torch.nn.functional as F


def gated_rmsnorm_ref(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """y, z[..., I], weight[I] -> [..., I]."""
    channels = y.shape[-1]
    if group_size < 1 or channels % group_size != 0:
        raise ValueError(f"group_size {group_size} must divide the channel count {channels}.")
    gated = y.to(torch.float32) * F.silu(z.to(torch.float32))
    groups = gated.unflatten(-1, (channels // group_size, group_size))
    inv_rms = torch.rsqrt(groups.pow(2).mean(dim=-1, keepdim=True) + eps)
    normed = (groups * inv_rms).flatten(-2)
    return (normed * weight.to(torch.float32)).to(y.dtype)
