"""Orthonormal Hadamard matrices and the fast Hadamard transform.

Supported sizes are n = m * 2^k with base order m in {1, 12, 20, 28, 40}:

    hadamard_matrix(n) = kron(H_m, S_{2^k}) / sqrt(n)

where S_{2^k} is the Sylvester matrix (S_1 = [1], S_{2p} = kron([[1, 1], [1, -1]], S_p),
i.e. scipy.linalg.hadamard) and H_m is a +-1 Hadamard matrix of order m:

    H_1  = [1]
    H_12 = Paley I  with q = 11
    H_20 = Paley I  with q = 19
    H_28 = Paley II with q = 13
    H_40 = kron([[1, 1], [1, -1]], H_20)

Because 40 * 2^k = 20 * 2^(k+1), sizes with odd part 5 use base 40 whenever n >= 40
(Quamba picks its 40N kernel for such sizes) and base 20 only for n == 20.

hadamard_transform_ref(x) == x @ hadamard_matrix(n).T along the last dim. With x viewed
as X[m, 2^k] (the base index is the slow one, as in the fast-hadamard-transform CUDA
kernels), this is H_m @ X @ S_{2^k}.T / sqrt(n): Walsh-Hadamard butterflies along the
contiguous 2^k axis, then one small dense m x m matmul.

API: ``hadamard_transform_ref`` (plain torch, the specification) and ``hadamard_transform_cpu``
(rows transformed in place by ``hadamard_rows_cpu_``: the C kernel csrc/hadamard.c where the CPU
has AVX-512, else numba's with the same additions in the same order; at mamba2-130m's n = 1536
on one core, 1024 rows take 1.7 ms in C, 4.9 ms in numba and 27 ms in the reference, which
spends them allocating each pass's result; one row costs ~14 us of call overhead in either).
``layers.cpu_ops.hadamard_transform`` dispatches between them.
"""

import functools
import math

import numpy as np
import torch

_BASE_ORDERS = (1, 12, 20, 28, 40)
_SUPPORTED_FORMS = "2^k, 12*2^k, 20*2^k, 28*2^k or 40*2^k (k >= 0)"


def _split_power_of_two(n: int) -> tuple[int, int]:
    """n = odd * power_of_two."""
    power_of_two = 1
    while n % 2 == 0:
        n //= 2
        power_of_two *= 2
    return n, power_of_two


def is_supported_hadamard_size(n: int) -> bool:
    if not isinstance(n, int) or n < 1:
        return False
    odd, power_of_two = _split_power_of_two(n)
    if odd == 1:
        return True
    # 12, 20 and 28 are 4 * (3, 5, 7); smaller multiples (6, 10, 14, ...) have no Hadamard matrix.
    return odd in (3, 5, 7) and power_of_two >= 4


def _base_order(n: int) -> int:
    """The base order m of n = m * 2^k."""
    if not is_supported_hadamard_size(n):
        raise ValueError(f"Unsupported Hadamard size {n}: supported sizes are {_SUPPORTED_FORMS}.")
    odd, _ = _split_power_of_two(n)
    if odd == 1:
        return 1
    if odd == 3:
        return 12
    if odd == 7:
        return 28
    return 20 if n == 20 else 40


def _quadratic_character(q: int) -> list[int]:
    """chi(a) for a in [0, q): 0 at 0, +1 for nonzero squares mod q, -1 otherwise."""
    squares = {(a * a) % q for a in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal_matrix(q: int) -> torch.Tensor:
    chi = _quadratic_character(q)
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _bordered_jacobsthal(q: int, first_column_sign: int) -> torch.Tensor:
    """S = [[0, 1^T], [sign * 1, Q]] of order q + 1; S @ S.T = q * I for the Paley cases."""
    q_matrix = _jacobsthal_matrix(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = float(first_column_sign)
    s[1:, 1:] = q_matrix
    return s


def _paley_one(q: int) -> torch.Tensor:
    """Order q + 1 for prime q = 3 mod 4: H = I + S with S skew-symmetric."""
    assert q % 4 == 3
    return torch.eye(q + 1, dtype=torch.float64) + _bordered_jacobsthal(q, first_column_sign=-1)


def _paley_two(q: int) -> torch.Tensor:
    """Order 2(q + 1) for prime q = 1 mod 4: replace the entries of the symmetric S by 2x2 blocks."""
    assert q % 4 == 1
    s = _bordered_jacobsthal(q, first_column_sign=1)
    block_for_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    block_for_one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    is_zero = (s == 0).to(torch.float64)
    return torch.kron(is_zero, block_for_zero) + torch.kron(s, block_for_one)


def _sylvester_double(h: torch.Tensor) -> torch.Tensor:
    return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=h.dtype), h)


