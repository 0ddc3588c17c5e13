"""W8A8 int8 linear on CPU vs fp32 torch.nn.functional.linear, cold cache, one thread.

Decode streams every weight of the model once per step (~500 MB for mamba2-370m), far more than
the last-level cache, so each timed call uses the next of several distinct weight copies whose
bytes together exceed twice the LLC: the weights come from DRAM as in real decode.

For every shape and row count M it prints the median time of
  fp32   torch.nn.functional.linear on an fp32 weight,
  int8   w8a8_linear_cpu (quantize x, numba int8 kernel, fp32 epilogue; fp32 x in and out),
and fp32 / int8, of the medians and of the minima. On a shared CPU the medians are noisy (a
neighbour on the same core can make whole runs of calls several times slower); the minima show
the kernels' own speed.

    python benchmarks/bench_linear.py [--rows 1 16 64 512] [--repeats 15]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_quamba.kernels.int8_linear import w8a8_linear_cpu

# (name, K, N): mamba2-130m (d_model 768) and mamba2-370m (d_model 1024) linears.
SHAPES = (
    ("130m in_proj", 768, 3352),
    ("130m out_proj", 1536, 768),
    ("130m lm_head", 768, 50280),
    ("370m in_proj", 1024, 4384),
    ("370m out_proj", 2048, 1024),
)


def last_level_cache_bytes() -> int:
    """Size of the highest-level cache cpu0 sees (sysfs), e.g. '32768K' -> 33554432."""
    caches = Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")
    level, size = max((int((c / "level").read_text()), (c / "size").read_text().strip()) for c in caches)
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def copies_for_cold_cache(bytes_per_copy: int, llc_bytes: int) -> int:
    return max(2, -(-2 * llc_bytes // bytes_per_copy))


def median_and_min_ms(call, num_copies: int, repeats: int) -> tuple[float, float]:
    call(0)  # warm-up: numba compile or cache load, allocator
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        call((i + 1) % num_copies)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def bench_shape(k: int, n: int, rows_list, repeats: int, llc_bytes: int):
    g = torch.Generator().manual_seed(0)
    int8_copies = copies_for_cold_cache(n * k, llc_bytes)
    fp32_copies = copies_for_cold_cache(4 * n * k, llc_bytes)
    weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g) for _ in range(int8_copies)]
    fp32_weights = [torch.randn(n, k, generator=g) for _ in range(fp32_copies)]
    weight_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    input_scale = torch.tensor([0.02])
    for rows in rows_list:
        x = torch.randn(rows, k, generator=g)
        fp32_ms = median_and_min_ms(lambda i: F.linear(x, fp32_weights[i]), fp32_copies, repeats)
        int8_ms = median_and_min_ms(
            lambda i: w8a8_linear_cpu(x, weights[i], weight_scale, input_scale), int8_copies, repeats
        )
        yield rows, fp32_ms, int8_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    llc_bytes = last_level_cache_bytes()
    print(f"cold cache: weight copies cycled past 2 x LLC ({llc_bytes >> 20} MiB); 1 thread; median ms")
    print(
        f"{'shape':<14} {'K':>5} {'N':>6} {'M':>5} {'fp32 med':>9} {'int8 med':>9} {'ratio':>6}"
        f" {'fp32 min':>9} {'int8 min':>9} {'ratio':>6}"
    )
    for name, k, n in SHAPES:
        for rows, (fp32_med, fp32_min), (int8_med, int8_min) in bench_shape(k, n, args.rows, args.repeats, llc_bytes):
            print(
                f"{name:<14} {k:>5} {n:>6} {rows:>5} {fp32_med:>9.3f} {int8_med:>9.3f} {fp32_med / int8_med:>6.2f}"
                f" {fp32_min:>9.3f} {int8_min:>9.3f} {fp32_min / int8_min:>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
