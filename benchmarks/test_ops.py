"""Op-level timings of the Quamba2 SSM path on the CPU (pytest-benchmark), one layer of
mamba2-130m's shapes: the torch references beside the numba fast paths.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python -m pytest -p no:cacheprovider \\
        benchmarks/test_ops.py --benchmark-group-by=param:batch --benchmark-columns=median,iqr

Not collected by the test suite (``testpaths = ["tests"]``). The references are timed as the
mixer used them: decode reads/writes the slots through torch indexing, prefill runs one call
per sequence, the Hadamard transform is a separate pass; the fast paths include all of that.
Parameters are random (timings depend on shapes only); states are cold only for the
first layer of a real step, so these are upper bounds on speed.
"""

import pytest
import torch

from vllm_quamba.kernels.hadamard import hadamard_transform_ref
from vllm_quamba.kernels.quamba2_ssm import (
    Quamba2SSMParams,
    quamba2_ssm_decode_cpu,
    quamba2_ssm_decode_ref,
    quamba2_ssm_prefill_cpu,
    quamba2_ssm_prefill_ref,
)

HIDDEN, NUM_HEADS, HEAD_DIM, STATE_SIZE, N_GROUPS, KERNEL = 768, 24, 64, 128, 1, 4
INTERMEDIATE = NUM_HEADS * HEAD_DIM
CONV_DIM = INTERMEDIATE + 2 * N_GROUPS * STATE_SIZE
IN_PROJ_DIM = INTERMEDIATE + CONV_DIM + NUM_HEADS
PROMPT_LEN = 128


@pytest.fixture(scope="module")
def params() -> Quamba2SSMParams:
    g = torch.Generator().manual_seed(0)
    return Quamba2SSMParams(
        intermediate_size=INTERMEDIATE, n_groups=N_GROUPS, state_size=STATE_SIZE,
        head_dim=HEAD_DIM, chunk_size=256, norm_eps=1e-5,
        z_scale=torch.tensor([0.03]), dt_scale=torch.tensor([0.02]),
        xbc_in_scale=torch.full((CONV_DIM,), 0.03), conv_weight=0.3 * torch.randn(CONV_DIM, KERNEL, generator=g),
        conv_bias=0.1 * torch.randn(CONV_DIM, generator=g), xbc_out_scale=torch.full((CONV_DIM,), 0.02),
        A=-torch.rand(NUM_HEADS, generator=g) - 0.1, D=torch.randn(NUM_HEADS, generator=g),
        dt_bias=torch.randn(NUM_HEADS, generator=g) - 2.0, norm_weight=torch.ones(INTERMEDIATE),
        state_scale=0.01 + 0.01 * torch.rand(4, 1, STATE_SIZE, generator=g).repeat_interleave(6, 0).expand(
            NUM_HEADS, HEAD_DIM, STATE_SIZE
        ).contiguous(),
    )  # fmt: skip


def _caches(batch: int):
    g = torch.Generator().manual_seed(1)
    conv = torch.randint(-100, 100, (batch, KERNEL - 1, CONV_DIM), generator=g, dtype=torch.int8)
    ssm = torch.randint(-100, 100, (batch, NUM_HEADS, HEAD_DIM, STATE_SIZE), generator=g, dtype=torch.int8)
    return conv, ssm


def _projected(tokens: int) -> torch.Tensor:
    return torch.randn(tokens, IN_PROJ_DIM, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_ref(benchmark, params, batch):
    conv, ssm = _caches(batch)
    slots = torch.arange(batch)
    zxbcdt = _projected(batch)

    def step():
        y, conv_new, ssm_new = quamba2_ssm_decode_ref(zxbcdt, params, conv[slots], ssm[slots])
        conv[slots], ssm[slots] = conv_new, ssm_new
        return hadamard_transform_ref(y)

    benchmark(step)


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_cpu(benchmark, params, batch):
    conv, ssm = _caches(batch)
    slots = torch.arange(batch)
    zxbcdt = _projected(batch)
    benchmark(lambda: quamba2_ssm_decode_cpu(zxbcdt, params, conv, ssm, slots, rotate_output=True))


@pytest.mark.parametrize("batch", [1, 4])
def test_prefill_ref(benchmark, params, batch):
    conv, ssm = _caches(batch)
    zxbcdt = _projected(batch * PROMPT_LEN)

    def prefill():
        for i in range(batch):
            rows = slice(i * PROMPT_LEN, (i + 1) * PROMPT_LEN)
            y, conv[i], ssm[i] = quamba2_ssm_prefill_ref(zxbcdt[rows], params, None, None)
            hadamard_transform_ref(y)

    benchmark(prefill)


@pytest.mark.parametrize("batch", [1, 4])
def test_prefill_cpu(benchmark, params, batch):
    conv, ssm = _caches(batch)
    zxbcdt = _projected(batch * PROMPT_LEN)
    starts = torch.arange(batch + 1) * PROMPT_LEN
    slots = torch.arange(batch)
    fresh = torch.zeros(batch, dtype=torch.bool)
    benchmark(
        lambda: quamba2_ssm_prefill_cpu(zxbcdt, params, conv, ssm, starts, slots, fresh, rotate_output=True)
    )


@pytest.mark.parametrize("batch", [1, 16])
def test_hadamard_ref(benchmark, batch):
    y = torch.randn(batch, INTERMEDIATE)
    benchmark(hadamard_transform_ref, y)
