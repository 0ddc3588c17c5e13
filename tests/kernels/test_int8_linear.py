import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_quamba.kernels import _simd
from vllm_quamba.kernels.int8_linear import cpu_candidates, w8a8_linear, w8a8_linear_cpu, w8a8_linear_ref
from vllm_quamba.kernels.quant import quantize_int8, quantize_per_channel_int8

torch.set_num_threads(1)

# Bit-exact, rtol = atol = 0: every path sums int32 products exactly and applies the same fp32
# multiply (then add) in the same order, with no FMA contraction (numba runs without fastmath).
EXACT = dict(rtol=0, atol=0)
NO_VNNI = pytest.mark.skipif(not _simd.cpu_has("avx512_vnni"), reason="no AVX-512 VNNI on this CPU")
NO_AMX = pytest.mark.skipif(not _simd.cpu_has("amx_int8"), reason="no AMX (or no tile permission) on this CPU")
SIMD_KERNELS = (pytest.param("simd", marks=NO_VNNI), pytest.param("amx", marks=NO_AMX))
CPU_KERNELS = ("numba", "int_mm", *SIMD_KERNELS)


def _problem(rows: int, cols_in: int, cols_out: int, seed: int = 0, x_std: float = 1.0):
    """Random x [rows, K], an absmax-quantized weight, and an input scale that saturates the
    largest |x| (absmax / 2 / 127): int8 clamping is exercised on every random problem."""
    g = torch.Generator().manual_seed(seed)
    weight, weight_scale = quantize_per_channel_int8(torch.randn(cols_out, cols_in, generator=g))
    x = torch.randn(rows, cols_in, generator=g) * x_std
    input_scale = (x.abs().amax() / 2 / 127).reshape(1)
    bias = torch.randn(cols_out, generator=g)
    return x, weight, weight_scale, input_scale, bias


@pytest.mark.parametrize("rows", [1, 3, 16, 65, 300])
@pytest.mark.parametrize(("cols_in", "cols_out"), [(37, 5), (100, 17), (129, 33), (768, 64)])
def test_cpu_equals_reference(rows, cols_in, cols_out):
    x, weight, weight_scale, input_scale, _ = _problem(rows, cols_in, cols_out)
    expected = w8a8_linear_ref(x, weight, weight_scale, input_scale)
    torch.testing.assert_close(w8a8_linear_cpu(x, weight, weight_scale, input_scale), expected, **EXACT)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize(
    ("rows", "cols_in", "cols_out"),
    [(1, 37, 5), (16, 129, 33), (65, 2051, 7), (5, 64, 4), (7, 192, 9), (4, 768, 3352), (33, 100, 70)],
)
def test_every_cpu_kernel_equals_reference(kernel, rows, cols_in, cols_out):
    """w8a8_linear_cpu runs whichever kernel measured fastest here: each must be exact alone
    (2051 inputs saturated against 127s sum past 2^24, where an fp32 accumulator would drift).
    The shapes cover the C kernels' edges: K below, at and past whole 64-byte vectors, row and
    column counts off the VNNI kernel's 4 x 4 tiles and the AMX kernel's 16-row tiles and
    64-row groups (the last weight tile copied, zero-padded), and in_proj's real shape."""
    x, weight, weight_scale, input_scale, bias = _problem(rows, cols_in, cols_out, seed=3)
    if cols_in == 2051:
        x, weight = torch.full_like(x, 1e6), torch.full_like(weight, 127)
    expected = w8a8_linear_ref(x, weight, weight_scale, input_scale, bias)
    got = cpu_candidates(x, weight, weight_scale, input_scale, bias)[kernel]()
    torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("kernel", SIMD_KERNELS)
