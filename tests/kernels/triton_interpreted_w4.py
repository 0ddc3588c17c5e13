"""The 4-bit Triton kernels against their references under TRITON_INTERPRET=1.

Run by tests/kernels/test_w4_linear.py::test_triton_under_interpreter in a child process with
the interpreter switched on at import; not a test_*.py file, so a plain pytest run skips it.
"""

import pytest
import torch

from tests.kernels.test_w4_linear import assert_close, bound, make_weight
from vllm_quamba.kernels.quant import quantize_int8
from vllm_quamba.kernels.w4_linear import (
    dequantize_w4_ref,
    w4a8_linear_ref,
    w4a8_linear_triton,
    w4a16_linear_ref,
    w4a16_linear_triton,
)

triton_cases = pytest.mark.parametrize(
    "out_features,in_features,group_size,rows", [(37, 128, 32, 3), (20, 200, 64, 17), (33, 256, 128, 1)]
)


@triton_cases
def test_w4a16_triton_interpreted_matches_ref(out_features, in_features, group_size, rows):
    _, packed, scale = make_weight(out_features, in_features, group_size)
    shape = (out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(out_features)
    expected = w4a16_linear_ref(x, packed, scale, group_size, shape, bias)
    actual = w4a16_linear_triton(x, packed, scale, group_size, shape, bias)
    weight = dequantize_w4_ref(packed, scale, group_size, shape)
    assert_close(actual, expected, 1e-5 * bound(x, weight) + 1e-6)


@triton_cases
def test_w4a8_triton_interpreted_matches_ref(out_features, in_features, group_size, rows):
    _, packed, scale = make_weight(out_features, in_features, group_size)
    shape = (out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(6)) * 4
    input_scale = torch.tensor([0.02])
    expected = w4a8_linear_ref(x, packed, scale, group_size, shape, input_scale)
    actual = w4a8_linear_triton(x, packed, scale, group_size, shape, input_scale)
    weight = dequantize_w4_ref(packed, scale, group_size, shape)
    assert_close(actual, expected, 1e-6 * bound(quantize_int8(x, input_scale), weight) * input_scale + 1e-7)
