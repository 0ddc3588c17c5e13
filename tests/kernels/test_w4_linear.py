"""4-bit weight linear (W4A16, W4A8): reference vs compressed-tensors, CPU path and Triton vs reference.

Tolerances:
- W4A16 CPU/Triton vs reference: |err| <= 1e-5 * (|x| @ |W|.T) + 1e-6. Both sum the same float32
  products in different orders (the reference through BLAS, the CPU kernel per group then across
  groups). Rounding errors of such sums behave as a random walk, ~sqrt(K) * 6e-8 <= 4e-6 of
  sum|x_k W_nk| for K <= 4096, inside 1e-5; one wrong weight, scale or column shifts the result by
  about sum|x_k W_nk| / K >= 2.4e-4 of it, far outside.
- W4A8: the integer group sums are exact on every path, so outputs differ only in how the K/G
  (<= 32 here) scaled group sums are rounded and added: |err| <= 1e-6 * (|x_q| @ |q * s|.T) *
  input_scale; one differently rounded x_q or one wrong q moves a result by about 1/K of that
  bound (>= 2.4e-4 of it), far outside.
"""

import os
import subprocess
import sys

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from vllm_quamba.kernels import _simd, w4_linear
from vllm_quamba.kernels.quant import quantize_int8
from vllm_quamba.kernels.w4_linear import (
    cpu_candidates,
    dequantize_w4_ref,
    prepack_w4,
    w4a8_linear,
    w4a8_linear_cpu,
    w4a8_linear_ref,
    w4a8_linear_triton,
    w4a16_linear,
    w4a16_linear_cpu,
    w4a16_linear_ref,
    w4a16_linear_triton,
)


def make_weight(out_features: int, in_features: int, group_size: int, seed: int = 0):
    """Random q in [-8, 7] packed by compressed-tensors, positive per-group scales."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (out_features, in_features), generator=g, dtype=torch.int8)
    groups = -(-in_features // group_size)
    scale = torch.rand(out_features, groups, generator=g) * 0.02 + 0.001
    return q, pack_to_int32(q, num_bits=4), scale


def bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_k |x_k| |W_nk|: the scale of the rounding error of any float32 order of x @ W.T.
    (float32 before abs: int8's abs(-128) wraps to -128.)"""
    return x.reshape(-1, x.shape[-1]).to(torch.float32).abs() @ weight.abs().T


def assert_close(actual, expected, tolerance):
    error = (actual.to(torch.float32) - expected.to(torch.float32)).reshape(tolerance.shape).abs()
    worst = (error - tolerance).max()
    assert worst <= 0, f"max error over tolerance by {worst.item():.3g}"


def test_dequantize_matches_compressed_tensors_unpack():
    q, packed, scale = make_weight(7, 200, 32)
    unpacked = unpack_from_int32(packed, 4, torch.Size((7, 200)))
    assert torch.equal(unpacked, q)
    expected = unpacked.float() * scale.repeat_interleave(32, dim=1)[:, :200]
    assert torch.equal(dequantize_w4_ref(packed, scale, 32, (7, 200)), expected)


def test_refuses_bad_layouts():
    _, packed, scale = make_weight(4, 64, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        prepack_w4(packed, scale, 12, (4, 64))
    with pytest.raises(ValueError, match="weight_scale"):
        prepack_w4(packed, scale, 16, (4, 64))
    with pytest.raises(ValueError, match="weight_packed"):
        prepack_w4(packed, scale, 32, (4, 72))


# (N, K, G, M): odd N (4-row blocks plus leftover rows), several K, G = 32, a partial last group
# (K = 200, G = 128: 72 k in the last group; K = 100 also ends mid-word), M that leaves x rows
# outside the 4-row blocks, and M = 70 at K = 4096, which the kernel takes in passes of 16 rows.
CASES = [
    (37, 128, 128, 1),
    (37, 256, 128, 3),
    (64, 768, 128, 16),
    (33, 768, 128, 65),
    (9, 4096, 128, 70),
    (50, 256, 32, 3),
    (50, 256, 32, 16),
    (21, 200, 128, 1),
    (21, 100, 32, 5),
]


@pytest.mark.parametrize("out_features,in_features,group_size,rows", CASES)
def test_w4a16_cpu_matches_ref(out_features, in_features, group_size, rows):
    _, packed, scale = make_weight(out_features, in_features, group_size)
    shape = (out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)) + 0.5  # non-zero mean
    expected = w4a16_linear_ref(x, packed, scale, group_size, shape)
    actual = w4a16_linear_cpu(x, prepack_w4(packed, scale, group_size, shape))
    weight = dequantize_w4_ref(packed, scale, group_size, shape)
    assert_close(actual, expected, 1e-5 * bound(x, weight) + 1e-6)


