"""numba loops of selective_scan_varlen_cpu (see selective_scan.py); imported on first call only.

exp comes from _numba_math (k = floor(x / ln 2 + 1/2) here), so the channel loop vectorizes.
"""

import math

import numba
import numpy as np

from ._numba_math import EXP_MAX, EXP_MIN, LOG2E, exp_reduced, exponent_bits, softplus

_HALF = np.float32(0.5)
# Channels per parallel work item: a [16, 256] fp32 state block is 16 KiB, it stays in L1.
CHANNEL_BLOCK = 256


@numba.njit(cache=True, fastmath=False)
def _scan_block(u, delta, z, A_t, B, C, D, bias, delta_softplus, has_z, state, y):
    """One sequence, one block of channels, in place.

    u/delta/z/y[T, Db] (token-major), A_t/state[N, Db], B/C[T, N], D/bias[Db]. Loops run
    token -> state -> channel, so the innermost loop is over contiguous channels and has no
    reduction: y[t, d] accumulates state[n, d] * C[t, n] in the order n = 0 .. N-1.
    """
    n_states, channels = A_t.shape
    poly = np.empty(channels, dtype=np.float32)
    scale_bits = np.empty(channels, dtype=np.int32)
    scale = scale_bits.view(np.float32)  # 2^k built from its exponent bits: no gather, vectorizes
    dt = np.empty(channels, dtype=np.float32)
    dt_u = np.empty(channels, dtype=np.float32)
    acc = np.empty(channels, dtype=np.float32)
    for t in range(u.shape[0]):
        for d in range(channels):
            step = delta[t, d] + bias[d]
            if delta_softplus:
                step = softplus(step)
            dt[d] = step
            dt_u[d] = step * u[t, d]
            acc[d] = np.float32(0.0)
        for n in range(n_states):
            b, c = B[t, n], C[t, n]
            a_row, s_row = A_t[n], state[n]
            for d in range(channels):
                x = min(max(dt[d] * a_row[d], EXP_MIN), EXP_MAX)
                k = np.floor(x * LOG2E + _HALF)
                poly[d] = exp_reduced(x, k)
                scale_bits[d] = exponent_bits(k)
            for d in range(channels):
                s = (poly[d] * scale[d]) * s_row[d] + dt_u[d] * b
                s_row[d] = s
                acc[d] += s * c
        for d in range(channels):
            out = acc[d] + D[d] * u[t, d]
            if has_z:
                zt = z[t, d]
                out = out * (zt / (np.float32(1.0) + np.float32(math.exp(-zt))))
            y[t, d] = out


@numba.njit(cache=True, fastmath=False, parallel=True)
def varlen_scan_kernel(u, delta, z, A_t, B, C, D, bias, cu_seqlens, init_t, has_init, delta_softplus, has_z, block,
                        y, final_t):  # fmt: skip
    """Token-major u/delta/z/y[total_T, Dm]; A_t[N, Dm]; B/C[total_T, N]; init_t/final_t[S, N, Dm]."""
    n_states, channels = A_t.shape
    num_blocks = (channels + block - 1) // block
    for s in range(cu_seqlens.shape[0] - 1):
        start, end = cu_seqlens[s], cu_seqlens[s + 1]
        for i in numba.prange(num_blocks):
            lo, hi = i * block, min((i + 1) * block, channels)
            state = np.zeros((n_states, hi - lo), dtype=np.float32)
            if has_init[s]:
                state[:, :] = init_t[s, :, lo:hi]
            z_blk = z[start:end, lo:hi] if has_z else z[0:0, 0:0]
            a_blk = np.ascontiguousarray(A_t[:, lo:hi])  # the inner loop wants unit stride
            _scan_block(
                u[start:end, lo:hi], delta[start:end, lo:hi], z_blk, a_blk, B[start:end], C[start:end],
                D[lo:hi], bias[lo:hi], delta_softplus, has_z, state, y[start:end, lo:hi],
            )  # fmt: skip
            final_t[s, :, lo:hi] = state
