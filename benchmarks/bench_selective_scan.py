"""Mamba1 selective scan prefill on CPU: the torch reference vs the numba varlen path.

mamba-130m shapes (Dm = 1536 channels, N = 16 states), D, z gating, delta_bias and softplus on,
batches of 1 and 4 sequences of 512 tokens packed with cu_seqlens. The reference is a per-token
python loop, so it runs on a shorter prompt (REF_TOKENS per sequence, one sequence at a time, as
it would be called) and its tokens/s is what the comparison uses. Prints median wall times,
prefill tokens/s and the speed-up, for 1 and 2 threads (torch and numba alike).

    python benchmarks/bench_selective_scan.py
"""

import statistics
import time

import numba
import torch

from vllm_quamba.kernels.selective_scan import selective_scan_ref, selective_scan_varlen_cpu

CHANNELS, STATE_SIZE = 1536, 16
PROMPT_TOKENS, REF_TOKENS = 512, 32
BATCHES = (1, 4)
THREADS = (1, 2)
REPEATS, REF_REPEATS = 7, 3


def _problem(num_seqs: int, seq_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    total = num_seqs * seq_len
    return dict(
        u=torch.randn(total, CHANNELS, generator=g),
        delta=torch.randn(total, CHANNELS, generator=g) * 0.5,
        A=-torch.rand(CHANNELS, STATE_SIZE, generator=g) * 4,
        B=torch.randn(total, STATE_SIZE, generator=g),
        C=torch.randn(total, STATE_SIZE, generator=g),
        D=torch.randn(CHANNELS, generator=g),
        z=torch.randn(total, CHANNELS, generator=g),
        delta_bias=torch.rand(CHANNELS, generator=g) * 3 - 2.5,
        cu_seqlens=torch.arange(num_seqs + 1, dtype=torch.int32) * seq_len,
    )


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _run_ref(p: dict) -> None:
    cu = p["cu_seqlens"].tolist()
    for s in range(len(cu) - 1):
        rows = slice(cu[s], cu[s + 1])
        selective_scan_ref(
            p["u"][rows], p["delta"][rows], p["A"], p["B"][rows], p["C"][rows], D=p["D"], z=p["z"][rows],
            delta_bias=p["delta_bias"], delta_softplus=True,
        )  # fmt: skip


def _run_cpu(p: dict) -> None:
    selective_scan_varlen_cpu(
        p["u"], p["delta"], p["A"], p["B"], p["C"], p["D"], p["z"], p["delta_bias"], True, p["cu_seqlens"],
        None, None,
    )  # fmt: skip


def main() -> None:
    _run_cpu(_problem(1, 4))  # compile (or load numba's on-disk cache) outside the timings
    print(f"selective scan prefill, Dm={CHANNELS} N={STATE_SIZE}; ref on {REF_TOKENS} tokens/seq, cpu on {PROMPT_TOKENS}")
    header = f"{'threads':>7} {'batch':>5} {'ref ms':>9} {'ref tok/s':>10} {'cpu ms':>9} {'cpu tok/s':>10} {'speed-up':>8}"
    print(header)
    for threads in THREADS:
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
        for batch in BATCHES:
            ref_seconds = _median_seconds(lambda p=_problem(batch, REF_TOKENS): _run_ref(p), REF_REPEATS)
            cpu_seconds = _median_seconds(lambda p=_problem(batch, PROMPT_TOKENS): _run_cpu(p), REPEATS)
            ref_rate = batch * REF_TOKENS / ref_seconds
            cpu_rate = batch * PROMPT_TOKENS / cpu_seconds
            print(
                f"{threads:>7} {batch:>5} {ref_seconds * 1e3:>9.1f} {ref_rate:>10.0f} "
                f"{cpu_seconds * 1e3:>9.1f} {cpu_rate:>10.0f} {cpu_rate / ref_rate:>7.1f}x"
            )


if __name__ == "__main__":
    main()
