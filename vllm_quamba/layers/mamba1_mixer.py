"""QuambaMixer: vLLM's Mamba1 ``MambaMixer`` for every layer of a quamba checkpoint, at its
layer's precision: the Quamba int8 SSM path with an int8 state cache (W8A8, W4A8), or the stock
fp SSM and fp32 states with 4-bit weight-only linears (W4A16). A W4AX model has both kinds of
layer, each with its own state dtype in vLLM's Mamba state cache (``get_state_dtype``).

Forward of an int8-SSM layer (numerics defined in ``vllm_quamba.kernels.quamba_ssm``; the
reference of every layer is ``converters.simulate.QuantizedMambaReference``):

    in_proj (the scheme of the checkpoint's config group: W8A8 int8 or W4A8, static input scale)
    -> [A] conv: decode tokens (first in the batch) in one batched ``quamba_conv_decode_ref``,
       each prefill sequence in its own ``quamba_conv_prefill_ref``; int8 u, z, conv state
    -> x_proj on the dequantized u, dt_proj on its dt_low columns (W8A8, or W4A8 x_proj and W8A8
       dt_proj; run once over all tokens of the batch: static per-tensor input scales make that
       per-token exact)
    -> [B] scan: batched ``quamba_scan_decode_ref`` / per-sequence ``quamba_scan_prefill_ref``;
       fp y and the int8 SSM state
    -> online Hadamard of y (only when the checkpoint's ``quamba.hadamard`` is not null)
    -> out_proj (W8A8 or W4A8)

States live in vLLM's Mamba state cache as int8 (``get_state_dtype``); the shapes are the
stock Mamba1 ones. The stock ``MambaDecoderLayer`` does not hand the quant config to its mixer,
so this mixer reads it from the current vLLM config and rebuilds the four linears with it.
Every other tensor of the format table (``format.mamba1_mixer_tensors``) is a plain
parameter of the checkpoint's dtype, checked when loaded and again after loading
(``process_weights_after_loading``), where ``self.ssm_params`` is built.

A W4A16 layer keeps the stock mixer (conv1d, scan, fp dt_proj with its bias, fp32 states and
the stock parameter names and loaders, quamba.md section 2.5) with in_proj, x_proj and out_proj
rebuilt 4-bit, and the online Hadamard on out_proj's input when the checkpoint has it.
"""

from __future__ import annotations


import torch
from vllm.config import CacheConfig, ModelConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.mamba_mixer import MambaMixer

from ..format import (
    MAMBA1_QUANTIZED_LINEARS,
    MambaShapes,
    QuambaFormatError,
    mamba1_mixer_tensors,
    mamba1_ssm_params,
    online_hadamard,
)
from .cpu_ops import hadamard_transform
from .checkpoint_tensors import CheckpointTensorsMixin, TensorHolder
from ..kernels.quamba_ssm import (
    QuambaSSMParams,
    quamba_conv_decode_ref,
    quamba_conv_prefill_ref,
    quamba_scan_decode_ref,
    quamba_scan_prefill_ref,
)
from ..kernels.quant import dequantize_int8


# Tensors of the table that belong to a quantized linear but are not one of its scheme's
# parameters: registered on that linear module as plain parameters.
_LINEAR_EXTRAS = ("x_proj.output_scale",)



