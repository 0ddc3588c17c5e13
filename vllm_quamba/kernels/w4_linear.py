"""Linear layers with 4-bit weights: W4A16 (float activations) and W4A8 (static int8 activations).

Weights use compressed-tensors' ``pack-quantized`` layout: symmetric 4-bit integers q[n, k] in
[-8, 7] for a weight of shape weight_shape = (N, K), packed by ``pack_to_int32(q, num_bits=4)``
into ``weight_packed`` int32 [N, ceil(K / 8)] (nibble i of word j holds q[n, 8j + i] + 8), with
``weight_scale`` float32 [N, ceil(K / G)] for groups of G consecutive k (the last group may be
partial). G must be a multiple of 8, so that groups start on whole bytes.

    W[n, k]  = q[n, k] * weight_scale[n, k // G]
    W4A16:   y = x.float32 @ W.T (+ bias)                                      fp32 accumulation
    W4A8:    x_q = quantize_int8(x, input_scale)                               (kernels.quant)
             y[m, n] = input_scale * sum_g weight_scale[n, g] * acc[m, n, g] (+ bias)
             acc[m, n, g] = sum_{k in group g} x_q[m, k] * q[n, k]             exact int32

x is [..., K]; y is [..., N] in x's dtype.

API (each op has the same four entry points):
- ``w4a16_linear_ref`` / ``w4a8_linear_ref``: plain torch, the specification.
- ``w4a16_linear_cpu(x, packed, bias)`` / ``w4a8_linear_cpu(x, packed, input_scale, bias)``: the
  CPU path on a ``PackedW4`` from ``prepack_w4(...)`` (call it once after loading). Its layout
  decides the kernels:
  - on CPUs with AVX-512 VNNI, C kernels (csrc/w4_linear.c) on the words regrouped into blocks of
    16 output rows (``interleave_w4``), one row per vector lane, so that no sum is reduced across
    lanes: W4A8 multiplies the nibbles by int8 x with vpdpbusd, W4A16 looks up each nibble's
    fp32 value with vpermps for an FMA. On a Sapphire Rapids Xeon (1 thread, cold cache) they
    streamed 4-bit weights at 8-13 GB/s at batch 1 (2-2.5x the numba kernel; the call overhead
    weighs on small layers), and at 16 rows ran the mamba2-130m linears 5-10x (W4A8) and
    2.5-4x (W4A16) faster than fp32 F.linear, faster than the kernels below at every shape
    measured (1 to 64 rows), so they replace them: the words are kept in their layout only.
    For prefill, W4A16 has a second candidate on the same layout: a C function dequantizes
    W.T, a tile of blocks at a time, for torch.mm (at 512 and 2048 rows of mamba2-130m's
    in_proj and out_proj: 0.90-0.96x as fast as fp32 F.linear, against 0.6-0.8x for the FMA
    kernel; at a few rows it loses by far, and measured_choice leaves it out there).
    On CPUs with AMX, W4A8 has a second C kernel on the same layout, and measured_choice picks
    between the two per call shape: tdpbssd multiplies tiles of the unpacked nibbles by 16 rows
    of x at a time. Where the VNNI kernel is compute-bound (16 rows and up) it measured 1.7-2.5x
    faster (mamba2-130m's in_proj, out_proj and lm_head at G = 128, 16 to 512 rows);
  - elsewhere, on a view of the checkpoint's words, two kernels compete per call shape
    (``measured_choice``: the faster on this machine wins):
    - a single-threaded numba kernel for every M: it unpacks the nibbles in its inner loop and
      multiplies 4 weight rows by 4 x rows per pass, so each weight byte is unpacked once per 4
      rows of x and each x load serves 4 weight rows. On an AMD Zen 5 (AVX-512, no AMX) it beat
      dequantizing weight tiles for torch.mm at every M measured (1 to 512);
    - the GEMM library on weight tiles unpacked one at a time (1 MiB, L2-resident): W4A16 by
      torch.mm on dequantized fp32 tiles, W4A8 by torch._int_mm per group on int8 tiles. On a
      Xeon with AMX the numba kernel lost to fp32 F.linear from 16 rows up (0.3x at 128 rows),
      where these win.
  W4A8's per-group integer sums are exact in all; the float sums over k (W4A16) and over
  groups differ only in order, within the tests' stated fp32 tolerance.
- ``w4a16_linear_triton`` / ``w4a8_linear_triton``: a Triton kernel (GPU, or CPU under
  TRITON_INTERPRET=1); W4A8 multiplies int8 by int8 into int32 one group at a time.
- ``w4a16_linear`` / ``w4a8_linear``: dispatch on x's device (CUDA -> Triton, CPU -> the CPU path),
  with the reference's signature.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_quamba.kernels import _simd
from vllm_quamba.kernels.measured_choice import run_fastest
from vllm_quamba.kernels.quant import f32_contiguous, quantize_int8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton still get the reference and the numba path
    triton = None

PACK_FACTOR = 8  # 4-bit values per int32 word
# x rows per pass of the numba kernel: they stay in L2 (1 MiB) while all weight rows stream by.
X_PASS_BYTES = 256 * 1024
# Weight rows unpacked per tile for torch.mm / torch._int_mm: a tile stays in L2.
LIBRARY_TILE_BYTES = 1 << 20
# Output rows per block of the SIMD kernels' weight layout: one int32 lane each in a zmm register.
SIMD_BLOCK_ROWS = 16
# W.T columns dequantized per torch.mm of _dequantized_blocks_mm: all of mamba2-130m's in_proj
# (10 MB; it then costs one GEMM, as F.linear), two tiles of mamba2-370m's, a slice of an lm_head.
DEQUANTIZED_TILE_BYTES = 16 << 20


def _check_layout(weight_packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int, weight_shape) -> tuple[int, int]:
    out_features, in_features = (int(d) for d in weight_shape)
    if group_size <= 0 or group_size % PACK_FACTOR != 0:
        raise ValueError(f"group_size must be a positive multiple of {PACK_FACTOR}, got {group_size}.")
    words = -(-in_features // PACK_FACTOR)
    if weight_packed.dtype != torch.int32 or tuple(weight_packed.shape) != (out_features, words):
        got = f"{weight_packed.dtype} {list(weight_packed.shape)}"
        raise ValueError(f"weight_packed must be int32 [{out_features}, {words}], got {got}.")
    groups = -(-in_features // group_size)
    if tuple(weight_scale.shape) != (out_features, groups):
        expected = f"[{out_features}, {groups}] for group_size {group_size}"
        raise ValueError(f"weight_scale must be {expected}, got {list(weight_scale.shape)}.")
    return out_features, in_features


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 [M, N] -> x's leading shape and dtype, with the bias added in float32."""
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Reference


