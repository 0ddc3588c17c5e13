"""The ``quamba`` quantization method of vLLM.

``QuambaConfig`` is vLLM's compressed-tensors config plus the checkpoint's ``quamba`` section
(``format.quamba_section``). The linears that the checkpoint quantizes (the Mamba2 mixers'
``in_proj``/``out_proj``) keep compressed-tensors' own schemes, weight loading and kernels:
the checkpoint declares them as int8 channel-wise weights (``weight_scale`` [N, 1]) with a
static symmetric per-tensor int8 ``input_scale``, which vLLM maps to
``CompressedTensorsW8A8Int8`` (on CPU: ``CPUInt8ScaledMMLinearKernel`` -> oneDNN; its input
quantization is ``round_half_even(x * (1 / input_scale))`` clamped to [-128, 127]).
The SSM side (conv1d, scan, state) is handled by ``layers.mamba2_mixer.QuambaMixer2``
(Mamba2) and ``layers.mamba1_mixer.QuambaMixer`` (Mamba1, whose four mixer linears in_proj,
x_proj, dt_proj, out_proj are W8A8, or 4-bit but for dt_proj: W8A8 in W4A8 layers, fp in W4A16
ones), one per layer at that layer's precision (``quamba.layer_precision`` for W4AX), which the
model classes of ``layers.models`` build when they see this config.
A quantized lm_head (``quamba.lm_head``) is one more linear of those schemes (vLLM's
``ParallelLMHead`` path); a quantized embedding (``quamba.embedding``) gets
``layers.linear_schemes.QuambaEmbeddingMethod``. The Mamba2 model class rebuilds both with this
config, as the stock model builds them without one.

The class lives at module level: vLLM pickles the config object into the engine and worker
processes.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
)
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
    CompressedTensorsScheme,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

from .format import (
    EMBEDDING_BITS,
    MAMBA1_QUANTIZED_LINEARS,
    MAMBA2_QUANTIZED_LINEARS,
    QUANT_METHOD,
    MambaShapes,
    Mamba2Shapes,
    QuambaFormatError,
    check_layer_count,
    check_spec,
    head_to_toe_tensors,
    layer_precision,
    mamba1_linear_precision,
    mamba1_mixer_tensors,
    mamba2_mixer_tensors,
    mixer_prefix,
    quamba_section,
)
from .layers.linear_schemes import QuambaEmbeddingMethod, QuambaW4Linear, QuambaW8A8Int8

# Recipes this runtime can serve. The format knows more (format.RECIPES); the others fail
# clearly at engine start instead of loading weights they cannot run.
SERVED_RECIPES = ("w8a8", "w4a8", "w4a16", "w4ax")
# Architectures this runtime serves (model classes in ``layers.models``).
SERVED_ARCHITECTURES = ("Mamba2ForCausalLM", "MambaForCausalLM")
# The mixer linears a w8a8 checkpoint quantizes, over both architectures.
_MIXER_LINEARS = frozenset(MAMBA2_QUANTIZED_LINEARS) | frozenset(MAMBA1_QUANTIZED_LINEARS)


def is_quamba_checkpoint_config(hf_quant_cfg: dict[str, Any] | None) -> bool:
    return (
        isinstance(hf_quant_cfg, dict)
        and str(hf_quant_cfg.get("quant_method", "")).lower() == QUANT_METHOD
    )


class QuambaConfig(CompressedTensorsConfig):
    """compressed-tensors linears + the quamba SSM section of a quamba checkpoint."""

    def __init__(
        self,
        target_scheme_map: dict[str, Any] | None = None,
        ignore: list[str] | None = None,
        quant_format: str | None = None,
        **kwargs: Any,
    ):
        if target_scheme_map is None:
            # vLLM builds a config with no arguments only when quantization="quamba" was asked
            # for and the model's config.json carries no quantization_config at all
            # (weight_utils.get_quant_config).
            raise QuambaFormatError(
                "quantization='quamba' was requested, but the model's config.json has no "
                "quantization_config: it is not a quamba checkpoint. Make one with "
                "`vllm-quamba quantize MODEL --recipe w8a8 --out DIR` and serve DIR."
            )
        super().__init__(target_scheme_map, ignore or [], quant_format, **kwargs)
        self.quamba: dict[str, Any] = {}

    # ----- QuantizationConfig interface -------------------------------------------------
    def get_name(self) -> str:
        return QUANT_METHOD

    @classmethod
    def get_min_capability(cls) -> int:
        # The SSM path has torch (CPU) code; the linears' own schemes check their capability.
        return -1

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuambaConfig":
        section = quamba_section(config)  # raises QuambaFormatError naming the bad field
        if section["recipe"] not in SERVED_RECIPES:
            raise QuambaFormatError(
                f"quantization_config.quamba.recipe is {section['recipe']!r}; this version of "
                f"the vllm-quamba runtime serves only {SERVED_RECIPES}"
            )
        # CompressedTensorsConfig.from_config edits config["config_groups"] in place.
        instance = super().from_config(dict(config))
        assert isinstance(instance, cls)
        instance.quamba = dict(section)
        return instance

    @classmethod
    def override_quantization_method(
        cls,
        hf_quant_cfg: dict[str, Any],
        user_quant: str | None,
        hf_config: Any = None,
    ) -> str | None:
        if is_quamba_checkpoint_config(hf_quant_cfg):
            return QUANT_METHOD
        if user_quant == QUANT_METHOD:
            found = hf_quant_cfg.get("quant_method") if isinstance(hf_quant_cfg, dict) else None
            raise QuambaFormatError(
                "quantization='quamba' was requested, but this checkpoint is not a quamba "
                f"checkpoint: its quantization_config.quant_method is {found!r}, expected "
                f"{QUANT_METHOD!r}. Make one with `vllm-quamba quantize`."
            )
        return None

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        """Pre-flight check, in the process that builds the engine config.

        A malformed checkpoint would otherwise fail inside the worker process, where vLLM only
        logs the cause and the caller sees "Engine core initialization failed". Here the error
        (naming the tensor) reaches the caller of ``LLM(...)`` / ``vllm serve`` directly. Only
        names, shapes and dtypes are read (safetensors headers); the worker checks the values.
        """
        super().maybe_update_config(model_name, hf_config=hf_config, revision=revision)
        if hf_config is None:
            return
        architectures = list(getattr(hf_config, "architectures", None) or [])
        if not any(a in SERVED_ARCHITECTURES for a in architectures):
            raise QuambaFormatError(
                f"quamba checkpoint architectures {architectures}: this version of the "
                f"vllm-quamba runtime serves {' and '.join(SERVED_ARCHITECTURES)} only"
            )
        if os.path.isdir(model_name):
            check_checkpoint_headers(model_name, hf_config.to_dict())

    @property
    def recipe(self) -> str:
        return self.quamba.get("recipe", "")

    def get_quant_method(
        self, layer: torch.nn.Module, prefix: str
    ) -> QuantizeMethodBase | None:
        if isinstance(layer, VocabParallelEmbedding) and not isinstance(layer, ParallelLMHead):
            return self._embedding_method(layer, prefix)
        method = super().get_quant_method(layer, prefix)
        if isinstance(layer, LinearBase) and _is_mixer_linear(prefix):
            self._check_mixer_linear(layer, prefix)
        if isinstance(layer, ParallelLMHead) and self.quamba.get("lm_head"):
            found = _scheme_precision(getattr(layer, "scheme", None))
            if found != self.quamba["lm_head"]:
                raise QuambaFormatError(
                    f"quantization_config.config_groups give {prefix!r} precision {found!r}, but "
                    f"quamba.lm_head is {self.quamba['lm_head']!r}"
                )
        return method

    def _embedding_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """The CPU-capable per-row lookup for the embedding that ``quamba.embedding``
        quantizes; None (the stock fp lookup) otherwise."""
        if not self.quamba.get("embedding"):
            return None
        scheme = self.get_scheme_dict(layer, prefix) or {}
        weights = scheme.get("weights")
        bits = EMBEDDING_BITS[self.quamba["embedding"]]
        if not (
            isinstance(weights, QuantizationArgs)
            and weights.num_bits == bits
            and weights.strategy == QuantizationStrategy.CHANNEL
            and weights.symmetric
            and scheme.get("input_activations") is None
        ):
            raise QuambaFormatError(
                f"quamba.embedding is {self.quamba['embedding']!r}, but quantization_config.config_groups "
                f"quantize {prefix!r} as weights={weights}: expected weight-only symmetric {bits}-bit "
                "channel-wise (pack-quantized)"
            )
        return QuambaEmbeddingMethod(weights)

    def layer_precision(self, prefix: str) -> str:
        """The precision of the decoder layer that ``prefix`` (``backbone.layers.{i}....``) is in."""
        return layer_precision(self.quamba, _layer_index(prefix))

    def _get_scheme_from_parts(
        self,
        weight_quant: QuantizationArgs,
        input_quant: QuantizationArgs | None,
        output_quant: QuantizationArgs | None = None,
        format: str | None = None,
        layer_name: str | None = None,
    ) -> CompressedTensorsScheme:
        """Only the schemes a quamba checkpoint uses, each running the package's kernels."""
        format = format or self.quant_format
        static_int8 = _is_static_int8_tensor(input_quant)
        if (
            weight_quant.num_bits == 8
            and weight_quant.strategy == QuantizationStrategy.CHANNEL
            and weight_quant.symmetric
            and static_int8
        ):
            return QuambaW8A8Int8(weight_quant.strategy, True, True)
        if (
            weight_quant.num_bits == 4
            and weight_quant.strategy == QuantizationStrategy.GROUP
            and weight_quant.symmetric
            and format == "pack-quantized"
            and (input_quant is None or static_int8)
        ):
            return QuambaW4Linear(weight_quant.group_size, static_int8_input=static_int8)
        raise QuambaFormatError(
            f"quantization_config.config_groups quantize {layer_name!r} as weights={weight_quant}, "
            f"inputs={input_quant}, format={format!r}; quamba checkpoints use channel-wise int8 "
            "weights with a static per-tensor int8 input (W8A8), or pack-quantized symmetric "
            "4-bit group-wise weights, weight-only (W4A16) or with a static int8 input (W4A8)"
        )

    def _check_mixer_linear(self, layer: torch.nn.Module, prefix: str) -> None:
        """Every mixer linear is quantized at the precision the format gives it (its layer's,
        except Mamba1's dt_proj in 4-bit layers: ``format.mamba1_linear_precision``): anything
        else would load quantized weights into the wrong parameters (or leave them fp), so fail
        at engine start and name the layer."""
        precision = self.layer_precision(prefix)
        expected = self.linear_precision(prefix)
        found = _scheme_precision(getattr(layer, "scheme", None))
        if found != expected:
            raise QuambaFormatError(
                f"quantization_config.config_groups give {prefix!r} precision {found!r}, but "
                f"the format expects {expected!r} in its {precision!r} layer (quamba.recipe "
                f"{self.recipe!r})"
            )

    def linear_precision(self, prefix: str) -> str | None:
        """The precision of the mixer linear at ``prefix``; None: unquantized."""
        precision = self.layer_precision(prefix)
        if self.quamba.get("architecture") == "mamba":
            return mamba1_linear_precision(precision, prefix.split(".")[-1])
        return precision


