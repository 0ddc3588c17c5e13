"""Mamba2 selective state update: one decode step of the SSD recurrence.

Per batch row b and head h (head h reads group g = h // (H // G) of B and C):

    dt_eff    = softplus(dt + dt_bias)   (or dt + dt_bias without softplus)
    state'    = exp(dt_eff * A[h]) * state + dt_eff * x ⊗ B[g]       # [P, N]
    y         = state' @ C[g] + D[h] * x                              # [P]

Compute is float32; y comes back in x's dtype and the new state in state's dtype.
This step is the definition the chunked scan (ssd_chunk_scan) must reproduce.
"""

import torch
import torch.nn.functional as F


def effective_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool) -> torch.Tensor:
    """float32 dt + dt_bias (bias over the last, head, dim), softplus-ed if asked."""
    dt = dt.to(torch.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.to(torch.float32)
    return F.softplus(dt) if dt_softplus else dt


def expand_groups_to_heads(bc: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., G, N] -> float32 [..., H, N], head h reading group h // (H // G)."""
    num_groups = bc.shape[-2]
    if num_heads % num_groups != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of the number of groups ({num_groups}).")
    return bc.to(torch.float32).repeat_interleave(num_heads // num_groups, dim=-2)


def mamba2_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """state[B, H, P, N], x[B, H, P], dt[B, H], A[H], B/C[B, G, N] -> (y[B, H, P], new_state).

    Functional: state is not modified.
    """
    num_heads = x.shape[1]
    dt_eff = effective_dt(dt, dt_bias, dt_softplus)  # [B, H]
    b_heads = expand_groups_to_heads(B, num_heads)  # [B, H, N]
    c_heads = expand_groups_to_heads(C, num_heads)
    x32 = x.to(torch.float32)

    decay = torch.exp(dt_eff * A.to(torch.float32))  # [B, H]
    input_term = (dt_eff[..., None] * x32)[..., None] * b_heads[:, :, None, :]  # [B, H, P, N]
    new_state = decay[..., None, None] * state.to(torch.float32) + input_term
    y = torch.einsum("bhpn,bhn->bhp", new_state, c_heads)
    if D is not None:
        y = y + D.to(torch.float32)[:, None] * x32
    return y.to(x.dtype), new_state.to(state.dtype)
