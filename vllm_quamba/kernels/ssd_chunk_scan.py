"""Mamba2 SSD (state space duality) scan of one sequence, chunked.

Recurrence (per head h, group g = h // (H // G), a_t = dt_eff_t * A[h]):

    state_t = exp(a_t) * state_{t-1} + dt_eff_t * x_t ⊗ B_t     # [P, N]
    y_t     = state_t @ C_t + D[h] * x_t

Chunked form: split time into chunks of `chunk_size` (the last one may be shorter). With
seg(t, s) = a_{s+1} + ... + a_t (the decay from token s to token t, -inf for s > t) and
cum(t) = a_0 + ... + a_t inside a chunk entered with state S:

    y_t     = sum_{s<=t} exp(seg(t, s)) (C_t . B_s) dt_s x_s     # within-chunk, quadratic
            + exp(cum(t)) S @ C_t                                # state -> output
    S_next  = exp(cum(L-1)) S + sum_s exp(seg(L-1, s)) dt_s x_s ⊗ B_s

and S_next is passed to the next chunk. Compute is float32; y comes back in x's dtype,
the final state in float32.
"""

import torch

from .selective_state_update import effective_dt, expand_groups_to_heads, mamba2_state_update_ref


def _segment_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """log_decay[L, H] -> seg[t, s, H] = sum_{s < r <= t} log_decay[r], -inf above the diagonal.

    Summed from masked terms rather than as cum[t] - cum[s], which cancels catastrophically
    for long chunks.
    """
    length = log_decay.shape[0]
    rows = torch.arange(length, device=log_decay.device)
    strictly_after_s = rows[:, None] > rows[None, :]  # [r, s]
    terms = log_decay[:, None, :] * strictly_after_s[..., None]  # [r, s, H]
    seg = torch.cumsum(terms, dim=0)  # [t, s, H]
    causal = rows[:, None] >= rows[None, :]
    return seg.masked_fill(~causal[..., None], float("-inf"))


def _scan_chunk(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    b_heads: torch.Tensor,
    c_heads: torch.Tensor,
    state_in: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: x[L, H, P], dt[L, H], b/c_heads[L, H, N], state_in[H, P, N] (all float32)."""
    log_decay = dt * A  # [L, H]
    seg = _segment_sums(log_decay)  # [t, s, H]
    cum = torch.cumsum(log_decay, dim=0)  # [L, H]
    dt_x = dt[..., None] * x  # [L, H, P]

    scores = torch.einsum("thn,shn->tsh", c_heads, b_heads) * torch.exp(seg)
    y_within = torch.einsum("tsh,shp->thp", scores, dt_x)
    y_from_state = torch.einsum("hpn,thn->thp", state_in, c_heads) * torch.exp(cum)[..., None]

    decay_to_end = torch.exp(seg[-1])  # [s, H]
    chunk_state = torch.einsum("sh,shp,shn->hpn", decay_to_end, dt_x, b_heads)
    state_out = torch.exp(cum[-1])[:, None, None] * state_in + chunk_state
    return y_within + y_from_state, state_out


def _initial_state_f32(initial_state: torch.Tensor | None, x: torch.Tensor, state_size: int) -> torch.Tensor:
    if initial_state is not None:
        return initial_state.to(torch.float32)
    _, num_heads, head_dim = x.shape
    return torch.zeros(num_heads, head_dim, state_size, dtype=torch.float32, device=x.device)


def ssd_chunk_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x[T, H, P], dt[T, H], A[H], B/C[T, G, N] -> (y[T, H, P], final_state[H, P, N] float32)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    seq_len, num_heads, _ = x.shape
    x32 = x.to(torch.float32)
    dt_eff = effective_dt(dt, dt_bias, dt_softplus)
    b_heads = expand_groups_to_heads(B, num_heads)
    c_heads = expand_groups_to_heads(C, num_heads)
    A32 = A.to(torch.float32)

    state = _initial_state_f32(initial_state, x, B.shape[-1])
    y_chunks = []
    for start in range(0, seq_len, chunk_size):
        chunk = slice(start, min(start + chunk_size, seq_len))
        y_chunk, state = _scan_chunk(x32[chunk], dt_eff[chunk], A32, b_heads[chunk], c_heads[chunk], state)
        y_chunks.append(y_chunk)
    y = torch.cat(y_chunks, dim=0) if y_chunks else torch.zeros_like(x32)
    if D is not None:
        y = y + D.to(torch.float32)[:, None] * x32
    return y.to(x.dtype), state


def ssd_sequential_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-by-token recurrence (a test oracle): same contract as ssd_chunk_scan_ref."""
    state = _initial_state_f32(initial_state, x, B.shape[-1])[None]
    ys = []
    for t in range(x.shape[0]):
        y_t, state = mamba2_state_update_ref(
            state, x[t : t + 1], dt[t : t + 1], A, B[t : t + 1], C[t : t + 1], D, dt_bias, dt_softplus
        )
        ys.append(y_t)
    y = torch.cat(ys, dim=0) if ys else torch.zeros_like(x)
    return y, state[0]
