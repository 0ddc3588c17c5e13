"""Pick the fastest of several exact CPU kernels for a call shape, by timing them on it.

Which CPU kernel is fastest depends on the machine more than on anything the code can know:
torch's ``_int_mm`` (oneDNN) runs int8 GEMMs on AMX/VNNI several times faster than fp32 on a
Xeon with AMX, yet measured 12-20x slower than fp32 on an AVX2-only CPU, where the package's
numba kernels win. So the first call of each shape class times every candidate on its real
inputs and later calls of that class use the fastest. Only candidates that return identical
results may compete (the choice must never change outputs, only time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

# Timed calls per candidate; the minimum is kept (the least disturbed by other processes).
TIMED_CALLS = 3
# Row counts above this share one shape class, timed on its first this-many rows: vLLM's start-up
# profiling runs thousands of rows, where the slow candidate would take seconds per call. Not
# fewer: the fastest W4A16 kernel at 128 rows of mamba2-130m's in_proj (the FMA kernel, 4.6 ms
# against 5.1) was 1.5x slower than the other from 512 rows up (87.8 ms against 57.6 at 2048).
MEASURED_ROWS = 512

_chosen: dict[Hashable, str] = {}

# Exact kernels by name, each a call on inputs already bound.
Candidates = dict[str, Callable[[], object]]


def row_bucket(rows: int) -> int:
    """Shape class of a row count: the next power of two (1, 2, 4, ..., MEASURED_ROWS), at most MEASURED_ROWS."""
    return 1 << max(min(rows, MEASURED_ROWS) - 1, 0).bit_length()


def _fastest(candidates: Candidates) -> str:
    best_name, best_time = "", float("inf")
    for name, call in candidates.items():
        call()  # warm-up: compilation, caches, allocator
        elapsed = float("inf")
        for _ in range(TIMED_CALLS):
            start = time.perf_counter()
            call()
            elapsed = min(elapsed, time.perf_counter() - start)
        if elapsed < best_time:
            best_name, best_time = name, elapsed
    return best_name


def run_fastest(kind: Hashable, x2d, candidates_for: Callable[[object], Candidates]):
    """Run on x2d (rows first: a tensor or array) the candidate chosen for ``kind`` (the kernel
    family and weight shape) and x2d's row class (``row_bucket``); the first call of a class
    chooses it by timing every candidate on x2d's first MEASURED_ROWS rows.

    ``candidates_for(rows)`` returns the exact kernels, by name, as calls on the rows given."""
    key = (kind, row_bucket(len(x2d)))
    name = _chosen.get(key)
    if name is None:
        name = _chosen[key] = _fastest(candidates_for(x2d[:MEASURED_ROWS]))
    return candidates_for(x2d)[name]()


def chosen() -> dict[Hashable, str]:
    """The choices made so far in this process (for benchmarks and tests)."""
    return dict(_chosen)
