"""W8A8 linear: static per-tensor int8 input, int8 weight with per-output-channel scales.

For x[..., K] (fp32/bf16/fp16), weight int8 [N, K], weight_scale fp32 [N] or [N, 1],
input_scale fp32 scalar or [1], optional bias [N]:

    x_q = quantize_int8(x, input_scale)            # rint(x * (1 / input_scale)), clamped to int8
    acc = x_q.int32 @ weight.int32.T               # exact int32 accumulation
    y   = acc.fp32 * (input_scale * weight_scale)  # fp32; then + bias.fp32 when given
    -> y in out_dtype (default x.dtype), shape [..., N]

Public functions, all with the signature of w8a8_linear_ref:
- w8a8_linear_ref: the plain-torch specification.
- w8a8_linear_cpu: the CPU fast path, the fastest on this machine and call shape (measured on
  the first call of each shape class: measured_choice.py) of up to three exact kernels:
  - on CPUs with AVX-512 VNNI, a C kernel (csrc/w8a8_linear.c) that multiplies int8 by int8
    with vpdpbusd, reading each group of 4 weight rows once for every row of x: the int8
    weights stream at memory speed at batch 1, where the numba kernel's int32 arithmetic
    limited it to about half of that;
  - a single-threaded numba kernel (_int8_linear_numba) that reads the int8 weight as stored
    (row-major [N, K]: no pre-packing step) in register tiles of 4 x 4 int32 accumulators;
    on an AVX2 CPU it beat fp32 F.linear at every row count from 1 to 512
    (benchmarks/bench_linear.py), while torch's oneDNN int8 GEMMs were 12-20x slower than fp32;
  - torch._int_mm (oneDNN) between the reference's quantization and epilogue: on a Xeon with
    AMX it measured 3-6x faster than fp32 from 16 rows up, where the numba kernel (no VNNI/AMX)
    lost to fp32.
  Both sum exactly in int32 and round the epilogue as the reference, so the choice never changes
  a result.
- w8a8_linear_triton: the Triton kernel (CUDA tensors; on CPU only under TRITON_INTERPRET=1),
  tiles of 16 rows x 64 output channels, int8 tl.dot into int32. Tested in the interpreter
  only (no GPU here); it avoids the two GPU-only deviations from the reference it could have:
  fp32 division (the reciprocal comes from torch) and FMA contraction (enable_fp_fusion=False).
- w8a8_linear: dispatch by device (cuda -> Triton, cpu -> w8a8_linear_cpu).
"""

import functools
from collections.abc import Callable

import torch

from . import _simd
from .measured_choice import run_fastest
from .quant import f32_contiguous, quantize_int8


def _flat_scales(input_scale, weight_scale) -> tuple[torch.Tensor, torch.Tensor]:
    input_scale = torch.as_tensor(input_scale, dtype=torch.float32).reshape(-1)
    return input_scale, weight_scale.to(torch.float32).reshape(-1)


def _epilogue(acc, input_scale, weight_scale, bias, out_dtype) -> torch.Tensor:
    input_scale, weight_scale = _flat_scales(input_scale, weight_scale)
    y = acc.to(torch.float32) * (input_scale.to(acc.device) * weight_scale)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def w8a8_linear_ref(x, weight, weight_scale, input_scale, bias=None, out_dtype=None) -> torch.Tensor:
    x_q = quantize_int8(x, torch.as_tensor(input_scale, dtype=torch.float32, device=x.device).reshape(-1))
    acc = x_q.to(torch.int32) @ weight.to(torch.int32).T
    return _epilogue(acc, input_scale, weight_scale, bias, out_dtype or x.dtype)


def _f32_numpy(t: torch.Tensor):
    return f32_contiguous(t).numpy()


def _numba_args(x2d, weight_scale, input_scale, bias):
    """The numba kernels' forms of the inputs: fp32 arrays, the input scale as a Python float
    (which holds an fp32 value exactly; the kernels cast it back to fp32), and the bias (or any
    fp32 array when there is none) with its flag."""
    input_scale = input_scale.item() if isinstance(input_scale, torch.Tensor) else float(input_scale)
    weight_scale = _f32_numpy(weight_scale.reshape(-1))
    has_bias = bias is not None
    return _f32_numpy(x2d), input_scale, weight_scale, _f32_numpy(bias) if has_bias else weight_scale, has_bias


def _numba_linear(x2d, weight, weight_scale, input_scale, bias) -> torch.Tensor:
    from . import _int8_linear_numba  # numba loads on first call only: see DESIGN.md

    x, input_scale, weight_scale, bias, has_bias = _numba_args(x2d, weight_scale, input_scale, bias)
    out = _int8_linear_numba.w8a8_linear_kernel(
        x, input_scale, weight.contiguous().numpy(), weight_scale, bias, has_bias
    )
    return torch.from_numpy(out)


def _int_mm_linear(x2d, weight, weight_scale, input_scale, bias) -> torch.Tensor:
    """torch._int_mm between numba's quantization and epilogue (torch's own took 0.2 ms of a
    0.5 ms 16-row in_proj)."""
    from . import _int8_linear_numba

    x, input_scale, weight_scale, bias, has_bias = _numba_args(x2d, weight_scale, input_scale, bias)
    x_q = torch.from_numpy(_int8_linear_numba.quantize_input(x, input_scale))
    acc = torch._int_mm(x_q, weight.t())
    return torch.from_numpy(_int8_linear_numba.epilogue(acc.numpy(), input_scale, weight_scale, bias, has_bias))


