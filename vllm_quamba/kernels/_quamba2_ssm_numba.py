"""numba kernels of the CPU Quamba2 SSM path (see quamba2_ssm.py); imported on first use only.

Both kernels run whole batches in one call and read and write vLLM's int8 state cache in place
through a flat view of its storage (``conv``/``ssm``: the storage, the view's storage offset
and strides; the kernels find each sequence's slot from its slot number). They end with the
gated RMSNorm, and the decode also with the online Hadamard transform when ``w.rotate``, so
the caller gets out_proj's input. The decode is also the specification of the C decode step
(csrc/quamba2_ssm_decode.c), which repeats its fp32 operations where the CPU has AVX-512 VNNI.

fastmath stays off except in ``_dot`` (reassociation only, so LLVM can vectorize the
y = state . C reduction): every quantization point then rounds the same fp32 value as the torch
reference, up to the last-ulp differences of exp (``_exp_into``) and of summation order.
"""

from collections import namedtuple

import numpy as np
from numba import njit

from ._hadamard_numba import hadamard_row
from ._numba_math import EXP_MAX, EXP_MIN, LOG2E, exp_reduced, exponent_bits, softplus

_F32 = np.float32
# Per-call work arrays of the kernels (exp: fp32 and int32 of max(conv_dim, I); z, hadamard: I).
_Scratch = namedtuple("_Scratch", ["exp", "pow2_bits", "z", "hadamard"])
_Q_MIN, _Q_MAX = _F32(-128.0), _F32(127.0)


@njit(cache=True, inline="always")
def _quantize(value, inv_scale):
    """round_half_even(value * inv_scale) clamped to int8, as quant.quantize_int8."""
    return np.int8(np.rint(min(max(value * inv_scale, _Q_MIN), _Q_MAX)))


@njit(cache=True, inline="always")
def _fake_quant(value, inv_scale, scale):
    return _F32(_quantize(value, inv_scale)) * scale


@njit(cache=True)
def _exp_into(x, sign, out, pow2_bits):
    """out[i] = exp(sign * x[i]) for fp32 arrays, in loops LLVM vectorizes (numba's np.exp is
    a scalar libm call per element: the SiLUs spent most of a decode step's non-SSM time in it).
    Measured within 1.2 ulp of exp on [-87, 88] (torch's own exp: within 0.6); exp(-87)
    ~ 1.6e-38 stands in for anything smaller, which changes no SiLU output by more than ~1e-36."""
    for i in range(x.shape[0]):
        v = min(max(sign * x[i], EXP_MIN), EXP_MAX)
        k = np.rint(v * LOG2E)
        out[i] = exp_reduced(v, k)
        pow2_bits[i] = exponent_bits(k)
    pow2 = pow2_bits.view(np.float32)
    for i in range(x.shape[0]):
        out[i] *= pow2[i]


@njit(cache=True, inline="always")
def _silu_given_exp(value, exp_minus_value):
    """silu(value) = value / (1 + exp(-value)), with exp(-value) computed by _exp_into."""
    return value / (_F32(1.0) + exp_minus_value)


@njit(cache=True)
def _conv_token(xbc_in, window, w, xbc, scratch):
    """One token of the int8 causal conv1d with SiLU, then the requantization of its output.

    xbc_in [C] are this token's in_proj outputs, window int8 [K-1, C] the previous int8 inputs
    (oldest first; shifted in place to end with this token's). xbc [C] gets the dequantized
    requantized conv output (x, B, C of the SSM). Loops run over channels innermost so that
    LLVM vectorizes them; each channel still sums its taps oldest first, as the reference.
    """
    state_len = window.shape[0]
    scale, weight = w.xbc_in_scale, w.conv_weight_t
    xbc[:] = 0.0
    for j in range(state_len):
        for c in range(xbc.shape[0]):
            xbc[c] += (_F32(window[j, c]) * scale[c]) * weight[j, c]
    for j in range(state_len - 1):
        window[j] = window[j + 1]
    newest = window[state_len - 1] if state_len > 0 else np.empty(xbc.shape[0], dtype=np.int8)
    for c in range(xbc.shape[0]):
        newest[c] = _quantize(xbc_in[c], w.xbc_in_inv[c])
        xbc[c] += (_F32(newest[c]) * scale[c]) * weight[state_len, c]
    for c in range(xbc.shape[0]):
        xbc[c] += w.conv_bias[c]
    exp_minus, pow2_bits = scratch.exp[: xbc.shape[0]], scratch.pow2_bits[: xbc.shape[0]]
    _exp_into(xbc, _F32(-1.0), exp_minus, pow2_bits)
    for c in range(xbc.shape[0]):
        activated = _silu_given_exp(xbc[c], exp_minus[c])
        xbc[c] = _fake_quant(activated, w.xbc_out_inv[c], w.xbc_out_scale[c])