def dequantize_w4_ref(weight_packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int, weight_shape) -> torch.Tensor:
    """float32 W [N, K] = q * weight_scale[:, k // G], q unpacked by compressed-tensors itself."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # slow import

    out_features, in_features = _check_layout(weight_packed, weight_scale, group_size, weight_shape)
    q = unpack_from_int32(weight_packed, 4, torch.Size((out_features, in_features)))
    scale_per_column = weight_scale.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :in_features]
    return q.to(torch.float32) * scale_per_column


def w4a16_linear_ref(x, weight_packed, weight_scale, group_size, weight_shape, bias=None) -> torch.Tensor:
    weight = dequantize_w4_ref(weight_packed, weight_scale, group_size, weight_shape)
    y = x.reshape(-1, x.shape[-1]).to(torch.float32) @ weight.T
    return _finish(y, x, bias)


def w4a8_linear_ref(x, weight_packed, weight_scale, group_size, weight_shape, input_scale, bias=None) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # slow import

    out_features, in_features = _check_layout(weight_packed, weight_scale, group_size, weight_shape)
    groups = weight_scale.shape[1]
    padded = groups * group_size
    q = unpack_from_int32(weight_packed, 4, torch.Size((out_features, in_features)))
    x_q = quantize_int8(x.reshape(-1, in_features), input_scale)
    # Zero-pad K to whole groups; float64 products and sums of these small integers are exact.
    q_groups = torch.nn.functional.pad(q.to(torch.float64), (0, padded - in_features)).reshape(out_features, groups, group_size)
    x_groups = torch.nn.functional.pad(x_q.to(torch.float64), (0, padded - in_features)).reshape(-1, groups, group_size)
    acc = torch.einsum("mgk,ngk->mng", x_groups, q_groups).to(torch.int32)
    y = (acc.to(torch.float32) * weight_scale.to(torch.float32)).sum(dim=-1)
    y = y * torch.as_tensor(input_scale, dtype=torch.float32).reshape(())
    return _finish(y, x, bias)


# ---------------------------------------------------------------------------------------------
# CPU: numba, the GEMM library and the C SIMD kernels


@dataclass(frozen=True)
class PackedW4:
    """CPU form of a pack-quantized weight, in one of two layouts, never both (a second copy
    would double the resident 4-bit weight):
    - ``weight_blocks`` (interleave_w4) where this CPU runs the C SIMD kernels, then the only
      candidates (they beat the others at every shape measured, see the module docstring;
      W4A8 adds the AMX kernel where the CPU has AMX);
    - else ``weight_bytes``: the int32 words read as bytes (two k per byte), a view of the
      checkpoint tensor, for the numba and GEMM-library kernels.
    """

    weight_bytes: torch.Tensor | None  # uint8 [N, 4 * ceil(K / 8)]
    weight_blocks: torch.Tensor | None  # int32 [ceil(N / 16), ceil(K / 8), 16]
    weight_scale: torch.Tensor  # float32 [N, ceil(K / G)]
    # The same scales transposed, float32 [ceil(K / G), N], for the epilogues of
    # _int_mm_by_group and the SIMD kernels (their loops over N vectorize). A resident copy:
    # 4 * N * K / G more bytes, 8 / G of the packed weight's (1/16 more at G = 128).
    weight_scale_t: torch.Tensor
    group_size: int
    out_features: int
    in_features: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weight in its layout, the scales and the transposed scales (what a torch custom
        op can take: from_tensors rebuilds the PackedW4 from them without copying)."""
        weight = self.weight_blocks if self.weight_blocks is not None else self.weight_bytes
        return weight, self.weight_scale, self.weight_scale_t

    @classmethod
    def from_tensors(cls, weight, weight_scale, weight_scale_t, group_size, out_features, in_features) -> "PackedW4":
        simd = weight.dtype == torch.int32  # the blocks keep the words; the bytes view is uint8
        return cls(
            weight_bytes=None if simd else weight, weight_blocks=weight if simd else None,
            weight_scale=weight_scale, weight_scale_t=weight_scale_t,
            group_size=group_size, out_features=out_features, in_features=in_features,
        )  # fmt: skip