@functools.cache
def _simd_kernels() -> dict[str, Callable]:
    """csrc/w8a8_linear.c's kernels this CPU runs, by candidate name (AVX-512 VNNI, AMX)."""
    p, i64, f32 = _simd.POINTER, _simd.INT64, _simd.FLOAT
    return _simd.functions(
        (p, i64, i64, f32, p, i64, p, p, p),
        {"simd": ("quamba_w8a8_linear_avx512_vnni", "avx512_vnni"), "amx": ("quamba_w8a8_linear_amx", "amx_int8")},
    )


def _simd_linear(kernel, x2d, weight, weight_scale, input_scale, bias) -> torch.Tensor:
    x = f32_contiguous(x2d)
    weight = weight.contiguous()
    weight_scale = f32_contiguous(weight_scale.reshape(-1))
    bias = None if bias is None else f32_contiguous(bias)
    input_scale = input_scale.item() if isinstance(input_scale, torch.Tensor) else float(input_scale)
    (rows, cols_in), cols_out = x.shape, weight.shape[0]
    out = torch.empty(rows, cols_out, dtype=torch.float32)
    status = kernel(
        x.data_ptr(), rows, cols_in, input_scale, weight.data_ptr(), cols_out, weight_scale.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"w8a8_linear: no memory for the int8 copy of a [{rows}, {cols_in}] input")
    return out


def cpu_candidates(x2d, weight, weight_scale, input_scale, bias) -> dict[str, Callable[[], torch.Tensor]]:
    """The exact CPU kernels for x2d [M, K] on this CPU, by name, each returning fp32 [M, N]."""
    args = (x2d, weight, weight_scale, input_scale, bias)
    candidates = {"numba": lambda: _numba_linear(*args), "int_mm": lambda: _int_mm_linear(*args)}
    for name, kernel in _simd_kernels().items():
        candidates[name] = functools.partial(_simd_linear, kernel, *args)
    return candidates


def w8a8_linear_cpu(x, weight, weight_scale, input_scale, bias=None, out_dtype=None) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    args = (weight, weight_scale, input_scale, bias)
    y = run_fastest(("w8a8", *weight.shape), x2d, lambda rows: cpu_candidates(rows, *args))
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y.to(out_dtype or x.dtype)


@functools.cache
def _triton_kernel():
    """The Triton kernel, defined on first use: triton.jit reads TRITON_INTERPRET when it runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, w_scale_ptr, in_scale_ptr, inv_in_scale_ptr, bias_ptr, out_ptr, M, N, K,
               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_scale = tl.load(in_scale_ptr)
        inv_scale = tl.load(inv_in_scale_ptr)  # torch's reciprocal: GPU fp32 division may be inexact
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x_mask = (rows[:, None] < M) & (ks[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=x_mask, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(x * inv_scale, -128.0), 127.0)
            # Adding and removing 1.5 * 2^23 rounds |v| < 2^22 to the nearest integer, ties to even.
            x_q = ((v + 12582912.0) - 12582912.0).to(tl.int8)
            w_mask = (cols[None, :] < N) & (ks[:, None] < K)
            w_t = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=w_mask, other=0)  # [BLOCK_K, BLOCK_N]
            acc += tl.dot(x_q, w_t, out_dtype=tl.int32)
        w_scale = tl.load(w_scale_ptr + cols, mask=cols < N, other=0.0)
        y = acc.to(tl.float32) * (in_scale * w_scale)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out_mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=out_mask)

    return kernel


def w8a8_linear_triton(x, weight, weight_scale, input_scale, bias=None, out_dtype=None) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    rows, cols_in = x2d.shape
    cols_out = weight.shape[0]
    out = torch.empty(rows, cols_out, dtype=out_dtype or x.dtype, device=x.device)
    input_scale, weight_scale = _flat_scales(input_scale, weight_scale)
    input_scale, weight_scale = input_scale.to(x.device), weight_scale.to(x.device).contiguous()
    # tl.dot needs blocks of at least 16; 16 rows suit decode, 64 x 64 the weight tiles.
    block_m, block_n, block_k = 16, 64, 64
    grid = ((rows + block_m - 1) // block_m, (cols_out + block_n - 1) // block_n)
    has_bias = bias is not None
    _triton_kernel()[grid](
        x2d, weight.contiguous(), weight_scale, input_scale, input_scale.reciprocal(),
        bias.contiguous() if has_bias else weight_scale, out, rows, cols_out, cols_in,
        HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        enable_fp_fusion=False,  # an FMA in the epilogue would round differently from the reference
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], cols_out)


def w8a8_linear(x, weight, weight_scale, input_scale, bias=None, out_dtype=None) -> torch.Tensor:
    if x.is_cuda:
        return w8a8_linear_triton(x, weight, weight_scale, input_scale, bias, out_dtype)
    return w8a8_linear_cpu(x, weight, weight_scale, input_scale, bias, out_dtype)
