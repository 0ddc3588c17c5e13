import math

import pytest
import torch

from vllm_quamba.kernels import hadamard
from vllm_quamba.kernels.hadamard import (
    hadamard_matrix,
    hadamard_transform_cpu,
    hadamard_transform_ref,
    is_supported_hadamard_size,
)

torch.set_num_threads(1)

MAX_SIZE = 8192
SUPPORTED_SIZES = sorted(
    {2**k for k in range(14)}
    | {base * 2**k for base in (12, 20, 28, 40) for k in range(14) if base * 2**k <= MAX_SIZE}
)
UNSUPPORTED_SIZES = [0, -4, 3, 6, 10, 14, 36, 44, 60, 100, 1000]
# Beyond this the full H @ H.T costs too much on a shared CPU; larger sizes check a subset of rows.
FULL_PRODUCT_MAX_SIZE = 2048


def test_size_list_covers_every_form():
    assert SUPPORTED_SIZES[0] == 1 and SUPPORTED_SIZES[-1] == 8192
    assert {12, 20, 28, 40, 24, 48, 56, 80, 5120, 6144, 7168} <= set(SUPPORTED_SIZES)
    assert all(is_supported_hadamard_size(n) for n in SUPPORTED_SIZES)


@pytest.mark.parametrize("n", SUPPORTED_SIZES)
def test_matrix_is_orthonormal_with_plus_minus_entries(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float32
    # Every entry is exactly the float32 rounding of +-1/sqrt(n).
    entry = torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32)
    assert bool((h.abs() == entry).all())

    if n <= FULL_PRODUCT_MAX_SIZE:
        rows = torch.arange(n)
    else:
        rows = torch.cat([torch.tensor([0, n - 1]), torch.randperm(n, generator=torch.Generator().manual_seed(n))[:62]])
    gram = h[rows] @ h.T
    # Each Gram entry is an fp32 sum of n products +-1/n; the rounding error grows like sqrt(n) * eps
    # (about 5e-6 at n = 8192), so 1e-5 absolute.
    torch.testing.assert_close(gram, torch.eye(n)[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", SUPPORTED_SIZES)
def test_transform_equals_matmul_with_transpose(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    expected = x @ hadamard_matrix(n).T
    # Outputs are O(1); both sides are fp32 sums of n terms of size |x|/sqrt(n) in different orders
    # (butterflies vs BLAS), so the difference is a few times sqrt(n) * eps * |x| / sqrt(n) ~ 1e-6:
    # 2e-5 absolute plus 1e-5 relative leaves room for the largest sizes.
    torch.testing.assert_close(hadamard_transform_ref(x), expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 40, 64, 96, 160, 224, 320, 1024, 5120])
def test_transform_is_inverted_by_the_matrix(n):
    # H.T @ H = I, so (x @ H.T) @ H recovers x.
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(n))
    recovered = hadamard_transform_ref(x) @ hadamard_matrix(n)
    # Two fp32 passes over n terms of size ~1/sqrt(n) each: ~1e-6 rounding, 2e-5 absolute bound.
    torch.testing.assert_close(recovered, x, rtol=1e-5, atol=2e-5)


def test_power_of_two_matrix_is_scipy_sylvester_order():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    for n in (1, 2, 8, 256):
        expected = torch.tensor(scipy_linalg.hadamard(n), dtype=torch.float64) / math.sqrt(n)
        # Same +-1 pattern, same float64 scaling: exact.
        torch.testing.assert_close(hadamard_matrix(n, dtype=torch.float64), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("base", "power"), [(12, 4), (20, 1), (28, 8), (40, 16)])
def test_base_order_is_the_slow_kronecker_factor(base, power):
    # hadamard_matrix(base * 2^k) = kron(H_base, S_{2^k}): the layout the butterflies assume.
    expected = torch.kron(hadamard_matrix(base, torch.float64), hadamard_matrix(power, torch.float64))
    torch.testing.assert_close(hadamard_matrix(base * power, torch.float64), expected, rtol=0, atol=1e-15)


def test_forty_is_sylvester_doubling_of_twenty():
    h20 = hadamard_matrix(20, torch.float64) * math.sqrt(20)
    h40 = hadamard_matrix(40, torch.float64) * math.sqrt(40)
    expected = torch.cat([torch.cat([h20, h20], 1), torch.cat([h20, -h20], 1)], 0)
    # Rescaled to +-1 in float64: exact up to the last bit of the sqrt scaling.
    torch.testing.assert_close(h40, expected, rtol=0, atol=1e-12)


def test_transform_keeps_dtype_and_leading_dims():
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    y = hadamard_transform_ref(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    expected = (x.float() @ hadamard_matrix(48).T).to(torch.bfloat16)
    # float32 inside, one rounding to bfloat16 at the end: equal within one bf16 ulp (2^-8 relative).
    torch.testing.assert_close(y, expected, rtol=2**-7, atol=1e-2)


def test_returned_matrix_is_a_fresh_copy():
    h = hadamard_matrix(16)
    h.zero_()
    assert hadamard_matrix(16).abs().min().item() == 0.25


@pytest.mark.parametrize("n", UNSUPPORTED_SIZES)
def test_unsupported_sizes_raise(n):
    assert not is_supported_hadamard_size(n)
    with pytest.raises(ValueError, match=str(n)):
        hadamard_matrix(n)
    if n > 0:
        with pytest.raises(ValueError, match=r"12\*2\^k"):
            hadamard_transform_ref(torch.zeros(2, n))
        with pytest.raises(ValueError, match=r"12\*2\^k"):
            hadamard_transform_cpu(torch.zeros(2, n))


# Every form, with blocks of 8 and up (the unrolled first passes) and below, blocks of 16 and up
# (the C kernel's in-register passes), up to mamba2-2.7b's intermediate size 5120. The Quamba2
# SSM kernels' fused epilogues run the same row transforms.
CPU_SIZES = [1, 2, 4, 8, 12, 16, 20, 24, 28, 40, 48, 64, 96, 160, 224, 320, 448, 1024, 1536, 2048, 5120]


@pytest.fixture(params=["simd", "numba"])
def cpu_kernel(request, monkeypatch):
    """Which row transform hadamard_transform_cpu runs: the C kernel, or numba's (its fallback,
    forced by hiding the C kernel)."""
    if request.param == "numba":
        monkeypatch.setattr(hadamard, "_simd_rows", lambda: None)
    elif hadamard._simd_rows() is None:
        pytest.skip("no AVX-512 on this CPU (or the C kernels are not built)")
    return request.param


@pytest.mark.parametrize("n", CPU_SIZES)
def test_cpu_transform_matches_reference(n, cpu_kernel):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n)) * 10
    original = x.clone()
    y = hadamard_transform_cpu(x)
    # The same butterfly additions in the same order; only the base matrix's sums (m <= 40 terms)
    # may round in another order than torch.matmul's: a few ulp of outputs ~|x| = 10, so 1e-5
    # relative plus 1e-5 absolute (for outputs near zero).
    torch.testing.assert_close(y, hadamard_transform_ref(x), rtol=1e-5, atol=1e-5)
    if n in (1, 2, 4, 8, 16, 1024, 2048):  # no base matrix: bitwise the reference's additions
        assert torch.equal(y, hadamard_transform_ref(x))
    assert torch.equal(x, original), "the input must not be modified"


@pytest.mark.parametrize("n", CPU_SIZES)
def test_simd_transform_equals_numba(n, monkeypatch):
    """The C kernel makes numba's additions in the same order: bitwise equal, base matrix too."""
    if hadamard._simd_rows() is None:
        pytest.skip("no AVX-512 on this CPU (or the C kernels are not built)")
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n)) * 10
    y = hadamard_transform_cpu(x)
    monkeypatch.setattr(hadamard, "_simd_rows", lambda: None)
    assert torch.equal(y, hadamard_transform_cpu(x))


def test_cpu_transform_keeps_dtype_and_leading_dims(cpu_kernel):
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    y = hadamard_transform_cpu(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    # Both compute in float32 and round once to bfloat16: equal within one bf16 ulp.
    torch.testing.assert_close(y, hadamard_transform_ref(x), rtol=2**-7, atol=1e-2)