def interleave_w4(weight_packed: torch.Tensor) -> torch.Tensor:
    """int32 words [N, W] -> [ceil(N / 16), W, 16]: word w of 16 consecutive rows side by side
    (rows past N zero), so that one 64-byte load gives one word of 16 rows (csrc/w4_linear.c)."""
    out_features, words = weight_packed.shape
    blocks = -(-out_features // SIMD_BLOCK_ROWS)
    padded = torch.nn.functional.pad(weight_packed, (0, 0, 0, blocks * SIMD_BLOCK_ROWS - out_features))
    return padded.reshape(blocks, SIMD_BLOCK_ROWS, words).transpose(1, 2).contiguous()


def simd_available() -> bool:
    """Whether this CPU runs the C SIMD kernels (both need the same instructions)."""
    return "simd" in _simd_kernels_w4a8() and _simd_kernel_w4a16() is not None


def prepack_w4(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int, weight_shape, simd: bool | None = None
) -> PackedW4:
    """Validate the checkpoint tensors and lay them out for the CPU path: for the SIMD kernels
    when ``simd`` (default: where this CPU runs them; a copy of the words in their layout, after
    which the checkpoint tensor is no longer needed), else as a view of weight_packed. The
    scales are copied once more, transposed."""
    out_features, in_features = _check_layout(weight_packed, weight_scale, group_size, weight_shape)
    if weight_packed.device.type != "cpu":
        raise ValueError("prepack_w4 is for the CPU path; weight_packed is on " + str(weight_packed.device))
    if simd is None:
        simd = simd_available()
    elif simd and not simd_available():
        raise ValueError("this CPU does not run the SIMD kernels (they need AVX-512 VNNI)")
    return PackedW4(
        # Little-endian words: byte t holds k = 2t (low nibble) and k = 2t + 1 (high nibble).
        weight_bytes=None if simd else weight_packed.contiguous().view(torch.uint8),
        weight_blocks=interleave_w4(weight_packed) if simd else None,
        weight_scale=weight_scale.to(torch.float32).contiguous(),
        weight_scale_t=weight_scale.to(torch.float32).t().contiguous(),
        group_size=group_size,
        out_features=out_features,
        in_features=in_features,
    )


def _numba_linear(x: torch.Tensor, packed: PackedW4, input_scale=None) -> torch.Tensor:
    """float32 [M, N]; W4A8 when input_scale is given (x quantized inside the compiled call)."""
    from vllm_quamba.kernels._w4_linear_numba import w4_linear

    x2d = x.reshape(-1, packed.in_features).to(torch.float32).contiguous()
    row_bytes = 4 * 2 * packed.weight_bytes.shape[1]  # x_even + x_odd
    x_rows_per_pass = max(4, X_PASS_BYTES // row_bytes // 4 * 4)  # whole 4-row blocks
    quantize = input_scale is not None
    y = w4_linear(
        packed.weight_bytes.numpy(), packed.weight_scale.numpy(), x2d.numpy(), packed.group_size // 2,
        x_rows_per_pass, quantize, float(input_scale) if quantize else 1.0,
    )  # fmt: skip
    return torch.from_numpy(y)


def _padded_x(x: torch.Tensor, packed: PackedW4, width: int) -> torch.Tensor:
    """x as float32 [M, width], zero past K (zero inputs cancel the packing's padding nibbles)."""
    x2d = x.reshape(-1, packed.in_features).to(torch.float32)
    return torch.nn.functional.pad(x2d, (0, width - packed.in_features))


def _even_then_odd(x: torch.Tensor) -> torch.Tensor:
    """[M, 2j] -> [M, 2j] with the even columns first: the unpacked tiles' order of k."""
    return torch.cat([x[:, 0::2], x[:, 1::2]], dim=1)


def _tile_rows(packed: PackedW4, bytes_per_row: int) -> int:
    return max(1, min(packed.out_features, LIBRARY_TILE_BYTES // bytes_per_row))


def _dequantized_mm(x: torch.Tensor, packed: PackedW4) -> torch.Tensor:
    """W4A16 by torch.mm on fp32 weight tiles dequantized one at a time: float32 [M, N]."""
    from vllm_quamba.kernels._w4_linear_numba import dequantize_rows

    width = 2 * packed.weight_bytes.shape[1]
    x_padded = _even_then_odd(_padded_x(x, packed, width))
    out_t = torch.empty(packed.out_features, x_padded.shape[0])
    tile = torch.empty(_tile_rows(packed, 4 * width), width)
    weight_bytes, scales = packed.weight_bytes.numpy(), packed.weight_scale.numpy()
    for start in range(0, packed.out_features, tile.shape[0]):
        rows = tile[: min(tile.shape[0], packed.out_features - start)]
        dequantize_rows(weight_bytes, scales, packed.group_size // 2, start, rows.numpy())
        torch.mm(rows, x_padded.t(), out=out_t[start : start + rows.shape[0]])
    return out_t.t().contiguous()


def _int_mm_by_group(x: torch.Tensor, packed: PackedW4, input_scale) -> torch.Tensor:
    """W4A8 by torch._int_mm, one group of K at a time (each group has its own scale), on int8
    weight tiles unpacked one at a time: float32 [M, N]."""
    from vllm_quamba.kernels._int8_linear_numba import quantize_input
    from vllm_quamba.kernels._w4_linear_numba import scale_group_sums, unpack_groups

    groups, group_size = packed.weight_scale.shape[1], packed.group_size
    input_scale = float(input_scale)
    x_q = torch.from_numpy(quantize_input(_padded_x(x, packed, groups * group_size).contiguous().numpy(), input_scale))
    x_groups = [_even_then_odd(x_q[:, g * group_size : (g + 1) * group_size]) for g in range(groups)]
    out = torch.empty(x_q.shape[0], packed.out_features)
    tile_rows = _tile_rows(packed, groups * group_size)
    weight_bytes, scales_t = packed.weight_bytes.numpy(), packed.weight_scale_t.numpy()
    for start in range(0, packed.out_features, tile_rows):
        rows = min(tile_rows, packed.out_features - start)
        tile = torch.empty(groups, rows, group_size, dtype=torch.int8)
        unpack_groups(weight_bytes, group_size // 2, start, tile.numpy())
        acc = torch.empty(groups, x_q.shape[0], rows, dtype=torch.int32)
        for g in range(groups):
            torch._int_mm(x_groups[g], tile[g].t(), out=acc[g])
        scale_group_sums(acc.numpy(), scales_t, start, input_scale, out.numpy())
    return out


@functools.cache
def _simd_kernels_w4a8() -> dict[str, Callable]:
    """csrc/w4_linear.c's W4A8 kernels this CPU runs, by candidate name (AVX-512 VNNI, AMX)."""
    p, i64, f32 = _simd.POINTER, _simd.INT64, _simd.FLOAT
    return _simd.functions(
        (p, i64, i64, f32, p, i64, p, i64, p),
        {"simd": ("quamba_w4a8_linear_avx512_vnni", "avx512_vnni"), "amx": ("quamba_w4a8_linear_amx", "amx_int8")},
    )


@functools.cache
def _simd_kernel_w4a16():
    """csrc/w4_linear.c's W4A16 kernel, or None where this CPU lacks AVX-512 VNNI."""
    p, i64 = _simd.POINTER, _simd.INT64
    return _simd.function("quamba_w4a16_linear_avx512_vnni", "avx512_vnni", p, i64, i64, p, i64, p, i64, p)


def _simd_linear(x: torch.Tensor, packed: PackedW4, input_scale=None, w4a8_kernel: str = "simd") -> torch.Tensor:
    """float32 [M, N] from csrc/w4_linear.c; W4A8 when input_scale is given, by w4a8_kernel."""
    x2d = f32_contiguous(x.reshape(-1, packed.in_features))
    rows, (out_features, in_features) = x2d.shape[0], (packed.out_features, packed.in_features)
    out = torch.empty(rows, out_features)
    weight = (packed.weight_blocks.data_ptr(), out_features, packed.weight_scale_t.data_ptr(), packed.group_size)
    if input_scale is None:
        status = _simd_kernel_w4a16()(x2d.data_ptr(), rows, in_features, *weight, out.data_ptr())
    else:
        input_scale = input_scale.item() if isinstance(input_scale, torch.Tensor) else float(input_scale)
        kernel = _simd_kernels_w4a8()[w4a8_kernel]
        status = kernel(x2d.data_ptr(), rows, in_features, input_scale, *weight, out.data_ptr())
    if status != 0:
        raise MemoryError(f"w4_linear: no memory for the SIMD kernel's scratch copy of a [{rows}, {in_features}] input")
    return out


@functools.cache
def _simd_dequantize_t():
    """csrc/w4_linear.c's dequantization of the blocks into W.T, or None without AVX-512 VNNI."""
    p, i64 = _simd.POINTER, _simd.INT64
    return _simd.function("quamba_w4_dequantize_t_avx512", "avx512_vnni", p, i64, i64, p, i64, i64, i64, p, i64)


def _dequantized_blocks_mm(x: torch.Tensor, packed: PackedW4) -> torch.Tensor:
    """W4A16 by torch.mm on W.T dequantized from the blocks, a tile of 16-row blocks at a
    time: float32 [M, N]. For many rows of x (prefill), where the C kernel's FMA loop ran
    0.8-0.9x as fast as the GEMM library's fp32 F.linear."""
    x2d = f32_contiguous(x.reshape(-1, packed.in_features))
    in_features, out_features = packed.in_features, packed.out_features
    num_blocks = packed.weight_blocks.shape[0]
    tile_blocks = min(num_blocks, max(1, DEQUANTIZED_TILE_BYTES // (4 * in_features * SIMD_BLOCK_ROWS)))
    weight_t = torch.empty(in_features, tile_blocks * SIMD_BLOCK_ROWS)
    out = torch.empty(x2d.shape[0], out_features)
    dequantize = _simd_dequantize_t()
    for b0 in range(0, num_blocks, tile_blocks):
        nb = min(tile_blocks, num_blocks - b0)
        dequantize(
            packed.weight_blocks.data_ptr(), in_features, out_features, packed.weight_scale_t.data_ptr(),
            packed.group_size, b0, nb, weight_t.data_ptr(), weight_t.shape[1],
        )  # fmt: skip
        n0, n1 = b0 * SIMD_BLOCK_ROWS, min(out_features, (b0 + nb) * SIMD_BLOCK_ROWS)
        torch.mm(x2d, weight_t[:, : n1 - n0], out=out[:, n0:n1])
    return out


def cpu_candidates(x: torch.Tensor, packed: PackedW4, input_scale=None) -> dict[str, Callable[[], torch.Tensor]]:
    """The CPU kernels for x [..., K] on packed's layout, by name, each returning float32
    [M, N]: W4A8 when input_scale is given, else W4A16."""
    if packed.weight_blocks is not None:
        if input_scale is None:
            return {"simd": lambda: _simd_linear(x, packed), "dequantized_blocks_mm": lambda: _dequantized_blocks_mm(x, packed)}
        return {name: functools.partial(_simd_linear, x, packed, input_scale, name) for name in _simd_kernels_w4a8()}
    if input_scale is None:
        return {"numba": lambda: _numba_linear(x, packed), "dequantized_mm": lambda: _dequantized_mm(x, packed)}
    return {
        "numba": lambda: _numba_linear(x, packed, input_scale),
        "int_mm_by_group": lambda: _int_mm_by_group(x, packed, input_scale),
    }


def _cpu_linear(x: torch.Tensor, packed: PackedW4, input_scale=None) -> torch.Tensor:
    kind = ("w4a16" if input_scale is None else "w4a8", packed.out_features, packed.in_features)
    x2d = x.reshape(-1, packed.in_features)
    return run_fastest(kind, x2d, lambda rows: cpu_candidates(rows, packed, input_scale))


def w4a16_linear_cpu(x: torch.Tensor, packed: PackedW4, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _finish(_cpu_linear(x, packed), x, bias)


def w4a8_linear_cpu(x: torch.Tensor, packed: PackedW4, input_scale, bias: torch.Tensor | None = None) -> torch.Tensor:
    """input_scale: a float or a one-element tensor (a float avoids a .item() per call)."""
    # int8 values are exact in float32; the kernel's per-group sums stay exact integers (< 2^24).
    return _finish(_cpu_linear(x, packed, input_scale), x, bias)


# ---------------------------------------------------------------------------------------------
# Triton

if triton is not None:

    @triton.jit
    def _w4_linear_kernel(
        x_ptr, words_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
        GROUP_SIZE: tl.constexpr, INT8_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """y[m, n] = sum over K chunks (each inside one group) of scale[n, g] * chunk dot."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0)
            # Each word is read by its 8 k (cache hits); shift its nibble down and re-centre it.
            w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            word = tl.load(words_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] // 8, mask=w_mask, other=0)
            q = ((word >> ((offs_k[None, :] % 8) * 4)) & 15) - 8  # [BLOCK_N, BLOCK_K] int32
            scale = tl.load(scale_ptr + offs_n * stride_sn + k_start // GROUP_SIZE, mask=offs_n < N, other=0.0)
            if INT8_DOT:
                chunk = tl.dot(x, tl.trans(q.to(tl.int8)), out_dtype=tl.int32)  # exact
                acc += chunk.to(tl.float32) * scale[None, :]
            else:
                weight = q.to(tl.float32) * scale[:, None]
                acc += tl.dot(x.to(tl.float32), tl.trans(weight), input_precision="ieee")
        y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=y_mask)


def _triton_matmul(x2d, weight_packed, weight_scale, group_size, weight_shape, int8_dot: bool) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed: use the _cpu or _ref functions.")
    out_features, in_features = _check_layout(weight_packed, weight_scale, group_size, weight_shape)
    # A K chunk must lie inside one group (one scale) and tl.dot needs K >= 16.
    block_k = next((size for size in (64, 32, 16) if group_size % size == 0), None)
    if block_k is None:
        raise ValueError(f"the Triton path needs group_size a multiple of 16, got {group_size}.")
    block_m, block_n = 16, 32
    y = torch.empty(x2d.shape[0], out_features, dtype=torch.float32, device=x2d.device)
    scale = weight_scale.to(torch.float32).contiguous()
    words = weight_packed.contiguous()
    grid = (triton.cdiv(x2d.shape[0], block_m), triton.cdiv(out_features, block_n))
    _w4_linear_kernel[grid](
        x2d, words, scale, y, x2d.shape[0], out_features, in_features, x2d.stride(0), words.stride(0),
        scale.stride(0), y.stride(0), GROUP_SIZE=group_size, INT8_DOT=int8_dot,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return y


def w4a16_linear_triton(x, weight_packed, weight_scale, group_size, weight_shape, bias=None) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    y = _triton_matmul(x2d, weight_packed, weight_scale, group_size, weight_shape, int8_dot=False)
    return _finish(y, x, bias)


def w4a8_linear_triton(x, weight_packed, weight_scale, group_size, weight_shape, input_scale, bias=None) -> torch.Tensor:
    x_q = quantize_int8(x.reshape(-1, x.shape[-1]), input_scale).contiguous()
    y = _triton_matmul(x_q, weight_packed, weight_scale, group_size, weight_shape, int8_dot=True)
    y = y * torch.as_tensor(input_scale, dtype=torch.float32, device=y.device).reshape(())
    return _finish(y, x, bias)


# ---------------------------------------------------------------------------------------------
# Dispatch


def w4a16_linear(x, weight_packed, weight_scale, group_size, weight_shape, bias=None) -> torch.Tensor:
    if x.is_cuda:
        return w4a16_linear_triton(x, weight_packed, weight_scale, group_size, weight_shape, bias)
    return w4a16_linear_cpu(x, prepack_w4(weight_packed, weight_scale, group_size, weight_shape), bias)


def w4a8_linear(x, weight_packed, weight_scale, group_size, weight_shape, input_scale, bias=None) -> torch.Tensor:
    if x.is_cuda:
        return w4a8_linear_triton(x, weight_packed, weight_scale, group_size, weight_shape, input_scale, bias)
    packed = prepack_w4(weight_packed, weight_scale, group_size, weight_shape)
    return w4a8_linear_cpu(x, packed, input_scale, bias)