@njit(cache=True)
def _effective_dt(dt_in, w):
    """dequantized int8 dt + dt_bias, softplus-ed: [H]."""
    dt = np.empty(dt_in.shape[0], dtype=np.float32)
    for h in range(dt_in.shape[0]):
        dt[h] = softplus(_fake_quant(dt_in[h], w.dt_inv, w.dt_scale) + w.dt_bias[h])
    return dt


@njit(cache=True, fastmath={"reassoc"})
def _dot(a, b):
    """a . b; reassociation lets LLVM vectorize the sum (its order differs from torch's anyway)."""
    acc = _F32(0.0)
    for n in range(a.shape[0]):
        acc += a[n] * b[n]
    return acc


@njit(cache=True, inline="always")
def _group_operands(xbc, h, w):
    """B and C of the SSD group that head h reads, as views into xbc = [x, B, C]."""
    state_size = w.state_size
    g = h // (w.num_heads // w.n_groups)
    b_start = w.num_heads * w.head_dim + g * state_size
    c_start = b_start + w.n_groups * state_size
    return xbc[b_start : b_start + state_size], xbc[c_start : c_start + state_size]


# The recurrence runs one head at a time, [P, N] in one function: per-row calls (128
# elements each) measured 1.3-1.8x slower than the whole head with its loops inlined.


@njit(cache=True)
def _head_fp32(state, decay, dt, x, b, c, d, y):
    """state[P, N] = decay * state + dt * x ⊗ b in place; y[P] = state @ c + d * x."""
    for p in range(state.shape[0]):
        dt_x = dt * x[p]
        for n in range(state.shape[1]):
            state[p, n] = decay * state[p, n] + dt_x * b[n]
    for p in range(state.shape[0]):
        y[p] = _dot(state[p], c) + d * x[p]


@njit(cache=True)
def _head_int8(state_q, scale_rows, w, decay, dt, x, b, c, d, y, new_state):
    """The same step on the int8 state[P, N], dequantized and requantized row by row (row p
    with scale row scale_rows[p] of the table); new_state [P, N] is fp32 scratch."""
    for p in range(state_q.shape[0]):
        dt_x = dt * x[p]
        scale = w.state_scale_table[scale_rows[p]]
        inv_scale = w.state_inv_table[scale_rows[p]]
        for n in range(state_q.shape[1]):
            s = decay * (_F32(state_q[p, n]) * scale[n]) + dt_x * b[n]
            new_state[p, n] = s
            state_q[p, n] = _quantize(s, inv_scale[n])
    for p in range(state_q.shape[0]):
        y[p] = _dot(new_state[p], c) + d * x[p]


@njit(cache=True)
def _ssm_token_int8(state_q, xbc, dt, decay, w, y, new_state):
    """One decode step on a sequence's int8 cache slot [H*P, N], updated in place and never
    dequantized as a whole; y [I] gets its output; new_state [P, N] is scratch."""
    for h in range(w.num_heads):
        b, c = _group_operands(xbc, h, w)
        rows = slice(h * w.head_dim, (h + 1) * w.head_dim)
        _head_int8(
            state_q[rows], w.state_scale_row[rows], w, decay[h], dt[h],
            xbc[rows], b, c, w.D[h], y[rows], new_state,
        )  # fmt: skip


@njit(cache=True)
def _dequantize_state(state_q, w, state):
    for row in range(state.shape[0]):
        scale = w.state_scale_table[w.state_scale_row[row]]
        for n in range(state.shape[1]):
            state[row, n] = _F32(state_q[row, n]) * scale[n]


@njit(cache=True)
def _quantize_state(state, w, state_q):
    for row in range(state.shape[0]):
        inv_scale = w.state_inv_table[w.state_scale_row[row]]
        for n in range(state.shape[1]):
            state_q[row, n] = _quantize(state[row, n], inv_scale[n])


