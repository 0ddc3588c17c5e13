"""4-bit weight linear on CPU (W4A16, W4A8) vs float32 torch linear, with a cold cache.

Real decode streams every weight from DRAM once per token, so each timed call uses the next of
enough weight copies to cycle through more bytes than the last-level cache (--cold-mib), for the
fp32 baseline and the 4-bit kernels alike; activations stay hot, as they are in a model. One
thread (vLLM's CPU worker owns one core). The three kernels are timed in turn, round after round,
so that load from other processes hits them alike. Prints median times and fp32_time / w4_time.

    python benchmarks/bench_w4_linear.py                        # all shapes, M in 1 16 64 512
    python benchmarks/bench_w4_linear.py --shapes 130m.lm_head --rows 1 4
"""

import argparse
import statistics
import time

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from vllm_quamba.kernels.w4_linear import prepack_w4, w4a8_linear_cpu, w4a16_linear_cpu

# name: (K = in_features, N = out_features)
SHAPES = {
    "130m.in_proj": (768, 3352),
    "130m.out_proj": (1536, 768),
    "130m.lm_head": (768, 50280),
    "370m.in_proj": (1024, 4384),
    "370m.out_proj": (2048, 1024),
}


def _copies(bytes_per_copy: int, cold_bytes: int) -> int:
    return max(1, -(-cold_bytes // bytes_per_copy))


def _fp32_weights(in_features: int, out_features: int, cold_bytes: int) -> list[torch.Tensor]:
    count = _copies(4 * in_features * out_features, cold_bytes)
    return [torch.randn(out_features, in_features) * 0.02 for _ in range(count)]


def _w4_weights(in_features: int, out_features: int, group_size: int, cold_bytes: int) -> list:
    count = _copies(in_features * out_features // 2, cold_bytes)
    q = torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8)
    packed = pack_to_int32(q, num_bits=4)
    scale = torch.rand(out_features, -(-in_features // group_size)) * 0.01
    # Distinct storage per copy (clone), same values: only the bytes' addresses matter here.
    return [prepack_w4(packed.clone(), scale.clone(), group_size, (out_features, in_features)) for _ in range(count)]


def _interleaved_medians(kernels: list, repeats: int, budget_s: float) -> list[float]:
    """Median seconds of each (call, weight copies) pair, timed in turn within every round.

    Interleaving spreads noise from other processes over all kernels alike, which keeps the
    ratios meaningful on a shared machine.
    """
    for call, weights in kernels:
        for w in weights:  # compile (or load numba's cache) and fault pages in, untimed
            call(w)
    times = [[] for _ in kernels]
    started = time.perf_counter()
    for round_index in range(repeats):
        if round_index >= 3 and time.perf_counter() - started > budget_s:
            break
        for (call, weights), kernel_times in zip(kernels, times):
            w = weights[round_index % len(weights)]
            start = time.perf_counter()
            call(w)
            kernel_times.append(time.perf_counter() - start)
    return [statistics.median(kernel_times) for kernel_times in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64, 512], help="M, rows of x")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--cold-mib", type=int, default=128, help="weight bytes cycled through per kernel")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--budget-s", type=float, default=3.0, help="stop repeating after this (>= 3 rounds)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cold_bytes = args.cold_mib << 20

    header = f"{'shape':>14} {'K':>5} {'N':>6} {'M':>4} {'fp32 ms':>9} {'w4a16 ms':>9} {'x':>6} {'w4a8 ms':>9} {'x':>6}"
    print(f"cold cache: {args.cold_mib} MiB of weights cycled per kernel; group size {args.group_size}; 1 thread")
    print(header)
    for name in args.shapes:
        in_features, out_features = SHAPES[name]
        fp32 = _fp32_weights(in_features, out_features, cold_bytes)
        # Separate copies per 4-bit kernel: each would otherwise find the other's weights cached.
        packed_a16 = _w4_weights(in_features, out_features, args.group_size, cold_bytes)
        packed_a8 = _w4_weights(in_features, out_features, args.group_size, cold_bytes)
        input_scale = 0.02  # a float, as a layer would keep it
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            kernels = [
                (lambda w: torch.nn.functional.linear(x, w), fp32),
                (lambda p: w4a16_linear_cpu(x, p), packed_a16),
                (lambda p: w4a8_linear_cpu(x, p, input_scale), packed_a8),
            ]
            times = _interleaved_medians(kernels, args.repeats, args.budget_s)
            line = f"{name:>14} {in_features:>5} {out_features:>6} {rows:>4} {times[0] * 1e3:>9.3f}"
            line += f" {times[1] * 1e3:>9.3f} {times[0] / times[1]:>6.2f} {times[2] * 1e3:>9.3f} {times[0] / times[2]:>6.2f}"
            print(line, flush=True)
        del fp32, packed_a16, packed_a8


if __name__ == "__main__":
    main()