@pytest.mark.parametrize("out_features,in_features,group_size,rows", CASES)
def test_w4a8_cpu_matches_ref(out_features, in_features, group_size, rows):
    _, packed, scale = make_weight(out_features, in_features, group_size)
    shape = (out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(2)) * 3
    input_scale = torch.tensor([0.03])
    expected = w4a8_linear_ref(x, packed, scale, group_size, shape, input_scale)
    actual = w4a8_linear_cpu(x, prepack_w4(packed, scale, group_size, shape), input_scale)
    weight = dequantize_w4_ref(packed, scale, group_size, shape)
    assert_close(actual, expected, 1e-6 * bound(quantize_int8(x, input_scale), weight) * input_scale + 1e-7)


# w4a*_linear_cpu runs whichever kernel measured fastest on this machine: each must hold the
# tolerances alone. Cases: N with leftovers past 4-row and 16-row blocks (N = 100: 7 blocks of
# 16, the SIMD kernels' passes of 2 and 4 end on a partial one); K not a multiple of 8, 64 or G
# (a partial last group, the last word partly padding: K = 100, 13, 1000); G = 8, 32, 128; M of
# 1 and 2 (the SIMD kernels' GEMV passes), 4-row x tiles and leftovers (3, 4, 5, 16, 17, 65).
# For the AMX kernel: groups shorter than its 64-k tiles (G = 8, 32) and partial 16-row x tiles.
CANDIDATE_CASES = [
    (37, 256, 128, 3),
    (33, 768, 128, 65),
    (21, 200, 128, 17),
    (21, 100, 32, 5),
    (19, 13, 8, 4),
    (100, 1000, 128, 1),
    (100, 1000, 128, 16),
    (100, 264, 8, 2),
    (7, 776, 32, 17),
    (50, 256, 32, 1),
]
SIMD_MISSING = pytest.mark.skipif(not _simd.cpu_has("avx512_vnni"), reason="no AVX-512 VNNI on this CPU")
W4A16_KERNELS = [
    "numba",
    "dequantized_mm",
    pytest.param("simd", marks=SIMD_MISSING),
    pytest.param("dequantized_blocks_mm", marks=SIMD_MISSING),
]
SIMD_LAYOUT_KERNELS = ("simd", "amx", "dequantized_blocks_mm")
AMX_MISSING = pytest.mark.skipif(not _simd.cpu_has("amx_int8"), reason="no AMX on this CPU")
W4A8_KERNELS = [
    "numba",
    "int_mm_by_group",
    pytest.param("simd", marks=SIMD_MISSING),
    pytest.param("amx", marks=AMX_MISSING),
]


def pack_for(kernel: str, packed, scale, group_size, shape):
    """The layout the kernel reads: the SIMD one for SIMD_LAYOUT_KERNELS, the checkpoint's words otherwise."""
    return prepack_w4(packed, scale, group_size, shape, simd=kernel in SIMD_LAYOUT_KERNELS)


def run_kernel(name, x, packed, input_scale=None) -> torch.Tensor:
    y = cpu_candidates(x, packed, input_scale)[name]()
    assert y.dtype == torch.float32 and y.is_contiguous(), name
    return y


@pytest.mark.parametrize("kernel", W4A16_KERNELS)
@pytest.mark.parametrize("out_features,in_features,group_size,rows", CANDIDATE_CASES)
def test_every_w4a16_cpu_kernel_matches_ref(kernel, out_features, in_features, group_size, rows):
    _, packed, scale = make_weight(out_features, in_features, group_size, seed=3)
    shape = (out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(4)) + 0.5
    expected = w4a16_linear_ref(x, packed, scale, group_size, shape)
    weight = dequantize_w4_ref(packed, scale, group_size, shape)
    actual = run_kernel(kernel, x, pack_for(kernel, packed, scale, group_size, shape))
    assert actual.shape == expected.shape
    assert_close(actual, expected, 1e-5 * bound(x, weight) + 1e-6)


