"""compressed-tensors linear schemes of quamba checkpoints, running the package's kernels.

- ``QuambaW8A8Int8``: compressed-tensors' own W8A8 scheme (its parameters and loading),
  with the forward of ``kernels.int8_linear`` on the CPU: vLLM's oneDNN int8 GEMM measured
  ~12x slower than fp32 at batch 1 on AVX2, our numba kernel faster than fp32 at every batch
  size (benchmarks/bench_linear.py). On CUDA the stock kernel stays.
- ``QuambaW4Linear``: 4-bit ``pack-quantized`` weights (int32 ``weight_packed``, per-group
  ``weight_scale``, ``weight_shape``), either weight-only (W4A16) or with the static int8
  input scale (W4A8), running ``kernels.w4_linear``. vLLM's WNA16 scheme has no CPU kernel for
  AVX2 (and needs N divisible by 32), and its W4A8 scheme quantizes activations dynamically
  per token, not with Quamba's static scale.
- ``QuambaEmbeddingMethod``: the per-row int8/int4 ``pack-quantized`` embedding
  (``--quantize-embedding``), with vLLM's own parameters and loading
  (``CompressedTensorsEmbeddingWNA16Int``), whose lookup is a Triton kernel; on the CPU the
  gathered rows (only those) are unpacked and dequantized in torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_embedding import (
    CompressedTensorsEmbeddingWNA16Int,
)
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
    CompressedTensorsScheme,
    CompressedTensorsW8A8Int8,
)
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from . import cpu_ops
from ..kernels.w4_linear import prepack_w4, w4a8_linear, w4a16_linear

W4_PACK_FACTOR = 8  # 4-bit values per int32 word of weight_packed


# The CUDA path's 4-bit op (the checkpoint's tensors; the CPU ops are in cpu_ops).
@torch.library.custom_op("vllm_quamba::w4_linear", mutates_args=())
def w4_linear_op(
    x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
    weight_shape: torch.Tensor, group_size: int, input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    args = (x, weight_packed, weight_scale, group_size, weight_shape)
    if input_scale is not None:
        return w4a8_linear(*args, input_scale, bias)
    return w4a16_linear(*args, bias)


@w4_linear_op.register_fake
def _linear_output(x: torch.Tensor, weight: torch.Tensor, *args) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class QuambaW8A8Int8(CompressedTensorsW8A8Int8):
    """Channel-wise int8 weights, static symmetric per-tensor int8 input."""

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.weight.is_cuda:
            return super().process_weights_after_loading(layer)
        layer.weight_scale.data = layer.weight_scale.data.reshape(-1).contiguous()
        layer.weight.data = layer.weight.data.contiguous()
        # Plain tensors and the scale as a float (an fp32 value) for the CPU path (cpu_ops).
        layer.quamba_cpu_args = (layer.weight.data, layer.weight_scale.data, float(layer.input_scale))

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if x.is_cuda:
            return super().apply_weights(layer, x, bias)
        return cpu_ops.w8a8_linear(layer, x, bias)


class QuambaW4Linear(CompressedTensorsScheme):
    """4-bit symmetric group-wise weights; ``static_int8_input`` makes it W4A8."""

    def __init__(self, group_size: int, static_int8_input: bool):
        self.group_size = group_size
        self.static_int8_input = static_int8_input

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    def create_weights(
        self,
        layer: torch.nn.Module,
        output_partition_sizes: list[int],
        input_size_per_partition: int,
        params_dtype: torch.dtype,
        weight_loader: Callable,
        **kwargs,
    ) -> None:
        rows, cols = sum(output_partition_sizes), input_size_per_partition
        if cols % self.group_size:
            raise ValueError(
                f"a 4-bit linear with {cols} input features cannot use groups of {self.group_size}"
            )
        layer.register_parameter("weight_packed", PackedvLLMParameter(
            data=torch.empty(rows, -(-cols // W4_PACK_FACTOR), dtype=torch.int32),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=W4_PACK_FACTOR,
            weight_loader=weight_loader,
        ))  # fmt: skip
        layer.register_parameter("weight_scale", GroupQuantScaleParameter(
            data=torch.empty(rows, cols // self.group_size, dtype=torch.float32),
            input_dim=1, output_dim=0, weight_loader=weight_loader,
        ))  # fmt: skip
        layer.register_parameter("weight_shape", BasevLLMParameter(
            data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader
        ))  # fmt: skip
        if self.static_int8_input:
            layer.register_parameter("input_scale", BasevLLMParameter(
                data=torch.empty(1, dtype=torch.float32), weight_loader=weight_loader
            ))  # fmt: skip

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if isinstance(layer, VocabParallelEmbedding):
            # lm_head: vLLM pads the vocabulary with zero rows past the checkpoint's weight_shape.
            layer.weight_shape.data[0] = layer.weight_packed.shape[0]
        expected = [layer.weight_packed.shape[0], layer.weight_scale.shape[1] * self.group_size]
        if layer.weight_shape.tolist() != expected:
            raise ValueError(
                f"weight_shape {layer.weight_shape.tolist()} does not match the packed weight "
                f"and scales ({expected})"
            )
        if layer.weight_packed.is_cpu:  # laid out once here for the CPU kernels
            packed = prepack_w4(layer.weight_packed.data, layer.weight_scale.data, self.group_size, expected)
            if packed.weight_blocks is not None:
                # The SIMD kernels' copy replaces the checkpoint's words: one resident copy.
                layer.weight_packed.data = torch.empty(0, dtype=torch.int32)
            layer.quamba_packed = packed
            layer.quamba_input_scale = float(layer.input_scale) if self.static_int8_input else None

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if x.is_cpu:
            return cpu_ops.w4_linear(layer, x, bias)
        input_scale = layer.input_scale if self.static_int8_input else None
        return w4_linear_op(
            x, layer.weight_packed, layer.weight_scale, layer.weight_shape, self.group_size,
            input_scale, bias,
        )


def gather_dequantized_rows(
    ids: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, bits: int
) -> torch.Tensor:
    """Rows ``ids`` [n] of a per-row pack-quantized table -> float [n, width], unpacking only them.

    compressed-tensors packs 32 // bits values per int32 word, the first in the lowest bits,
    each stored as q + 2^(bits-1).
    """
    words = weight_packed.index_select(0, ids)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    unsigned = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    q = unsigned.reshape(ids.numel(), -1) - (1 << (bits - 1))
    return q.to(weight_scale.dtype) * weight_scale.index_select(0, ids)


class QuambaEmbeddingMethod(CompressedTensorsEmbeddingWNA16Int):
    """Per-row int8/int4 embedding: vLLM's parameters and loading, a CPU lookup."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        width = int(layer.weight_shape[1])
        if width != layer.hidden_size or layer.weight_scale.shape[1] != 1:
            raise ValueError(
                f"quantized embedding weight_shape {layer.weight_shape.tolist()} / weight_scale "
                f"{list(layer.weight_scale.shape)} do not match a per-row table of width {layer.hidden_size}"
            )

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        if input_.is_cuda:
            return super().embedding(layer, input_)
        rows = gather_dequantized_rows(input_.reshape(-1), layer.weight_packed, layer.weight_scale, self.num_bits)
        return rows.reshape(*input_.shape, layer.hidden_size)
