"""The CPU kernels' torch ops (vllm_quamba/layers/cpu_ops.py): compiled graphs reach the
kernels through them, eager calls go straight to the kernels."""

import torch

from vllm_quamba.kernels.hadamard import hadamard_transform_ref
from vllm_quamba.kernels.int8_linear import w8a8_linear_ref
from vllm_quamba.kernels.w4_linear import prepack_w4, w4a16_linear_ref, w4a8_linear_ref
from vllm_quamba.layers import cpu_ops

from tests.kernels.test_w4_linear import make_weight

torch.set_num_threads(1)


def _compiled(fn):
    # Dynamo alone (backend "eager") decides whether the graph holds the op: fullgraph fails on
    # any call it cannot trace, such as numba's or ctypes'.
    return torch.compile(fn, fullgraph=True, backend="eager", dynamic=False)


def test_compiled_hadamard_runs_the_numba_kernel_through_its_op():
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    # As tests/kernels/test_hadamard.py: the base matrix's sums may round in another order.
    torch.testing.assert_close(_compiled(cpu_ops.hadamard_transform)(x), hadamard_transform_ref(x), rtol=1e-5, atol=1e-5)


def test_eager_hadamard_calls_the_kernel_directly(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_ops, "hadamard_transform_cpu", lambda x: calls.append(x) or x)
    x = torch.randn(2, 12)
    assert cpu_ops.hadamard_transform(x) is x and calls == [x]


def test_compiled_w8a8_linear_matches_eager_bitwise():
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Module()
    weight = torch.randint(-127, 128, (40, 64), generator=g, dtype=torch.int8)
    weight_scale = torch.rand(40, generator=g) * 0.01
    layer.quamba_cpu_args = (weight, weight_scale, 0.03)
    x, bias = torch.randn(5, 64, generator=g), torch.randn(40, generator=g)
    eager = cpu_ops.w8a8_linear(layer, x, bias)
    compiled = _compiled(lambda x, bias: cpu_ops.w8a8_linear(layer, x, bias))(x, bias)
    assert torch.equal(compiled, eager)  # the same kernel on the same inputs
    # Exact integer sums and the reference's fp32 epilogue: bitwise the reference.
    assert torch.equal(eager, w8a8_linear_ref(x, weight, weight_scale, torch.tensor(0.03), bias))


def test_compiled_w4_linears_match_eager_bitwise():
    _, packed, scale = make_weight(40, 64, 32)
    layer = torch.nn.Module()
    layer.quamba_packed = prepack_w4(packed, scale, 32, (40, 64))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    for input_scale, reference in ((None, w4a16_linear_ref(x, packed, scale, 32, (40, 64))),
                                   (0.03, w4a8_linear_ref(x, packed, scale, 32, (40, 64), torch.tensor(0.03)))):  # fmt: skip
        layer.quamba_input_scale = input_scale
        eager = cpu_ops.w4_linear(layer, x, None)
        compiled = _compiled(lambda x: cpu_ops.w4_linear(layer, x, None))(x)
        assert torch.equal(compiled, eager), input_scale
        # tests/kernels/test_w4_linear.py bounds these by the sizes of the sums; at K = 64 with
        # |x| ~ 1, 1e-4 holds them with margin.
        torch.testing.assert_close(eager, reference, rtol=1e-4, atol=1e-4)