@njit(cache=True)
def _gated_norm(y, z_in, w, out, scratch):
    """out[I] = gated RMSNorm of y with the dequantized int8 z, per group of I // G channels."""
    size = y.shape[0]
    z, exp_minus_z = scratch.z[:size], scratch.exp[:size]
    for i in range(size):
        z[i] = _fake_quant(z_in[i], w.z_inv, w.z_scale)
    _exp_into(z, _F32(-1.0), exp_minus_z, scratch.pow2_bits[:size])
    for i in range(size):
        out[i] = y[i] * _silu_given_exp(z[i], exp_minus_z[i])
    group = size // w.n_groups
    for start in range(0, size, group):
        gated = out[start : start + group]
        inv_rms = _F32(1.0) / np.sqrt(_dot(gated, gated) / _F32(group) + w.norm_eps)
        for i in range(start, start + group):
            out[i] = (out[i] * inv_rms) * w.norm_weight[i]


@njit(cache=True)
def _finish_token(y, z_in, w, out_row, scratch):
    _gated_norm(y, z_in, w, out_row, scratch)
    if w.rotate:
        hadamard_row(out_row, w.hadamard_base, w.hadamard_scale, scratch.hadamard)


@njit(cache=True)
def _new_scratch(w):
    intermediate = w.num_heads * w.head_dim
    size = max(intermediate, w.conv_weight_t.shape[1])
    return _Scratch(
        np.empty(size, dtype=np.float32), np.empty(size, dtype=np.int32),
        np.empty(intermediate, dtype=np.float32), np.empty(intermediate, dtype=np.float32),
    )  # fmt: skip


@njit(cache=True)
def _load_window(conv, slot, window):
    """conv: (flat storage, base offset, slot stride, state stride, channel stride)."""
    flat, base, slot_stride, state_stride, channel_stride = conv
    offset = base + slot * slot_stride
    for j in range(window.shape[0]):
        start = offset + j * state_stride
        if channel_stride == 1:  # vLLM's default "SD" layout: block copies (5-8x faster)
            window[j] = flat[start : start + window.shape[1]]
        else:
            for c in range(window.shape[1]):
                window[j, c] = flat[start + c * channel_stride]


@njit(cache=True)
def _store_window(window, conv, slot):
    flat, base, slot_stride, state_stride, channel_stride = conv
    offset = base + slot * slot_stride
    for j in range(window.shape[0]):
        start = offset + j * state_stride
        if channel_stride == 1:
            flat[start : start + window.shape[1]] = window[j]
        else:
            for c in range(window.shape[1]):
                flat[start + c * channel_stride] = window[j, c]


@njit(cache=True)
def _state_slot(ssm, slot, w):
    """ssm: (flat storage, base offset, slot stride); a slot is a contiguous [H*P, N]."""
    flat, base, slot_stride = ssm
    rows = w.num_heads * w.head_dim
    offset = base + slot * slot_stride
    return flat[offset : offset + rows * w.state_size].reshape(rows, w.state_size)


@njit(cache=True)
def decode_buffers(w, batch):
    """The decode phases' fp32 intermediates for a batch: xbc [B, conv_dim], dt and
    decay [B, H], y [B, I]."""
    conv_dim = w.conv_weight_t.shape[1]
    return (
        np.empty((batch, conv_dim), dtype=np.float32),
        np.empty((batch, w.num_heads), dtype=np.float32),
        np.empty((batch, w.num_heads), dtype=np.float32),
        np.empty((batch, w.num_heads * w.head_dim), dtype=np.float32),
    )


# A decode step runs in three phases, each over the batch it is given; decode_kernel calls them
# sequence by sequence.


@njit(cache=True)
def decode_conv(zxbcdt, w, slots, conv, xbc, dt, decay):
    """Phase 1: the conv (its window updated in place in cache slot slots[b]) and the
    effective dt of each sequence b: xbc[b] = the SSM's [x, B, C], dt[b], decay[b] = exp(dt * A)."""
    intermediate = w.num_heads * w.head_dim
    conv_dim = w.conv_weight_t.shape[1]
    window = np.empty((w.conv_weight_t.shape[0] - 1, conv_dim), dtype=np.int8)
    scratch = _new_scratch(w)
    for b in range(zxbcdt.shape[0]):
        token = zxbcdt[b]
        _load_window(conv, slots[b], window)
        _conv_token(token[intermediate : intermediate + conv_dim], window, w, xbc[b], scratch)
        _store_window(window, conv, slots[b])
        dt[b] = _effective_dt(token[intermediate + conv_dim :], w)
        for h in range(w.num_heads):
            decay[b, h] = np.exp(dt[b, h] * w.A[h])


@njit(cache=True)
def decode_states(xbc, dt, decay, w, slots, ssm, y):
    """Phase 2: the int8 state update of each sequence b in cache slot slots[b] -> y[b]."""
    new_state = np.empty((w.head_dim, w.state_size), dtype=np.float32)
    for b in range(xbc.shape[0]):
        _ssm_token_int8(_state_slot(ssm, slots[b], w), xbc[b], dt[b], decay[b], w, y[b], new_state)