def test_simd_kernels_are_exact_at_int8_extremes(kernel):
    """-128 and 127 everywhere: the u8 offset of x (x + 128 reaches 0 and 255) and its share
    taken off again must still give the exact sums, whose magnitudes pass 2^24."""
    cols_in = 1000
    x = torch.tensor([[-1e9] * cols_in, [1e9] * cols_in, [-1e9, 1e9] * (cols_in // 2)])
    weight = torch.stack([torch.full((cols_in,), -128), torch.full((cols_in,), 127), torch.arange(cols_in) % 256 - 128])
    weight = weight.to(torch.int8)
    ones = torch.ones(3)
    got = cpu_candidates(x, weight, ones, 1.0, None)[kernel]()
    exact = (quantize_int8(x, 1.0).to(torch.int64) @ weight.to(torch.int64).T).to(torch.float32)
    torch.testing.assert_close(got, exact, **EXACT)


def test_reference_accumulates_in_exact_integers():
    """The spec against an independent int64 product: the reference's int32 sums are exact."""
    x, weight, weight_scale, input_scale, bias = _problem(5, 300, 11, seed=1)
    acc = quantize_int8(x, input_scale).to(torch.int64) @ weight.to(torch.int64).T
    expected = acc.to(torch.float32) * (input_scale * weight_scale.reshape(-1)) + bias
    torch.testing.assert_close(w8a8_linear_ref(x, weight, weight_scale, input_scale, bias), expected, **EXACT)


def test_saturated_long_dot_is_exact():
    """Every input saturates to 127 against weights of 127: the exact sum K * 16129 is odd and
    above 2^24, so the result is that integer rounded once to fp32; an fp32 accumulator would
    round at every add past 2^24 and drift from it."""
    cols_in, cols_out = 2051, 7
    x = torch.full((4, cols_in), 1e6)
    weight = torch.full((cols_out, cols_in), 127, dtype=torch.int8)
    ones = torch.ones(cols_out)
    y = w8a8_linear_cpu(x, weight, ones, torch.tensor([1.0]))
    exact = torch.tensor(cols_in * 127 * 127, dtype=torch.float64).to(torch.float32)
    assert torch.equal(y, exact.expand(4, cols_out))
    torch.testing.assert_close(y, w8a8_linear_ref(x, weight, ones, torch.tensor([1.0])), **EXACT)


def test_quantization_rounds_half_to_even_and_saturates():
    """x / scale lands exactly on halves (scale 0.5 has an exact reciprocal) and beyond +-128."""
    halves = torch.arange(-12, 12, dtype=torch.float32) / 2 + 0.25  # x * 2 = k + 0.5
    x = torch.cat([halves, torch.tensor([70.0, -70.0, 1e9, -1e9, float("inf"), float("-inf")])])[None]
    weight = torch.eye(x.shape[1], dtype=torch.int8)  # y = the quantized x itself, times the scale
    ones = torch.ones(x.shape[1])
    y = w8a8_linear_cpu(x, weight, ones, torch.tensor([0.5]))
    expected_q = quantize_int8(x, 0.5).to(torch.float32)
    assert expected_q[0, -6:].tolist() == [127, -128, 127, -128, 127, -128]
    torch.testing.assert_close(y, expected_q * 0.5, **EXACT)


@pytest.mark.parametrize("scale_shape", [(23,), (23, 1)])
def test_bias_and_per_channel_scale_shapes(scale_shape):
    x, weight, weight_scale, input_scale, bias = _problem(6, 70, 23, seed=2)
    weight_scale = weight_scale.reshape(scale_shape)
    expected = w8a8_linear_ref(x, weight, weight_scale, input_scale, bias)
    torch.testing.assert_close(w8a8_linear_cpu(x, weight, weight_scale, input_scale, bias), expected, **EXACT)
    # The bias is really added: the unbiased result differs from the biased by exactly the bias
    # up to one fp32 rounding of the sum (relative 2^-24 of the larger operand).
    unbiased = w8a8_linear_cpu(x, weight, weight_scale, input_scale)
    torch.testing.assert_close(expected - unbiased, bias.expand_as(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_three_dimensional_half_input_keeps_shape_and_dtype(dtype):
    x, weight, weight_scale, input_scale, bias = _problem(2 * 9, 48, 19, seed=3)
    x = x.reshape(2, 9, 48).to(dtype)
    y = w8a8_linear(x, weight, weight_scale, input_scale, bias)
    assert y.shape == (2, 9, 19) and y.dtype == dtype
    torch.testing.assert_close(y, w8a8_linear_ref(x, weight, weight_scale, input_scale, bias), **EXACT)
    y32 = w8a8_linear_cpu(x, weight, weight_scale, input_scale, out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    expected32 = w8a8_linear_ref(x, weight, weight_scale, input_scale, out_dtype=torch.float32)
    torch.testing.assert_close(y32, expected32, **EXACT)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=child_env)


def test_module_import_does_not_load_numba_or_triton():
    """numba imported at plugin registration breaks vLLM-CPU's workers: it must load on first call."""
    result = _run_python("""
        import sys
        import vllm_quamba.kernels.int8_linear
        assert "numba" not in sys.modules and "triton" not in sys.modules, sorted(sys.modules)
    """)
    assert result.returncode == 0, result.stderr


TRITON_CHECK = """
    import torch
    from tests.kernels.test_int8_linear import _problem
    from vllm_quamba.kernels.int8_linear import w8a8_linear_ref, w8a8_linear_triton

    for rows, cols_in, cols_out, use_bias in [(1, 37, 5, True), (3, 100, 70, False), (17, 129, 33, True)]:
        x, weight, weight_scale, input_scale, bias = _problem(rows, cols_in, cols_out, seed=rows)
        bias = bias if use_bias else None
        for x_dtype in (torch.float32, torch.bfloat16):
            args = (x.to(x_dtype), weight, weight_scale, input_scale, bias)
            # fp32 out: int32 dot and the fp32 epilogue are exact in the interpreter (numpy).
            torch.testing.assert_close(
                w8a8_linear_triton(*args, out_dtype=torch.float32),
                w8a8_linear_ref(*args, out_dtype=torch.float32), rtol=0, atol=0)
            # x-dtype out: the interpreter casts fp32 to bf16 by truncation where torch rounds to
            # nearest, so bf16 results may differ by one bf16 ulp (2^-7 relative).
            tol = dict(rtol=2**-7, atol=0) if x_dtype == torch.bfloat16 else dict(rtol=0, atol=0)
            torch.testing.assert_close(w8a8_linear_triton(*args), w8a8_linear_ref(*args), **tol)
"""


def test_triton_kernel_under_interpreter():
    """triton.jit reads TRITON_INTERPRET when the kernel is defined, so run it in a fresh process."""
    pytest.importorskip("triton")
    result = _run_python(TRITON_CHECK, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