@functools.lru_cache(maxsize=None)
def _base_matrix(m: int) -> torch.Tensor:
    """Unnormalized (+-1) Hadamard matrix of base order m, float64."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 12:
        return _paley_one(11)
    if m == 20:
        return _paley_one(19)
    if m == 28:
        return _paley_two(13)
    if m == 40:
        return _sylvester_double(_paley_one(19))
    raise ValueError(f"No base Hadamard matrix of order {m}; bases are {_BASE_ORDERS}.")


def _sylvester_matrix(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < p:
        h = _sylvester_double(h)
    return h


@functools.lru_cache(maxsize=4)
def _signed_hadamard_matrix(n: int) -> torch.Tensor:
    """The +-1 matrix of order n, stored as int8: 64 MiB at n = 8192 instead of 256 MiB."""
    m = _base_order(n)
    return torch.kron(_base_matrix(m).to(torch.int8), _sylvester_matrix(n // m))


def hadamard_base(n: int) -> torch.Tensor:
    """The +-1 base matrix [m, m] (float64) of size n = m * 2^k: hadamard_matrix(n) is
    kron(base, Sylvester(2^k)) / sqrt(n), which fast kernels apply as butterflies then base."""
    return _base_matrix(_base_order(n))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal [n, n] Hadamard matrix (entries +-1/sqrt(n), H @ H.T == I), a fresh tensor."""
    return _signed_hadamard_matrix(n).to(dtype) * (1.0 / math.sqrt(n))


def _walsh_hadamard_butterflies(x: torch.Tensor) -> torch.Tensor:
    """x @ S_p.T along the last dim (p a power of two), unnormalized, log2(p) passes."""
    p = x.shape[-1]
    leading = x.shape[:-1]
    half = 1
    while half < p:
        pairs = x.reshape(*leading, p // (2 * half), 2, half)
        top, bottom = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((top + bottom, top - bottom), dim=-2).reshape(*leading, p)
        half *= 2
    return x


def hadamard_transform_ref(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard_matrix(n).T along the last dim in O(n log n); float32 inside, x.dtype out."""
    n = x.shape[-1]
    m = _base_order(n)
    leading = x.shape[:-1]
    blocks = x.to(torch.float32).reshape(*leading, m, n // m)
    blocks = _walsh_hadamard_butterflies(blocks)
    if m > 1:
        blocks = torch.matmul(_base_matrix(m).to(device=x.device, dtype=torch.float32), blocks)
    out = blocks.reshape(*leading, n) * (1.0 / math.sqrt(n))
    return out.to(x.dtype)


@functools.lru_cache(maxsize=None)
def hadamard_numba_constants(n: int) -> tuple[np.ndarray, np.float32]:
    """The fp32 base matrix and 1 / sqrt(n) of size n, as the numba row transform takes them
    (``_hadamard_numba.hadamard_row``: here and in the Quamba2 SSM kernels). Read only: shared."""
    return hadamard_base(n).to(torch.float32).numpy(), np.float32(1.0 / math.sqrt(n))


@functools.cache
def _simd_rows():
    """csrc/hadamard.c's row transform (numba's additions in the same order, vectorized), or
    None where this CPU lacks AVX-512 or the C kernels are not built."""
    from . import _simd

    pointer, i64 = _simd.POINTER, _simd.INT64
    return _simd.function(
        "quamba_hadamard_rows_avx512", "avx512_vnni", pointer, i64, i64, pointer, i64, _simd.FLOAT, pointer
    )


def hadamard_rows_cpu_(rows: torch.Tensor) -> torch.Tensor:
    """Each row of the contiguous fp32 CPU tensor rows [M, n] replaced by its transform, by the C
    kernel, or numba's where the CPU lacks AVX-512 (bitwise the same results); returns rows."""
    n = rows.shape[-1]
    base, scale = hadamard_numba_constants(n)  # raises the reference's error for unsupported sizes
    kernel = _simd_rows()
    if kernel is not None:
        scratch = torch.empty(n, dtype=torch.float32)
        kernel(rows.data_ptr(), rows.numel() // n, n, base.ctypes.data, base.shape[0], scale, scratch.data_ptr())
    else:
        from ._hadamard_numba import hadamard_rows  # numba compiles on first use

        hadamard_rows(rows.reshape(-1, n).numpy(), base, scale)
    return rows


def hadamard_transform_cpu(x: torch.Tensor) -> torch.Tensor:
    """hadamard_transform_ref(x) on a CPU tensor (``hadamard_rows_cpu_`` on a copy); x is not
    modified."""
    n = x.shape[-1]
    hadamard_numba_constants(n)  # the reference's error for unsupported sizes, before copying
    rows = x.reshape(-1, n).to(torch.float32, copy=True).contiguous()
    return hadamard_rows_cpu_(rows).reshape(x.shape).to(x.dtype)
