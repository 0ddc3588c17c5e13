"""QuambaMixer2: vLLM's MambaMixer2 with the Quamba2 W8A8 SSM path and int8 state cache.

Forward, per layer (numerics defined in ``vllm_quamba.kernels.quamba2_ssm``):

    in_proj (compressed-tensors W8A8 int8 scheme, static input scale)
    -> torch.ops.vllm.mamba_mixer2 (vLLM's custom op; it looks this layer up by name and calls
       ``conv_ssm_forward``, which we override):
         decode tokens (first in the batch): one batched ``quamba2_ssm_decode_ref``
         prefill sequences: one ``quamba2_ssm_prefill_ref`` per sequence
       each reading/writing its int8 (conv, ssm) states in vLLM's Mamba state cache;
       the result is already the gated-RMSNorm output y
       (on the CPU: ``quamba2_ssm_decode_cpu`` for all decodes and ``quamba2_ssm_prefill_cpu``
       for all prefills, numba kernels that also apply the Hadamard transform below)
    -> online Hadamard transform of y (``kernels.hadamard``), unless the checkpoint's
       ``quamba.hadamard`` is null (the naive baseline)
    -> out_proj (compressed-tensors W8A8 int8 scheme, static input scale)

W4A16 layers run the stock fp SSM instead, with an fp16 SSM state (``kernels.mamba2_ssm``); on
the CPU a decode-only step is one C call that also applies the gated norm and the Hadamard
transform, and any other step runs vLLM's ops, then the norm and the transform, inside the
custom op, so that out_proj's input is the same kind of tensor either way.

Parameters: in_proj/out_proj come from their quant scheme; every other tensor of the format
table (``format.mamba2_mixer_tensors``) is a plain parameter of the checkpoint's dtype,
validated when loaded and again after loading (``process_weights_after_loading``, which vLLM
calls on every AttentionLayerBase once all weights are in), where ``self.ssm_params`` is built.
"""

from __future__ import annotations


import torch
from vllm.config import CacheConfig, ModelConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.utils.torch_utils import _encode_layer_name

from ..format import (
    MAMBA2_QUANTIZED_LINEARS,
    Mamba2Shapes,
    QuambaFormatError,
    mamba2_ssm_params,
    mamba2_mixer_tensors,
    online_hadamard,
)
from .cpu_ops import hadamard_transform
from .checkpoint_tensors import CheckpointTensorsMixin, TensorHolder
from ..kernels.mamba2_ssm import FP_SSM_STATE_DTYPE, Mamba2SSMParams, mamba2_ssm_decode_cpu, simd_decode_runs
from ..kernels.quamba2_ssm import (
    Quamba2SSMParams,
    quamba2_ssm_decode_cpu,
    quamba2_ssm_decode_ref,
    quamba2_ssm_prefill_cpu,
    quamba2_ssm_prefill_ref,
)


# Submodules that, in the stock mixer, hold SSM tensors of the table; here they become plain
# parameter holders (conv1d is an int8 tensor with per-segment scales, not a Linear).
_HOLDER_MODULES = ("conv1d", "norm")


def quamba_mixer_ssm_tensors(shapes: Mamba2Shapes) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The format table's mixer tensors that the mixer owns (all but in_proj/out_proj)."""
    return {
        name: spec
        for name, spec in mamba2_mixer_tensors(shapes).items()
        if name.split(".")[0] not in MAMBA2_QUANTIZED_LINEARS
    }