@njit(cache=True)
def decode_finish(y, zxbcdt, w, out):
    """Phase 3: out[b] = the gated norm of y[b] with z of zxbcdt[b] (Hadamard-rotated if
    w.rotate)."""
    intermediate = w.num_heads * w.head_dim
    scratch = _new_scratch(w)
    for b in range(y.shape[0]):
        _finish_token(y[b], zxbcdt[b, :intermediate], w, out[b], scratch)


@njit(cache=True)
def decode_kernel(zxbcdt, w, slots, conv, ssm, out):
    """One token per sequence, the three phases in one call: zxbcdt f32 [B, in_proj_dim] ->
    out f32 [B, I]; sequence b's states are updated in place in cache slot slots[b] (conv and
    ssm as in _load_window and _state_slot). The phases run sequence by sequence: at batch 16
    that measured 1.15x faster than each phase over the whole batch."""
    xbc, dt, decay, y = decode_buffers(w, 1)
    for b in range(zxbcdt.shape[0]):
        token, slot = zxbcdt[b : b + 1], slots[b : b + 1]
        decode_conv(token, w, slot, conv, xbc, dt, decay)
        decode_states(xbc, dt, decay, w, slot, ssm, y)
        decode_finish(y, token, w, out[b : b + 1])


# Prefill tokens per block: the block's conv outputs come first, then each head runs all the
# block's tokens while its [P, N] fp32 state (32 KiB at mamba2-130m) stays in L1; token after
# token over all heads streamed the whole state (768 KiB) through L2 every token.
PREFILL_TOKEN_BLOCK = 64


@njit(cache=True)
def _scan_block(state, xbc_block, dt_block, w, y_block):
    """The recurrence over a block of tokens, head by head: y_block[t] gets token t's output."""
    for h in range(w.num_heads):
        rows = slice(h * w.head_dim, (h + 1) * w.head_dim)
        head_state = state[rows]
        for t in range(xbc_block.shape[0]):
            xbc, dt = xbc_block[t], dt_block[t, h]
            b, c = _group_operands(xbc, h, w)
            _head_fp32(head_state, np.exp(dt * w.A[h]), dt, xbc[rows], b, c, w.D[h], y_block[t, rows])


@njit(cache=True)
def prefill_kernel(zxbcdt, starts, has_initial, w, slots, conv, ssm, out):
    """Sequence s owns tokens starts[s]:starts[s + 1] of zxbcdt f32 [T, in_proj_dim] and of
    out f32 [T, I], and cache slot slots[s]; it starts from its cached states when
    has_initial[s], else from zeros, and leaves its final states in its slot. The SSM state
    stays fp32 inside a sequence, as in the reference's chunked scan, and is quantized once at
    its end."""
    intermediate = w.num_heads * w.head_dim
    conv_dim = w.conv_weight_t.shape[1]
    window = np.empty((w.conv_weight_t.shape[0] - 1, conv_dim), dtype=np.int8)
    xbc_block = np.empty((PREFILL_TOKEN_BLOCK, conv_dim), dtype=np.float32)
    dt_block = np.empty((PREFILL_TOKEN_BLOCK, w.num_heads), dtype=np.float32)
    y_block = np.empty((PREFILL_TOKEN_BLOCK, intermediate), dtype=np.float32)
    state = np.empty((intermediate, w.state_size), dtype=np.float32)
    scratch = _new_scratch(w)
    for s in range(starts.shape[0] - 1):
        state_q = _state_slot(ssm, slots[s], w)
        if has_initial[s]:
            _load_window(conv, slots[s], window)
            _dequantize_state(state_q, w, state)
        else:
            window[:] = 0
            state[:] = 0.0
        for first in range(starts[s], starts[s + 1], PREFILL_TOKEN_BLOCK):
            count = min(PREFILL_TOKEN_BLOCK, starts[s + 1] - first)
            for i in range(count):
                token = zxbcdt[first + i]
                _conv_token(token[intermediate : intermediate + conv_dim], window, w, xbc_block[i], scratch)
                dt_block[i] = _effective_dt(token[intermediate + conv_dim :], w)
            _scan_block(state, xbc_block[:count], dt_block[:count], w, y_block[:count])
            for i in range(count):
                _finish_token(y_block[i], zxbcdt[first + i, :intermediate], w, out[first + i], scratch)
        _store_window(window, conv, slots[s])
        _quantize_state(state, w, state_q)
