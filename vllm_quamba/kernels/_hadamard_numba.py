"""numba fast Hadamard transform of fp32 rows (see hadamard.py for the matrices), imported on
first use only: ``hadamard_row`` serves the Quamba2 SSM kernels' fused epilogue and
``hadamard_rows`` the stand-alone CPU transform (``hadamard.hadamard_transform_cpu``).

The additions are those of ``hadamard_transform_ref`` in the same order (butterflies, then the
base matrix, then the normalization); only the base matrix's sums may round differently.
"""

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _butterflies_of_8(row, start):
    """The passes of half 1, 2 and 4 on row[start:start + 8]: the generic loop's additions in
    the same order, without its short inner loops (the whole transform of n = 1536 measured
    1.35x faster with it)."""
    a0, a1, a2, a3 = row[start], row[start + 1], row[start + 2], row[start + 3]
    a4, a5, a6, a7 = row[start + 4], row[start + 5], row[start + 6], row[start + 7]
    b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
    b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
    c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
    c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
    row[start], row[start + 1], row[start + 2], row[start + 3] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
    row[start + 4], row[start + 5], row[start + 6], row[start + 7] = c0 - c4, c1 - c5, c2 - c6, c3 - c7


@njit(cache=True)
def hadamard_row(row, base, scale, scratch):
    """row[n] = row @ hadamard_matrix(n).T in place, as hadamard.hadamard_transform_ref
    (scratch: n fp32 values of work space):
    butterflies inside each of the m contiguous blocks of n // m, then the m x m base matrix
    across blocks, then the 1/sqrt(n) normalization."""
    n = row.shape[0]
    m = base.shape[0]
    block = n // m
    half = 1
    if block % 8 == 0:  # the first three passes, 8 values at a time in registers
        for start in range(0, n, 8):
            _butterflies_of_8(row, start)
        half = 8
    while half < block:
        for start in range(0, n, 2 * half):
            for i in range(start, start + half):
                top, bottom = row[i], row[i + half]
                row[i] = top + bottom
                row[i + half] = top - bottom
        half *= 2
    if m > 1:
        scratch[:] = 0.0
        for r in range(m):
            for k in range(m):
                sign = base[r, k]
                for i in range(block):
                    scratch[r * block + i] += sign * row[k * block + i]
        row[:] = scratch
    for i in range(n):
        row[i] *= scale


@njit(cache=True)
def hadamard_rows(rows, base, scale):
    """Every row of the fp32 [M, n] array in place."""
    scratch = np.empty(rows.shape[1], dtype=np.float32)
    for m in range(rows.shape[0]):
        hadamard_row(rows[m], base, scale, scratch)
