"""The quamba mixers' plain checkpoint tensors: registered under their checkpoint names,
checked (shape, dtype, finite values) as they load and again after loading.

Both quantized mixers drop vLLM's fp SSM parameters and own the format table's tensors
(``vllm_quamba.format``) instead, with the table's dtypes; the linears' tensors stay with their
compressed-tensors schemes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from vllm.model_executor.utils import set_weight_attrs

from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

from ..format import check_tensor

# The int8 (conv_state, ssm_state) of every quamba layer in vLLM's Mamba state cache; the
# shapes stay the stock ones.
QUAMBA_STATE_DTYPES = (torch.int8, torch.int8)

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


def vllm_relative_name(checkpoint_relative: str) -> str:
    """The mixer-relative name a checkpoint tensor gets after vLLM's Mamba weight mappers.

    ``Mamba{,2}ForCausalLM.hf_to_vllm_mapper`` renames the substring ".A_log" to ".A", so
    ``A_log`` arrives as ``A`` and ``A_log_scale`` as ``A_scale``.
    """
    return ("." + checkpoint_relative).replace(".A_log", ".A")[1:]


class TensorHolder(nn.Module):
    """A bare container of parameters (keeps checkpoint names like ``conv1d.weight``)."""


def _checked_loader(
    checkpoint_name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def load(param: torch.Tensor, loaded: torch.Tensor) -> None:
        check_tensor(checkpoint_name, loaded, shape, dtype)
        param.data.copy_(loaded)

    return load


class CheckpointTensorsMixin:
    """For an ``nn.Module`` mixer with a ``prefix``: its plain checkpoint tensors."""

    prefix: str
    _ssm_tensor_specs: TensorSpecs
    ssm_params: object | None
    kv_cache: list

    def register_checkpoint_tensors(self, specs: TensorSpecs) -> None:
        self._ssm_tensor_specs = specs
        for ckpt_name, (shape, dtype) in specs.items():
            owner, param_name = self._owner_of(ckpt_name)
            param = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(
                param,
                {"weight_loader": _checked_loader(self.checkpoint_name(ckpt_name), shape, dtype)},
            )
            owner.register_parameter(param_name, param)

    def checkpoint_name(self, relative: str) -> str:
        """Full checkpoint tensor name of a mixer-relative format name."""
        return f"{self.prefix}.{relative}"

    def _owner_of(self, checkpoint_relative: str) -> tuple[nn.Module, str]:
        parts = vllm_relative_name(checkpoint_relative).split(".")
        owner: nn.Module = self  # type: ignore[assignment]
        for part in parts[:-1]:
            owner = getattr(owner, part)
        return owner, parts[-1]

    def ssm_tensor(self, checkpoint_relative: str) -> torch.Tensor:
        owner, name = self._owner_of(checkpoint_relative)
        return getattr(owner, name)

    def expected_vllm_names(self) -> dict[str, str]:
        """vLLM parameter name -> checkpoint name, for every plain tensor this mixer loads."""
        return {
            f"{self.prefix}.{vllm_relative_name(rel)}": self.checkpoint_name(rel)
            for rel in self._ssm_tensor_specs
        }

    def checked_checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The loaded tensors by mixer-relative checkpoint name, each checked again."""
        tensors: dict[str, torch.Tensor] = {}
        for rel, (shape, dtype) in self._ssm_tensor_specs.items():
            tensor = self.ssm_tensor(rel).data
            check_tensor(self.checkpoint_name(rel), tensor, shape, dtype)
            tensors[rel] = tensor
        return tensors

    def get_state_dtype(self) -> tuple[torch.dtype, torch.dtype]:
        return QUAMBA_STATE_DTYPES

    def batch_state_caches(self, output: torch.Tensor):
        """This step's Mamba metadata and int8 (conv, ssm) caches, conv as (K-1, dim) per slot.

        None on vLLM's profile run (no state cache yet; ``output`` is zeroed). Rows of
        ``output`` past the batch's real tokens (padding) are zeroed.
        """
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        if metadata is None:
            output.zero_()
            return None
        if self.ssm_params is None:
            raise RuntimeError(f"{self.prefix}: quamba SSM parameters were never loaded")
        if metadata.num_decodes > 0 and metadata.num_decode_tokens != metadata.num_decodes:
            raise NotImplementedError("quamba decode handles one token per sequence")
        num_tokens = metadata.num_decode_tokens + metadata.num_prefill_tokens
        if num_tokens < output.shape[0]:
            output[num_tokens:].zero_()
        conv_cache = self.kv_cache[0]
        if is_conv_state_dim_first():
            # DS layout stores (dim, K-1) per slot; the references use (K-1, dim).
            conv_cache = conv_cache.transpose(-1, -2)
        return metadata, conv_cache, self.kv_cache[1], num_tokens