@pytest.mark.parametrize("kernel", W4A8_KERNELS)
@pytest.mark.parametrize("out_features,in_features,group_size,rows", CANDIDATE_CASES)
def test_every_w4a8_cpu_kernel_matches_ref(kernel, out_features, in_features, group_size, rows):
    _, packed, scale = make_weight(out_features, in_features, group_size, seed=5)
    shape = (out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(6)) * 3
    input_scale = torch.tensor([0.03])
    expected = w4a8_linear_ref(x, packed, scale, group_size, shape, input_scale)
    weight = dequantize_w4_ref(packed, scale, group_size, shape)
    tolerance = 1e-6 * bound(quantize_int8(x, input_scale), weight) * input_scale + 1e-7
    actual = run_kernel(kernel, x, pack_for(kernel, packed, scale, group_size, shape), input_scale)
    assert actual.shape == expected.shape
    assert_close(actual, expected, tolerance)


def test_the_default_layout_is_the_simd_one_alone_where_the_cpu_runs_it():
    """One copy of the weight, never two: the SIMD layout replaces the checkpoint's words."""
    _, packed, scale = make_weight(16, 64, 32)
    w4 = prepack_w4(packed, scale, 32, (16, 64))
    x = torch.randn(1, 64)
    simd = _simd.cpu_has("avx512_vnni")
    assert (w4.weight_blocks is not None, w4.weight_bytes is None) == (simd, simd)
    expected = ["simd", "dequantized_blocks_mm"] if simd else ["numba", "dequantized_mm"]
    assert list(cpu_candidates(x, w4)) == expected
    w4a8_expected = ["simd", "amx"] if _simd.cpu_has("amx_int8") else ["simd"]
    assert (list(cpu_candidates(x, w4, 0.1)) == w4a8_expected) == simd


def test_asking_for_the_simd_layout_without_the_kernels_fails(monkeypatch):
    monkeypatch.setattr(w4_linear, "simd_available", lambda: False)
    _, packed, scale = make_weight(16, 64, 32)
    with pytest.raises(ValueError, match="AVX-512 VNNI"):
        prepack_w4(packed, scale, 32, (16, 64), simd=True)


@SIMD_MISSING
def test_simd_kernels_take_an_empty_batch():
    _, packed, scale = make_weight(40, 64, 32)
    w4 = prepack_w4(packed, scale, 32, (40, 64), simd=True)
    x = torch.randn(0, 64)
    assert run_kernel("simd", x, w4).shape == (0, 40) and run_kernel("simd", x, w4, 0.1).shape == (0, 40)
    assert run_kernel("dequantized_blocks_mm", x, w4).shape == (0, 40)


@SIMD_MISSING
@pytest.mark.parametrize("tile_bytes", [1 << 30, 2 * 4 * 16 * 100])  # one tile; tiles of 2 blocks
def test_dequantized_blocks_are_the_reference_weight_bitwise(monkeypatch, tile_bytes):
    """x = I gives W.T exactly (each output is one product plus zeros): the C dequantization
    rounds q * scale once, as the reference does, in every tile, the last one partial (N = 100
    is 6 full blocks and 4 rows; K = 100 ends mid-word)."""
    monkeypatch.setattr(w4_linear, "DEQUANTIZED_TILE_BYTES", tile_bytes)
    _, packed, scale = make_weight(100, 100, 32, seed=7)
    w4 = prepack_w4(packed, scale, 32, (100, 100), simd=True)
    weight = dequantize_w4_ref(packed, scale, 32, (100, 100))
    assert torch.equal(run_kernel("dequantized_blocks_mm", torch.eye(100), w4), weight.t())


@AMX_MISSING
def test_amx_kernel_takes_an_empty_batch():
    _, packed, scale = make_weight(40, 64, 32)
    w4 = prepack_w4(packed, scale, 32, (40, 64), simd=True)
    assert run_kernel("amx", torch.randn(0, 64), w4, 0.1).shape == (0, 40)


