"""The software prefetch used by the numba kernels: it compiles for the byte arrays the kernels
pass it and changes nothing (a hint only), including for rows past the end, which it skips."""

import numpy as np
import pytest

pytest.importorskip("numba")


def test_prefetch_rows_compiles_and_leaves_results_unchanged():
    from numba import njit

    from vllm_quamba.kernels._numba_prefetch import prefetch_rows

    @njit
    def prefetching_row_sums(matrix):
        rows, row_bytes = matrix.shape
        flat = matrix.reshape(-1)
        sums = np.zeros(rows, dtype=np.int64)
        for r in range(rows):
            prefetch_rows(flat, row_bytes, r + 4, r + 6)  # beyond the last row near the end
            for k in range(row_bytes):
                sums[r] += matrix[r, k]
        return sums

    rng = np.random.default_rng(0)
    for dtype in (np.int8, np.uint8):
        matrix = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, (9, 200), dtype=dtype)
        before = matrix.copy()
        # Exact integer sums: any difference is a defect, no tolerance.
        np.testing.assert_array_equal(prefetching_row_sums(matrix), matrix.astype(np.int64).sum(axis=1))
        np.testing.assert_array_equal(matrix, before)
