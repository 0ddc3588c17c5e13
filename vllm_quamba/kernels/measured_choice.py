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
# profiling runs thousands of rows, where the slow candidate would take seconds per call.
MEASURED_ROWS = 128

_chosen: dict[Hashable, str] = {}


def row_bucket(rows: int) -> int:
    """Shape class of a row count: the next power of two (1, 2, 4, ..., 64), MEASURED_ROWS above."""
    return 1 << max(min(rows, MEASURED_ROWS) - 1, 0).bit_length()


def _fastest(candidates: dict[str, Callable[[], object]]) -> str:
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


def run_fastest(
    key: Hashable,
    candidates: dict[str, Callable[[], object]],
    trials: Callable[[], dict[str, Callable[[], object]]] | None = None,
):
    """Run the candidate chosen for ``key``, measuring all of them on the first call of ``key``:
    the calls ``trials()`` returns when given (the same kernels on a part of the input: see
    MEASURED_ROWS), else the candidates themselves."""
    name = _chosen.get(key)
    if name is None:
        name = _chosen[key] = _fastest(trials() if trials is not None else candidates)
    return candidates[name]()


def chosen() -> dict[Hashable, str]:
    """The choices made so far in this process (for benchmarks and tests)."""
    return dict(_chosen)
