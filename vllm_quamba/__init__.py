"""vllm-quamba: serve Quamba/Quamba2-quantized Mamba models in vLLM.

Importing this package must not import vLLM: the converter (``vllm_quamba.converters``) runs on
machines without a serving engine. vLLM is imported only inside :func:`register`, which vLLM
itself calls through the ``vllm.general_plugins`` entry point in every process it starts.
"""

from __future__ import annotations

__all__ = ["register"]

# Lazy "module:Class" strings: vLLM inspects model classes in a subprocess, and the worker
# processes (spawned on CPU) import them only when a model is built.
_MODEL_CLASSES = {
    "Mamba2ForCausalLM": "vllm_quamba.layers.models:QuambaMamba2ForCausalLM",
}

_registered = False


def register() -> None:
    """Register the ``quamba`` quantization method and the quamba-aware model classes.

    Idempotent: vLLM may call it several times in one process (and once in each process).
    """
    global _registered
    if _registered:
        return

    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.models import ModelRegistry

    from .config import QuambaConfig
    from .format import QUANT_METHOD

    # Both calls overwrite an existing entry of the same name, so repeating them is harmless.
    register_quantization_config(QUANT_METHOD)(QuambaConfig)

    for arch, target in _MODEL_CLASSES.items():
        ModelRegistry.register_model(arch, target)

    _registered = True
