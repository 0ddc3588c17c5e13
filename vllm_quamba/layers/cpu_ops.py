"""The package's CPU kernels as torch ops, for vLLM's torch.compile'd model (its default).

Dynamo cannot trace numba or ctypes calls, so compiled graphs reach the kernels through these
opaque ops. They are registered with vLLM's ``direct_register_custom_op`` on the CPU dispatch
key: a call through an op made by ``torch.library.custom_op`` cost 13.3 us against 3.4 us
(the same trivial op, 2-core Xeon VM), ~0.5 ms of a mamba2-130m decode step's 49 linears.
Eager calls skip the ops (``eager_cpu``) and call the kernels directly with what the layers
prepared after loading.
"""

from __future__ import annotations

import torch
from torch.library import Library
from vllm.utils.torch_utils import direct_register_custom_op

from ..kernels.hadamard import hadamard_transform_cpu, hadamard_transform_ref
from ..kernels.int8_linear import w8a8_linear_cpu
from ..kernels.w4_linear import PackedW4, w4a8_linear_cpu, w4a16_linear_cpu

# The ops live as long as this library object.
_LIBRARY = Library("vllm_quamba", "FRAGMENT")


def eager_cpu(x: torch.Tensor) -> bool:
    return x.is_cpu and not torch.compiler.is_compiling()


def _w8a8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    return w8a8_linear_cpu(x, weight, weight_scale, input_scale, bias)


def _w8a8_output(x: torch.Tensor, weight: torch.Tensor, *args) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _w4_cpu(x: torch.Tensor, packed: PackedW4, input_scale: float | None, bias: torch.Tensor | None) -> torch.Tensor:
    if input_scale is not None:
        return w4a8_linear_cpu(x, packed, input_scale, bias)
    return w4a16_linear_cpu(x, packed, bias)


def _w4_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_t: torch.Tensor,
    group_size: int, out_features: int, in_features: int, input_scale: float | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """The 4-bit kernels on a layer's PackedW4, given as its tensors (an op cannot take the object)."""
    packed = PackedW4.from_tensors(weight, weight_scale, weight_scale_t, group_size, out_features, in_features)
    return _w4_cpu(x, packed, input_scale, bias)


def _w4_output(x: torch.Tensor, weight, weight_scale, weight_scale_t, group_size, out_features, *args) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _same_shape(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


for _name, _impl, _fake in (
    ("w8a8_linear_cpu", _w8a8_linear, _w8a8_output),
    ("w4_linear_cpu", _w4_linear, _w4_output),
    ("hadamard_transform_cpu", hadamard_transform_cpu, _same_shape),
):
    direct_register_custom_op(_name, _impl, fake_impl=_fake, target_lib=_LIBRARY, dispatch_key="CPU")


def w8a8_linear(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A QuambaW8A8Int8 layer's CPU forward on its prepared ``quamba_cpu_args``."""
    if eager_cpu(x):
        return w8a8_linear_cpu(x, *layer.quamba_cpu_args, bias)
    return torch.ops.vllm_quamba.w8a8_linear_cpu(x, *layer.quamba_cpu_args, bias)


def w4_linear(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A QuambaW4Linear layer's CPU forward on its prepared ``quamba_packed``."""
    packed, input_scale = layer.quamba_packed, layer.quamba_input_scale
    if eager_cpu(x):
        return _w4_cpu(x, packed, input_scale, bias)
    return torch.ops.vllm_quamba.w4_linear_cpu(
        x, *packed.tensors(), packed.group_size, packed.out_features, packed.in_features, input_scale, bias
    )


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """hadamard_transform_ref(x): on the CPU by hadamard_transform_cpu (through its op when compiled)."""
    if not x.is_cpu:
        return hadamard_transform_ref(x)
    if torch.compiler.is_compiling():
        return torch.ops.vllm_quamba.hadamard_transform_cpu(x)
    return hadamard_transform_cpu(x)