def quamba_mixer1_ssm_tensors(
    shapes: MambaShapes, precision: str = "w8a8"
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The table's tensors the mixer owns as plain parameters (not the linears' scheme params)."""
    return {
        name: spec
        for name, spec in mamba1_mixer_tensors(shapes, precision).items()
        if name.split(".")[0] not in MAMBA1_QUANTIZED_LINEARS or name in _LINEAR_EXTRAS
    }


class QuambaMixer(CheckpointTensorsMixin, MambaMixer):
    """Mamba1 mixer of one layer of a quamba checkpoint, at that layer's precision (tensor
    parallel size 1)."""

    def __init__(
        self,
        hidden_size: int,
        ssm_state_size: int,
        conv_kernel_size: int,
        intermediate_size: int,
        time_step_rank: int,
        use_conv_bias: bool,
        use_bias: bool,
        use_rms_norm: bool,
        rms_norm_has_weight: bool = True,
        rms_norm_eps: float = 1e-5,
        activation="silu",
        is_lora_enabled: bool = False,
        model_config: ModelConfig | None = None,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
    ):
        tp_size = get_tensor_model_parallel_world_size()
        if tp_size != 1:
            raise NotImplementedError(
                f"quamba checkpoints are served with tensor_parallel_size=1 only (got {tp_size})"
            )
        if use_rms_norm:
            raise NotImplementedError("quamba Mamba1 mixers have no dt/B/C RMSNorm (FalconMamba)")
        if use_bias:
            raise NotImplementedError("quamba Mamba1 mixers have no in_proj/out_proj bias")
        if not use_conv_bias:
            raise NotImplementedError("quamba Mamba1 mixers need the conv1d bias")
        if activation not in ("silu", "swish"):
            raise NotImplementedError(f"quamba Mamba1 mixers use SiLU, not {activation!r}")
        if is_lora_enabled:
            raise NotImplementedError("LoRA is not supported with quamba checkpoints")
        super().__init__(
            hidden_size=hidden_size,
            ssm_state_size=ssm_state_size,
            conv_kernel_size=conv_kernel_size,
            intermediate_size=intermediate_size,
            time_step_rank=time_step_rank,
            use_conv_bias=use_conv_bias,
            use_bias=use_bias,
            use_rms_norm=use_rms_norm,
            rms_norm_has_weight=rms_norm_has_weight,
            rms_norm_eps=rms_norm_eps,
            activation=activation,
            is_lora_enabled=is_lora_enabled,
            model_config=model_config,
            cache_config=cache_config,
            prefix=prefix,
        )
        if cache_config is not None and cache_config.mamba_cache_mode != "none":
            raise NotImplementedError(
                f"mamba_cache_mode={cache_config.mamba_cache_mode!r} (prefix caching) is not "
                "supported with quamba checkpoints; run without --enable-prefix-caching"
            )
        quant_config = get_current_vllm_config().quant_config
        self.online_hadamard = online_hadamard(quant_config.quamba)
        self.precision = quant_config.layer_precision(prefix)

        num_layers = getattr(getattr(model_config, "hf_config", None), "num_hidden_layers", 0)
        self.shapes = MambaShapes(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            state_size=ssm_state_size,
            time_step_rank=time_step_rank,
            conv_kernel=conv_kernel_size,
            num_layers=num_layers or 0,
        )

        # The linears again, now with the quant config (the schemes of its config groups).
        rebuild_quantized_linears(self, hidden_size, self.shapes.x_proj_dim, quant_config, prefix)
        self.ssm_params: QuambaSSMParams | None = None
        if self.fp_ssm:
            self._ssm_tensor_specs = {}  # the stock parameters load the fp SSM tensors
            self.out_proj.register_forward_pre_hook(self._out_proj_input)
            return

        # dt_proj has no bias: the source's fp bias is the checkpoint's int8 dt_bias.
        self.dt_proj = ColumnParallelLinear(
            time_step_rank, intermediate_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.dt_proj",
        )  # fmt: skip

        # Drop the stock fp SSM parameters (conv1d Linear, A, D) and register the format's
        # tensors with their own dtypes instead.
        for name in ("A", "D"):
            delattr(self, name)
        delattr(self, "conv1d")
        self.conv1d = TensorHolder()

        self.register_checkpoint_tensors(quamba_mixer1_ssm_tensors(self.shapes, self.precision))

    @property
    def fp_ssm(self) -> bool:
        return self.precision == "w4a16"

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return MambaMixer.get_state_dtype(self) if self.fp_ssm else super().get_state_dtype()

    def _out_proj_input(self, module: torch.nn.Module, args: tuple) -> tuple:
        """fp-SSM layers: out_proj's input made contiguous (the stock forward hands it a
        transposed view whenever the batch holds a prefill; the CPU linear needs stride 1), then
        the online Hadamard when the checkpoint has it (its transpose is fused into the weight)."""
        y = args[0].contiguous()
        return (hadamard_transform(y) if self.online_hadamard else y, *args[1:])

    def format_tensors(self):
        """Name -> (shape, dtype) of every checkpoint tensor of this mixer (format.py's table)."""
        return mamba1_mixer_tensors(self.shapes, self.precision)

    # ----- loading ---------------------------------------------------------------------------
    def process_weights_after_loading(self, act_dtype: torch.dtype | None = None) -> None:
        """Check the loaded tensors and build ``self.ssm_params`` (called by vLLM's loader
        on every attention-like layer once all weights are in)."""
        if self.fp_ssm:
            return
        tensors = self.checked_checkpoint_tensors()
        # mamba1_ssm_params reads u's scale as x_proj's input scale: the scheme's parameter.
        u_scale = self.x_proj.input_scale.data.reshape(-1)
        if u_scale.numel() != 1 or not bool(torch.isfinite(u_scale).all()) or float(u_scale) <= 0:
            raise QuambaFormatError(
                f"quamba checkpoint tensor {self.checkpoint_name('x_proj.input_scale')!r} must be "
                "one positive finite scale"
            )
        tensors["x_proj.input_scale"] = u_scale.float()
        self.ssm_params = mamba1_ssm_params(tensors, self.shapes)

    # ----- forward ---------------------------------------------------------------------------
    def forward_impl(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """Called by vLLM's ``mamba_mixer`` custom op (``MambaMixer.forward``)."""
        if self.fp_ssm:
            return MambaMixer.forward_impl(self, hidden_states, output)
        batch = self.batch_state_caches(output)
        if batch is None:
            return
        attn_metadata, conv_cache, ssm_cache, num_tokens = batch
        p = self.ssm_params
        num_decodes = attn_metadata.num_decodes
        num_decode_tokens = attn_metadata.num_decode_tokens
        num_prefills = attn_metadata.num_prefills
        if num_tokens == 0:
            return

        xz = self.in_proj(hidden_states[:num_tokens])[0]

        # [A] conv: int8 u, z for every token; conv states written back.
        u_parts: list[torch.Tensor] = []
        z_parts: list[torch.Tensor] = []
        slots_d = None
        prefill: list[tuple[int, int, int, bool]] = []  # (start, end, slot, has_initial)
        if num_decodes > 0:
            slots_d = attn_metadata.state_indices_tensor_d[:num_decodes, 0].long()
            u_d, z_d, conv_new = quamba_conv_decode_ref(xz[:num_decode_tokens], p, conv_cache[slots_d])
            conv_cache[slots_d] = conv_new
            u_parts.append(u_d)
            z_parts.append(z_d)
        if num_prefills > 0:
            starts = attn_metadata.query_start_loc_p.tolist()
            slots_p = attn_metadata.state_indices_tensor_p.tolist()
            has_initial = attn_metadata.has_initial_states_p.tolist()
            for i in range(num_prefills):
                start = num_decode_tokens + starts[i]
                end = num_decode_tokens + starts[i + 1]
                # A continued (chunked) prefill starts from the sequence's cached states.
                seq = (start, end, slots_p[i], bool(has_initial[i]))
                prefill.append(seq)
                conv_in = conv_cache[seq[2]] if seq[3] else None
                u_s, z_s, conv_new = quamba_conv_prefill_ref(xz[start:end], p, conv_in)
                conv_cache[seq[2]] = conv_new
                u_parts.append(u_s)
                z_parts.append(z_s)
        u_q = torch.cat(u_parts) if len(u_parts) > 1 else u_parts[0]
        z_q = torch.cat(z_parts) if len(z_parts) > 1 else z_parts[0]

        # x_proj / dt_proj: W8A8 linears over all tokens at once.
        x_dbl = self.x_proj(dequantize_int8(u_q, p.u_scale).to(hidden_states.dtype))[0]
        dt = self.dt_proj(x_dbl[:, : p.time_step_rank].contiguous())[0]

        # [B] scan: fp y; ssm states written back.
        y = torch.empty((num_tokens, self.intermediate_size), dtype=torch.float32, device=xz.device)
        if slots_d is not None:
            n = num_decode_tokens
            y_d, ssm_new = quamba_scan_decode_ref(u_q[:n], z_q[:n], x_dbl[:n], dt[:n], p, ssm_cache[slots_d])
            y[:n] = y_d
            ssm_cache[slots_d] = ssm_new
        for start, end, slot, has_init in prefill:
            ssm_in = ssm_cache[slot] if has_init else None
            y_s, ssm_new = quamba_scan_prefill_ref(
                u_q[start:end], z_q[start:end], x_dbl[start:end], dt[start:end], p, ssm_in
            )
            y[start:end] = y_s
            ssm_cache[slot] = ssm_new

        if self.online_hadamard:
            y = hadamard_transform(y)
        output[:num_tokens] = self.out_proj(y.to(hidden_states.dtype))[0]


def rebuild_quantized_linears(
    mixer: MambaMixer, hidden_size: int, x_proj_dim: int, quant_config, prefix: str
) -> None:
    """Rebuild a Mamba1 mixer's in_proj, x_proj and out_proj with the quant config (the stock
    mixer builds its linears without one). in_proj is one plain column linear: the checkpoint
    holds it as one [2I, D] tensor."""
    intermediate_size = mixer.intermediate_size
    mixer.in_proj = ColumnParallelLinear(
        hidden_size, 2 * intermediate_size, bias=False,
        quant_config=quant_config, prefix=f"{prefix}.in_proj",
    )  # fmt: skip
    mixer.x_proj = RowParallelLinear(
        intermediate_size, x_proj_dim, bias=False,
        quant_config=quant_config, prefix=f"{prefix}.x_proj",
    )  # fmt: skip
    mixer.out_proj = RowParallelLinear(
        intermediate_size, hidden_size, bias=False, input_is_parallel=True,
        quant_config=quant_config, prefix=f"{prefix}.out_proj",
    )  # fmt: skip