@AMX_MISSING
@pytest.mark.parametrize("out_features,in_features,group_size,rows", CANDIDATE_CASES)
def test_amx_kernel_matches_the_vnni_kernel_bitwise(out_features, in_features, group_size, rows):
    """The same exact group sums, scaled and added in the same fp32 order: equal results."""
    _, packed, scale = make_weight(out_features, in_features, group_size, seed=7)
    w4 = prepack_w4(packed, scale, group_size, (out_features, in_features), simd=True)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(8)) * 3
    assert torch.equal(run_kernel("amx", x, w4, 0.03), run_kernel("simd", x, w4, 0.03))


@pytest.mark.parametrize("kernel", W4A8_KERNELS)
def test_w4a8_is_exact_integer_math(kernel):
    """One group, scales of 1: y / input_scale is the exact integer dot, saturation included,
    in the reference and in each CPU kernel."""
    q, packed, _ = make_weight(5, 64, 64)
    scale = torch.ones(5, 1)
    x = torch.linspace(-300, 300, 64)[None]  # beyond the int8 range at both ends
    input_scale = torch.tensor([1.0])
    x_q = x.round().clamp(-128, 127)
    expected = (x_q.double() @ q.double().T).float()
    assert torch.equal(w4a8_linear_ref(x, packed, scale, 64, (5, 64), input_scale), expected)
    assert torch.equal(run_kernel(kernel, x, pack_for(kernel, packed, scale, 64, (5, 64)), input_scale), expected)


def test_bias_3d_input_and_bf16():
    _, packed, scale = make_weight(19, 256, 128)
    shape = (19, 256)
    bias = torch.randn(19)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    weight = dequantize_w4_ref(packed, scale, 128, shape)
    expected = w4a16_linear_ref(x, packed, scale, 128, shape, bias)
    actual = w4a16_linear(x, packed, scale, 128, shape, bias)
    assert actual.shape == (2, 3, 19) and actual.dtype == torch.bfloat16
    # Both round the same float32 result to bf16: allow one bf16 ulp (2^-8 relative) on top.
    tolerance = 1e-5 * bound(x, weight) + 2**-8 * expected.float().abs().reshape(-1, 19) + 1e-6
    assert_close(actual, expected, tolerance)

    input_scale = torch.tensor(0.02)
    expected = w4a8_linear_ref(x, packed, scale, 128, shape, input_scale, bias)
    actual = w4a8_linear(x, packed, scale, 128, shape, input_scale, bias)
    assert actual.shape == (2, 3, 19) and actual.dtype == torch.bfloat16
    assert_close(actual, expected, 2**-8 * expected.float().abs().reshape(-1, 19) + 1e-6)


@pytest.mark.parametrize("kernel", W4A8_KERNELS)
def test_w4a8_saturates_outliers(kernel):
    """Activations far beyond 127 * input_scale clamp to +-127/-128, as the reference does."""
    _, packed, scale = make_weight(9, 128, 32)
    shape = (9, 128)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    x[:, ::7] *= 1000
    input_scale = torch.tensor([0.01])
    expected = w4a8_linear_ref(x, packed, scale, 32, shape, input_scale)
    actual = run_kernel(kernel, x, pack_for(kernel, packed, scale, 32, shape), input_scale)
    weight = dequantize_w4_ref(packed, scale, 32, shape)
    assert_close(actual, expected, 1e-6 * bound(quantize_int8(x, input_scale), weight) * input_scale + 1e-7)
    # Without the clamp the outlier columns would dominate: the test sees saturation.
    unclamped = (x / input_scale).round() @ weight.T * input_scale
    assert (unclamped - expected).abs().max() > 1.0


@pytest.mark.skipif(w4_linear.triton is None, reason="triton is not installed")
def test_triton_under_interpreter():
    """The Triton kernels against the references, in a child process that imports triton in
    interpreter mode (TRITON_INTERPRET is read at import, so it cannot be switched on in this
    session); the cases live in triton_interpreted_w4.py, which pytest does not collect itself."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cases = os.path.join(os.path.dirname(__file__), "triton_interpreted_w4.py")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cases]
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and " passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-3000:]
