"""Mamba1 selective scan: the per-channel diagonal SSM recurrence, prefill and decode.

For one sequence with inputs u, delta, z [T, Dm], A [Dm, N], B, C [T, N], D, delta_bias [Dm]
and a state [Dm, N] (zeros when no initial state is given), per channel d and token t:

    dt_t     = softplus(delta_t + delta_bias)   (or delta_t + delta_bias without softplus)
    state_t  = exp(dt_t[d] * A[d, :]) * state_{t-1}[d, :] + dt_t[d] * u_t[d] * B_t     # [N]
    y_t[d]   = state_t[d, :] . C_t + D[d] * u_t[d]
    y_t[d]  *= silu(z_t[d])                      (only when z is given)

Unlike Mamba2, A is a full [Dm, N] matrix and every channel has its own dt, so there is no
chunked matmul form worth having on CPU: the fast path is the same loop, compiled.

- selective_scan_ref: one sequence, a plain torch token loop (the definition).
- selective_scan_varlen_cpu: a packed batch of sequences (cu_seqlens), numba-compiled loops
  (_selective_scan_numba, loaded on first call) over sequences -> blocks of 256 channels (in
  parallel) -> tokens -> states -> channels, the block's [N, 256] state kept in a local array
  and the channel loop vectorized (an exp of its own: _numba_math).
- mamba1_state_update_ref: one decode step for a batch of states.

Compute is float32 everywhere; y comes back in u's (x's) dtype, scan states in float32.
softplus follows torch's F.softplus: x for x > 20, log1p(exp(x)) otherwise.
"""

import numpy as np
import torch
import torch.nn.functional as F

def _effective_dt(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """float32 delta + delta_bias (bias over the last, channel, dim), softplus-ed if asked."""
    dt = delta.to(torch.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.to(torch.float32)
    return F.softplus(dt) if delta_softplus else dt


def _skip_and_gate(y: torch.Tensor, u32: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """y + D * u, then * silu(z): the per-channel epilogue shared by prefill and decode."""
    if D is not None:
        y = y + D.to(torch.float32) * u32
    if z is not None:
        y = y * F.silu(z.to(torch.float32))
    return y


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u/delta/z[T, Dm], A[Dm, N], B/C[T, N] -> (y[T, Dm] in u's dtype, final_state[Dm, N] float32)."""
    seq_len, channels = u.shape
    u32 = u.to(torch.float32)
    dt = _effective_dt(delta, delta_bias, delta_softplus)  # [T, Dm]
    A32, B32, C32 = A.to(torch.float32), B.to(torch.float32), C.to(torch.float32)
    if initial_state is None:
        state = torch.zeros(channels, A.shape[1], dtype=torch.float32, device=u.device)
    else:
        state = initial_state.to(torch.float32)

    y = torch.empty(seq_len, channels, dtype=torch.float32, device=u.device)
    for t in range(seq_len):
        decay = torch.exp(dt[t, :, None] * A32)  # [Dm, N]
        state = decay * state + (dt[t] * u32[t])[:, None] * B32[t][None, :]
        y[t] = state @ C32[t]
    return _skip_and_gate(y, u32, D, z).to(u.dtype), state


def mamba1_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """state[B, Dm, N], x/dt/z[B, Dm], A[Dm, N], B/C[B, N] -> (y[B, Dm], new_state[B, Dm, N]).

    One token of the recurrence per batch row. Functional: state is not modified. y comes
    back in x's dtype and new_state in state's dtype.
    """
    x32 = x.to(torch.float32)
    dt_eff = _effective_dt(dt, dt_bias, dt_softplus)  # [B, Dm]
    decay = torch.exp(dt_eff[..., None] * A.to(torch.float32))  # [B, Dm, N]
    input_term = (dt_eff * x32)[..., None] * B.to(torch.float32)[:, None, :]
    new_state = decay * state.to(torch.float32) + input_term
    y = torch.einsum("bdn,bn->bd", new_state, C.to(torch.float32))
    return _skip_and_gate(y, x32, D, z).to(x.dtype), new_state.to(state.dtype)


def _f32_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def selective_scan_varlen_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    cu_seqlens: torch.Tensor,
    initial_states: torch.Tensor | None,
    has_initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed batch: u/delta/z[total_T, Dm], B/C[total_T, N], cu_seqlens[S+1] ->
    (y[total_T, Dm] in u's dtype, final_states[S, Dm, N] float32).

    Sequence s is rows cu_seqlens[s]:cu_seqlens[s+1]; it starts from initial_states[s] where
    has_initial_state[s] is True and from zeros otherwise (None: all zeros).
    """
    total_tokens, channels = u.shape
    n_states = A.shape[1]
    num_seqs = cu_seqlens.shape[0] - 1
    zeros_channels = torch.zeros(channels, dtype=torch.float32)
    seqlens_np = cu_seqlens.detach().cpu().to(torch.int64).contiguous().numpy()
    if has_initial_state is None or initial_states is None:
        has_init_np = np.zeros(num_seqs, dtype=np.bool_)
        init_t = np.zeros((num_seqs, n_states, channels), dtype=np.float32)
    else:
        has_init_np = has_initial_state.detach().cpu().to(torch.bool).contiguous().numpy()
        init_t = _f32_numpy(initial_states.transpose(1, 2))
    z_np = _f32_numpy(z) if z is not None else np.zeros((1, 1), dtype=np.float32)

    from ._selective_scan_numba import CHANNEL_BLOCK, varlen_scan_kernel  # numba loads on first call only

    y_np = np.zeros((total_tokens, channels), dtype=np.float32)
    final_t = np.zeros((num_seqs, n_states, channels), dtype=np.float32)
    varlen_scan_kernel(
        _f32_numpy(u), _f32_numpy(delta), z_np, _f32_numpy(A.T), _f32_numpy(B), _f32_numpy(C),
        _f32_numpy(D if D is not None else zeros_channels),
        _f32_numpy(delta_bias if delta_bias is not None else zeros_channels),
        seqlens_np, init_t, has_init_np, bool(delta_softplus), z is not None, CHANNEL_BLOCK, y_np, final_t,
    )  # fmt: skip
    y = torch.from_numpy(y_np).to(device=u.device, dtype=u.dtype)
    return y, torch.from_numpy(final_t).transpose(1, 2).contiguous().to(u.device)
