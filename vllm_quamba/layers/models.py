"""Model classes registered by the plugin under vLLM's own architecture names.

``QuambaMamba2ForCausalLM`` replaces vLLM's ``Mamba2ForCausalLM`` in the model registry. With a
quamba checkpoint (``vllm_config.quant_config`` is a ``QuambaConfig``) every decoder layer gets a
``QuambaMixer2``; for any other checkpoint the class does nothing but call the stock
constructor, so an unquantized model runs exactly the stock code.

How the quamba mixer gets into the stock decoder layers without copying them:
``Mamba2DecoderLayer.__init__`` instantiates ``MambaMixer2`` by name, and ``MambaMixer2`` is a
vLLM ``PluggableLayer``, whose ``__new__`` consults ``op_registry_oot`` (the out-of-tree
replacement table, keyed by class name). We put ``QuambaMixer2`` there only while this model's
stock constructor runs, and restore the table afterwards. A process-wide
``PluggableLayer.register_oot`` would also swap the mixers of unquantized Mamba2 models and of
every other model built on ``MambaMixer2`` (NemotronH, Zamba2, FalconH1, ...), which the plugin
must not change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from vllm.config import VllmConfig
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.mamba.mamba_mixer import MambaMixer
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.models.mamba import MambaForCausalLM
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.mamba2 import Mamba2ForCausalLM
from vllm.model_executor.models.utils import maybe_prefix
from vllm.platforms import current_platform

from ..config import QuambaConfig
from ..format import (
    EMBEDDING,
    LM_HEAD,
    QUANT_METHOD,
    QuambaFormatError,
    check_tensor,
    head_to_toe_tensors,
    quamba_section,
)
from ..kernels.mamba2_ssm import FP_SSM_STATE_DTYPE
from .checkpoint_tensors import QUAMBA_STATE_DTYPES
from .mamba1_mixer import QuambaMixer
from .mamba2_mixer import QuambaMixer2


def quamba_recipe(vllm_config: VllmConfig) -> str | None:
    """The recipe of the quamba checkpoint vLLM serves, or None for any other model."""
    quant_config = getattr(vllm_config, "quant_config", None)
    if isinstance(quant_config, QuambaConfig):
        return quant_config.recipe
    model_config = getattr(vllm_config, "model_config", None)
    if getattr(model_config, "quantization", None) != QUANT_METHOD:
        return None
    hf_quant = getattr(model_config.hf_config, "quantization_config", None) or {}
    return quamba_section(hf_quant)["recipe"]


def has_int8_states(vllm_config: VllmConfig) -> bool:
    """Whether every layer keeps int8 states (W8A8, W4A8); W4A16 layers keep fp states (Mamba2:
    the SSM state in fp16), and a W4AX model has both (each mixer reports its own: ``get_state_dtype``)."""
    return quamba_recipe(vllm_config) in ("w8a8", "w4a8")


@contextlib.contextmanager
def _pluggable_layer_replaced(stock: type, replacement: type) -> Iterator[None]:
    key = stock.__name__
    missing = object()
    previous = op_registry_oot.get(key, missing)
    op_registry_oot[key] = replacement
    try:
        yield
    finally:
        if previous is missing:
            op_registry_oot.pop(key, None)
        else:
            op_registry_oot[key] = previous


class _QuambaModelMixin:
    """What both model classes add for quamba checkpoints: quamba mixers built in place of the
    stock ones, int8 states, and the checkpoint's mixer tensors checked at load.

    vLLM's linear loaders would fail on a wrong in_proj/out_proj shape with an assertion that
    names no tensor, and vLLM checks completeness only for unquantized models
    (DefaultModelLoader.load_weights): a quamba tensor left at its initial value would give
    silently wrong outputs.
    """

    quamba_mixers: list
    # The SSM state dtype of W4A16 layers, where it is not the stock one (Mamba2: fp16).
    w4a16_ssm_state_dtype: torch.dtype | None = None

    @classmethod
    def get_mamba_state_dtype_from_config(
        cls, vllm_config: VllmConfig
    ) -> tuple[torch.dtype, torch.dtype]:
        if has_int8_states(vllm_config):
            return QUAMBA_STATE_DTYPES
        stock = super().get_mamba_state_dtype_from_config(vllm_config)
        if cls.w4a16_ssm_state_dtype is not None and quamba_recipe(vllm_config) == "w4a16":
            return stock[0], cls.w4a16_ssm_state_dtype
        return stock

    def _init_with_quamba_mixers(self, vllm_config: VllmConfig, prefix: str, stock: type, replacement: type):
        with _pluggable_layer_replaced(stock, replacement):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.quamba_mixers = [m for m in self.modules() if isinstance(m, replacement)]
        num_layers = len(self.backbone.layers)
        if len(self.quamba_mixers) != num_layers:
            raise RuntimeError(
                f"built {len(self.quamba_mixers)} quamba mixers for {num_layers} layers: another "
                f"plugin replaces {stock.__name__}"
            )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if not self.checkpoint_specs:
            return super().load_weights(weights)
        loaded = super().load_weights(_checked_stream(weights, self.checkpoint_specs))
        _check_complete(self, loaded, self.quamba_mixers)
        return loaded

    def _quamba_mixer_specs(self) -> dict:
        return {
            mixer.checkpoint_name(rel): spec
            for mixer in self.quamba_mixers
            for rel, spec in mixer.format_tensors().items()
        }


class QuambaMamba2ForCausalLM(_QuambaModelMixin, Mamba2ForCausalLM):
    """Mamba2ForCausalLM that serves quamba W8A8 checkpoints too."""

    w4a16_ssm_state_dtype = FP_SSM_STATE_DTYPE

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        self.checkpoint_specs = {}
        if quamba_recipe(vllm_config) is None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.quamba_mixers = []
            return
        # Every layer gets a QuambaMixer2, which runs its layer's precision (W4A16: the stock
        # fp SSM), so one model may mix them (W4AX).
        self._init_with_quamba_mixers(vllm_config, prefix, MambaMixer2, QuambaMixer2)
        self.checkpoint_specs = self._quamba_mixer_specs()
        self._init_head_to_toe(vllm_config, prefix)

    def _init_head_to_toe(self, vllm_config: VllmConfig, prefix: str) -> None:
        """Rebuild the embedding / lm_head with the quant config when the checkpoint quantizes
        them (``--quantize-embedding`` / ``--quantize-lm-head``): the stock constructors build
        both without one. QuambaConfig.get_quant_method then gives them the quamba methods."""
        quant_config = vllm_config.quant_config
        section = quant_config.quamba
        hf_config = vllm_config.model_config.hf_config
        vocab, hidden = hf_config.vocab_size, hf_config.hidden_size
        if section.get("embedding"):
            self.backbone.embeddings = VocabParallelEmbedding(
                vocab, hidden, quant_config=quant_config, prefix=maybe_prefix(prefix, EMBEDDING)
            )
        if section.get("lm_head"):
            self.lm_head = ParallelLMHead(vocab, hidden, quant_config=quant_config, prefix=maybe_prefix(prefix, LM_HEAD))
        self.checkpoint_specs.update(head_to_toe_tensors(section, vocab, hidden))


# ----- Mamba1 ---------------------------------------------------------------------------------------
def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


class QuambaMambaForCausalLM(_QuambaModelMixin, MambaForCausalLM):
    """vLLM's ``MambaForCausalLM``, made to run on the CPU platform, and serving quamba
    Mamba1 checkpoints (W8A8, W4A8, W4A16, W4AX).

    Unquantized: the scan kernels vLLM-CPU lacks are supplied as ops by
    ``vllm_quamba.layers.mamba1_ops`` (registered in :func:`vllm_quamba.register`). One more
    thing breaks in the stock mixer on the CPU: ``MambaMixer.forward_impl`` feeds ``out_proj``
    a transposed ``(tokens, dim)`` view of the channel-first scan output (unit stride over
    tokens) whenever the batch holds a prefill, and the CPU linear (oneDNN ``onednn_mm``)
    requires ``stride(-1) == 1``. A forward pre-hook on each mixer's ``out_proj`` makes that
    input contiguous; nothing else changes (off the CPU platform the class is the stock one).

    Quamba checkpoint (``vllm_config.quant_config`` is a ``QuambaConfig``): every decoder layer
    gets a ``QuambaMixer`` (``layers.mamba1_mixer``) at its layer's precision, swapped in like
    ``QuambaMixer2`` above (``_pluggable_layer_replaced`` only while the stock constructor
    runs): W8A8 and W4A8 layers with int8 states, W4A16 layers with the stock fp SSM and fp32
    states (W4AX: both); and the same streaming shape/dtype checks and completeness check at
    load.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        self.checkpoint_specs = {}
        if quamba_recipe(vllm_config) is not None:
            self._init_with_quamba_mixers(vllm_config, prefix, MambaMixer, QuambaMixer)
            self.checkpoint_specs = self._quamba_mixer_specs()
            return
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.quamba_mixers = []
        if current_platform.is_cpu():
            for module in self.modules():
                if isinstance(module, MambaMixer):
                    module.out_proj.register_forward_pre_hook(_contiguous_input)


def _checked_stream(
    weights: Iterable[tuple[str, torch.Tensor]], specs: dict
) -> Iterator[tuple[str, torch.Tensor]]:
    """Check each known mixer tensor's shape/dtype under its checkpoint name, as it streams."""
    for name, tensor in weights:
        spec = specs.get(name)
        if spec is not None:
            check_tensor(name, tensor, *spec)
        yield name, tensor


def _check_complete(model: torch.nn.Module, loaded: set[str], mixers) -> None:
    """Every parameter must come from the checkpoint (vLLM checks this only for unquantized
    models); the error names the missing checkpoint tensors."""
    to_checkpoint_name = {}
    for mixer in mixers:
        to_checkpoint_name.update(mixer.expected_vllm_names())
    missing = sorted(
        to_checkpoint_name.get(name, name) for name, _ in model.named_parameters() if name not in loaded
    )
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8])
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise QuambaFormatError(f"quamba checkpoint is missing tensor(s) {shown}{more}")