class QuambaMixer2(CheckpointTensorsMixin, MambaMixer2):
    """Mamba2 mixer of a quamba W8A8 checkpoint (tensor parallel size 1)."""

    def __init__(
        self,
        hidden_size: int,
        ssm_state_size: int,
        conv_kernel_size: int,
        intermediate_size: int,
        use_conv_bias: bool,
        use_bias: bool,
        n_groups: int = 1,
        num_heads: int = 128,
        head_dim: int = 64,
        rms_norm_eps: float = 1e-5,
        activation: str = "silu",
        use_rms_norm: bool = True,
        model_config: ModelConfig | None = None,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        tp_size = get_tensor_model_parallel_world_size()
        if tp_size != 1:
            raise NotImplementedError(
                f"quamba checkpoints are served with tensor_parallel_size=1 only (got {tp_size})"
            )
        if not use_rms_norm:
            raise NotImplementedError("quamba Mamba2 mixers need the gated RMSNorm")
        if activation not in ("silu", "swish"):
            raise NotImplementedError(f"quamba Mamba2 mixers use SiLU, not {activation!r}")
        super().__init__(
            hidden_size=hidden_size,
            ssm_state_size=ssm_state_size,
            conv_kernel_size=conv_kernel_size,
            intermediate_size=intermediate_size,
            use_conv_bias=use_conv_bias,
            use_bias=use_bias,
            n_groups=n_groups,
            num_heads=num_heads,
            head_dim=head_dim,
            rms_norm_eps=rms_norm_eps,
            activation=activation,
            use_rms_norm=use_rms_norm,
            model_config=model_config,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=prefix,
        )
        if self.num_spec > 0:
            raise NotImplementedError("speculative decoding is not supported with quamba checkpoints")
        if self.use_replayssm:
            raise NotImplementedError("--use-replayssm is not supported with quamba checkpoints")
        if cache_config is not None and cache_config.mamba_cache_mode != "none":
            raise NotImplementedError(
                f"mamba_cache_mode={cache_config.mamba_cache_mode!r} (prefix caching) is not "
                "supported with quamba checkpoints; run without --enable-prefix-caching"
            )

        num_layers = getattr(getattr(model_config, "hf_config", None), "num_hidden_layers", 0)
        self.shapes = Mamba2Shapes(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            n_groups=n_groups,
            state_size=ssm_state_size,
            num_heads=num_heads,
            head_dim=head_dim,
            conv_kernel=conv_kernel_size,
            num_layers=num_layers or 0,
        )
        # W8A8 or W4A8: the same int8 SSM, only the linears' schemes differ. W4A16: the stock
        # fp SSM (quamba.md section 2.5) with the online Hadamard before out_proj.
        self.precision = quant_config.layer_precision(prefix)
        self.rms_norm_eps = rms_norm_eps
        self.chunk_size = model_config.get_mamba_chunk_size() if model_config is not None else 256
        self.ssm_params: Quamba2SSMParams | Mamba2SSMParams | None = None
        self.online_hadamard = online_hadamard(quant_config.quamba)
        if self.fp_ssm:
            self._ssm_tensor_specs = {}  # the stock parameters load the fp SSM tensors
            return

        # Drop the stock fp SSM parameters (conv1d Linear and its weight view, A, D, dt_bias,
        # the gated norm) and register the format's tensors with their own dtypes instead.
        del self.conv_weights
        for name in ("A", "D", "dt_bias"):
            delattr(self, name)
        for name in _HOLDER_MODULES:
            delattr(self, name)
            setattr(self, name, TensorHolder())

        self.register_checkpoint_tensors(quamba_mixer_ssm_tensors(self.shapes))

    @property
    def fp_ssm(self) -> bool:
        return self.precision == "w4a16"

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        if not self.fp_ssm:
            return super().get_state_dtype()
        conv_dtype = MambaMixer2.get_state_dtype(self)[0]
        return conv_dtype, FP_SSM_STATE_DTYPE

    def format_tensors(self):
        """Name -> (shape, dtype) of every checkpoint tensor of this mixer (format.py's table)."""
        return mamba2_mixer_tensors(self.shapes, self.precision)

    # ----- loading ---------------------------------------------------------------------------
    def process_weights_after_loading(self, act_dtype: torch.dtype | None = None) -> None:
        """Validate the loaded SSM tensors and build ``self.ssm_params``.

        vLLM's loader calls this on every attention-like layer after the linears' own
        ``process_weights_after_loading`` (model_loader/utils.py).
        """
        if self.fp_ssm:
            self.ssm_params = self._fp_ssm_params()
            return
        tensors = self.checked_checkpoint_tensors()
        self._check_group_ranges(tensors)
        self.ssm_params = mamba2_ssm_params(
            tensors, self.shapes, norm_eps=self.rms_norm_eps, chunk_size=self.chunk_size
        )

    def _fp_ssm_params(self) -> Mamba2SSMParams:
        s = self.shapes
        return Mamba2SSMParams(
            conv_weight=self.conv_weights, conv_bias=self.conv1d.bias, A=self.A, D=self.D, dt_bias=self.dt_bias,
            norm_weight=self.norm.weight, norm_eps=self.norm.variance_epsilon, n_groups=s.n_groups,
            state_size=s.state_size, head_dim=s.head_dim,
        )  # fmt: skip

    def _check_group_ranges(self, tensors: dict[str, torch.Tensor]) -> None:
        """Sort-and-cluster group ranges must be non-decreasing cumsums ending at the sizes."""
        s = self.shapes
        checks = (
            ("x_head_group_range", s.num_heads // s.n_groups),
            ("x_dim_group_range", s.head_dim),
        )
        for name, total in checks:
            ranges = tensors[name]
            ok = bool((ranges[..., -1] == total).all()) and bool(
                (ranges[..., 1:] >= ranges[..., :-1]).all() and (ranges >= 0).all()
            )
            if not ok:
                raise QuambaFormatError(
                    f"quamba checkpoint tensor {self.checkpoint_name(name)!r} is not a "
                    f"non-decreasing cumulative size ending at {total}"
                )

    # ----- forward ---------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, mup_vector: torch.Tensor | None = None):
        projected_states, _ = self.in_proj(hidden_states)
        if mup_vector is not None:
            projected_states = projected_states * mup_vector

        ssm_output = torch.empty(
            (hidden_states.shape[0], self.intermediate_size),
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        # vLLM's splitting custom op: it finds this layer by name in the forward context and
        # calls self.conv_ssm_forward(projected_states, ssm_output).
        torch.ops.vllm.mamba_mixer2(
            projected_states, ssm_output, _encode_layer_name(self.prefix)
        )
        # On the CPU, conv_ssm_forward ends with the gated norm and the Hadamard transform itself.
        if not ssm_output.is_cpu:
            if self.fp_ssm:
                ssm_output = self.norm(ssm_output, projected_states[..., : self.intermediate_size])
            if self.online_hadamard:
                ssm_output = hadamard_transform(ssm_output)
        output, _ = self.out_proj(ssm_output)
        return output

    def conv_ssm_forward(self, projected_states: torch.Tensor, output: torch.Tensor) -> None:
        """in_proj output -> gated-norm output, written into ``output`` (states updated); on the
        CPU, the Hadamard-rotated gated-norm output where the checkpoint rotates."""
        if self.fp_ssm:
            if output.is_cpu:
                return self._fp_ssm_cpu(projected_states, output)
            return MambaMixer2.conv_ssm_forward(self, projected_states, output)
        batch = self.batch_state_caches(output)
        if batch is None:
            return
        if output.is_cpu:
            return self._conv_ssm_cpu(projected_states, output, *batch)
        attn_metadata, conv_cache, ssm_cache, _ = batch
        params = self.ssm_params
        num_decodes = attn_metadata.num_decodes
        num_decode_tokens = attn_metadata.num_decode_tokens
        num_prefills = attn_metadata.num_prefills

        if num_decodes > 0:
            slots = attn_metadata.state_indices_tensor_d[:, 0].long()
            y, conv_new, ssm_new = quamba2_ssm_decode_ref(
                projected_states[:num_decode_tokens], params, conv_cache[slots], ssm_cache[slots]
            )
            output[:num_decode_tokens] = y.to(output.dtype)
            conv_cache[slots] = conv_new
            ssm_cache[slots] = ssm_new

        if num_prefills > 0:
            starts = attn_metadata.query_start_loc_p.tolist()
            slots_p = attn_metadata.state_indices_tensor_p.tolist()
            has_initial = attn_metadata.has_initial_states_p.tolist()
            for i in range(num_prefills):
                start = num_decode_tokens + starts[i]
                end = num_decode_tokens + starts[i + 1]
                slot = slots_p[i]
                # A continued (chunked) prefill starts from the sequence's cached states.
                conv_in = conv_cache[slot] if has_initial[i] else None
                ssm_in = ssm_cache[slot] if has_initial[i] else None
                y, conv_new, ssm_new = quamba2_ssm_prefill_ref(
                    projected_states[start:end], params, conv_in, ssm_in
                )
                output[start:end] = y.to(output.dtype)
                conv_cache[slot] = conv_new
                ssm_cache[slot] = ssm_new

    def _conv_ssm_cpu(self, projected_states, output, attn_metadata, conv_cache, ssm_cache, num_tokens):
        """CPU fast path: one numba call for all decodes and one for all prefills, states updated
        in place in the cache, ``output`` already Hadamard-rotated when the checkpoint has the
        online Hadamard (out_proj's input)."""
        params = self.ssm_params
        num_decode_tokens = attn_metadata.num_decode_tokens
        result = output[:num_tokens]
        if result.dtype != torch.float32:  # the kernels write fp32
            result = torch.empty_like(result, dtype=torch.float32)
        if attn_metadata.num_decodes > 0:
            quamba2_ssm_decode_cpu(
                projected_states[:num_decode_tokens], params, conv_cache, ssm_cache,
                attn_metadata.state_indices_tensor_d[:, 0], out=result[:num_decode_tokens],
                rotate_output=self.online_hadamard,
            )  # fmt: skip
        if attn_metadata.num_prefills > 0:
            quamba2_ssm_prefill_cpu(
                projected_states[num_decode_tokens:num_tokens], params, conv_cache, ssm_cache,
                attn_metadata.query_start_loc_p, attn_metadata.state_indices_tensor_p,
                attn_metadata.has_initial_states_p, out=result[num_decode_tokens:],
                rotate_output=self.online_hadamard,
            )  # fmt: skip
        if result.data_ptr() != output.data_ptr():
            output[:num_tokens] = result.to(output.dtype)

    def _fp_ssm_cpu(self, projected_states: torch.Tensor, output: torch.Tensor) -> None:
        """A W4A16 layer on the CPU: a decode-only step in one C call (mamba2_ssm_decode_cpu);
        anything else (prefills, no AVX-512, a bf16 model) through vLLM's ops, then the gated
        norm and the Hadamard transform here."""
        batch = self.batch_state_caches(output)
        if batch is None:
            return
        attn_metadata, conv_cache, ssm_cache, num_tokens = batch
        if (
            attn_metadata.num_prefills == 0
            and output.dtype == torch.float32
            and simd_decode_runs(projected_states, conv_cache, ssm_cache)
        ):
            mamba2_ssm_decode_cpu(
                projected_states[:num_tokens], self.ssm_params, conv_cache, ssm_cache,
                attn_metadata.state_indices_tensor_d[:, 0], out=output[:num_tokens],
                rotate_output=self.online_hadamard,
            )  # fmt: skip
            return
        MambaMixer2.conv_ssm_forward(self, projected_states, output)
        y = self.norm(output[:num_tokens], projected_states[:num_tokens, : self.intermediate_size])
        output[:num_tokens] = hadamard_transform(y) if self.online_hadamard else y