def _layer_index(prefix: str) -> int:
    parts = prefix.split(".")
    return int(parts[parts.index("layers") + 1])


def _is_static_int8_tensor(args: QuantizationArgs | None) -> bool:
    return (
        args is not None
        and args.num_bits == 8
        and not args.dynamic
        and args.symmetric
        and args.strategy == QuantizationStrategy.TENSOR
    )


def _scheme_precision(scheme: object) -> str | None:
    if isinstance(scheme, QuambaW8A8Int8):
        return "w8a8"
    if isinstance(scheme, QuambaW4Linear):
        return "w4a8" if scheme.static_int8_input else "w4a16"
    return None


def _is_mixer_linear(prefix: str) -> bool:
    parts = prefix.split(".")
    return len(parts) >= 2 and parts[-2] == "mixer" and parts[-1] in _MIXER_LINEARS


# safetensors header dtype names of the torch dtypes a checkpoint may hold.
_SAFETENSORS_DTYPES = {
    "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "F32": torch.float32,
    "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
}


def check_checkpoint_headers(model_dir: str, hf_config: dict[str, Any]) -> None:
    """Every mixer tensor of the format (at its layer's precision) is in the checkpoint with
    its shape and dtype, and no unknown tensor sits under a mixer. Raises QuambaFormatError
    naming the tensor."""
    from safetensors import safe_open

    headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    headers[name] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype()))
        except Exception as exc:  # safetensors raises its own error types, naming no file
            raise QuambaFormatError(
                f"{path}: unreadable safetensors file ({exc}); the checkpoint is truncated or "
                "corrupt: copy or convert it again"
            ) from exc
    if not headers:
        return  # not a local safetensors checkpoint: the worker's checks still apply
    section = quamba_section(hf_config["quantization_config"])
    mamba1 = "MambaForCausalLM" in (hf_config.get("architectures") or [])
    shapes = (MambaShapes if mamba1 else Mamba2Shapes).from_config(hf_config)
    check_layer_count(section, shapes.num_layers)
    for layer in range(shapes.num_layers):
        prefix = mixer_prefix(layer)
        precision = layer_precision(section, layer)
        table = (mamba1_mixer_tensors if mamba1 else mamba2_mixer_tensors)(shapes, precision)
        for rel, (shape, dtype) in table.items():
            name = prefix + rel
            if name not in headers:
                raise QuambaFormatError(f"quamba checkpoint is missing tensor(s) {name!r}")
            check_spec(name, *headers[name], shape, dtype)
        unknown = sorted(
            n for n in headers if n.startswith(prefix) and n[len(prefix):] not in table
        )
        if unknown:
            raise QuambaFormatError(
                f"quamba checkpoint has unknown mixer tensor(s) {unknown[:8]}: it was written by "
                "another version of vllm-quamba; convert it again with this version"
            )
    for name, (shape, dtype) in head_to_toe_tensors(section, hf_config["vocab_size"], shapes.hidden_size).items():
        if name not in headers:
            raise QuambaFormatError(f"quamba checkpoint is missing tensor(s) {name!r}")
        check_spec(name, *headers[name], shape, dtype)
