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
    "MambaForCausalLM": "vllm_quamba.layers.models:QuambaMambaForCausalLM",
}

_registered = False


def register() -> None:
    """Register the ``quamba`` quantization method, the quamba-aware model classes and, on the
    CPU platform, the Mamba1 scan ops vLLM-CPU lacks.

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

    # Unquantized Mamba1 on vLLM-CPU: supply the selective-scan op the CPU build lacks and a
    # decode step for Mamba1's 3D states (no-ops off the CPU platform; see layers/mamba1_ops).
    from .layers.mamba1_ops import register_mamba1_cpu_ops

    register_mamba1_cpu_ops()

    _registered = True
