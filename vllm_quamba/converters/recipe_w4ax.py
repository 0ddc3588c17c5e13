"""W4AX: which decoder layers of a Mamba2 or Mamba1 model run W4A8 and which W4A16.

Both precisions share the 4-bit weights; W4A8 layers add 8-bit activations and the int8 SSM
path with int8 states (4x smaller state, int8 compute), W4A16 layers keep the fp SSM. The
choice is given per layer (``--layer-precision FILE``: a JSON list with one of "w4a8"/"w4a16"
per layer) or measured (``--auto-precision F``): the fraction F of layers whose 8-bit
activations cost the most stays W4A16. A layer's cost is the increase of the calibration loss
(mean next-token NLL of the simulated model on the first ``SENSITIVITY_SAMPLES`` calibration
samples) when that layer alone goes from W4A16 to W4A8, every other layer W4A16. Quamba2 fixes
its W4AX split by hand (42 W4A8 + 14 W4A16 layers for Mamba2-8B, quamba.md section 2.5); the
measured choice is ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..format import W4_PRECISIONS
from .simulate import QuantizedMamba2Reference, QuantizedMambaReference

SENSITIVITY_SAMPLES = 8
# The simulator of each architecture (``quamba.architecture``) that measures the sensitivities.
SIMULATORS = {"mamba2": QuantizedMamba2Reference, "mamba": QuantizedMambaReference}


def read_layer_precision(path: str | Path) -> list[str]:
    """A ``--layer-precision`` file: a JSON list with one precision per decoder layer."""
    try:
        chosen = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the layer precision file {path}: {exc}") from exc
    if not isinstance(chosen, list):
        raise ValueError(f"the layer precision file {path} must hold a JSON list, one entry per layer")
    return chosen


def check_choice(
    layer_precision: list[str] | None, auto_precision: float | None, num_layers: int, error: type
) -> None:
    """Exactly one way of choosing, and a valid one; raises ``error`` before any work."""
    if (layer_precision is None) == (auto_precision is None):
        raise error("recipe 'w4ax' needs exactly one of --layer-precision FILE and --auto-precision F")
    if layer_precision is not None:
        if len(layer_precision) != num_layers:
            raise error(f"--layer-precision lists {len(layer_precision)} layers; the model has {num_layers}")
        bad = sorted({p for p in layer_precision if p not in W4_PRECISIONS})
        if bad:
            raise error(f"--layer-precision entries must be one of {W4_PRECISIONS}, got {bad}")
    elif not 0 <= auto_precision <= 1:
        raise error(f"--auto-precision is the fraction of layers kept at W4A16, in [0, 1]; got {auto_precision}")


def chosen_tensors(
    recipe: str,
    layer_precision: list[str] | None,
    auto_precision: float | None,
    options: dict[str, list[dict[str, torch.Tensor]]],
    base_tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    samples: list[torch.Tensor],
    quantization_config: Callable[[list[str]], dict[str, Any]],
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any] | None]:
    """(every checkpoint tensor, per-layer precisions, the measured sensitivities or None).

    ``options[precision][layer]`` are a layer's checkpoint tensors at each precision,
    ``base_tensors`` everything outside the mixers, ``quantization_config(precisions)`` the
    checkpoint's quantization_config for a choice. Recipe w4ax takes the given
    ``layer_precision`` or measures (``auto_precision``); any other recipe gives every layer
    its own precision.
    """
    num_layers = len(next(iter(options.values())))
    sensitivity = None
    if recipe != "w4ax":
        precisions = [recipe] * num_layers
    elif layer_precision is not None:
        precisions = list(layer_precision)
    else:
        precisions, sensitivity = _measured_choice(
            auto_precision, options, base_tensors, config, samples[:SENSITIVITY_SAMPLES], quantization_config
        )
    return _assemble(options, base_tensors, precisions), precisions, sensitivity


def _assemble(options, base_tensors: dict[str, torch.Tensor], precisions: list[str]) -> dict[str, torch.Tensor]:
    tensors = dict(base_tensors)
    for layer, precision in enumerate(precisions):
        tensors.update(options[precision][layer])
    return tensors


def _measured_choice(auto_precision: float, options, base_tensors, config, samples, quantization_config):
    """(precisions, measurements): the fraction ``auto_precision`` of layers whose calibration
    loss rises most when that layer alone goes W4A8 (every other layer W4A16) stays W4A16."""
    num_layers = len(options["w4a16"])

    def loss(chosen: list[str]) -> float:
        quant_config = quantization_config(chosen)
        simulator = SIMULATORS[quant_config["quamba"]["architecture"]]
        model = simulator({**config, "quantization_config": quant_config}, _assemble(options, base_tensors, chosen))
        return sum(F.cross_entropy(model.logits(ids)[:-1], ids[1:]).item() for ids in samples) / len(samples)

    all_w4a16 = ["w4a16"] * num_layers
    base = loss(all_w4a16)
    increase = [
        loss(all_w4a16[:layer] + ["w4a8"] + all_w4a16[layer + 1:]) - base
        for layer in tqdm(range(num_layers), desc="W4AX sensitivity", unit="layer")
    ]
    keep = round(auto_precision * num_layers)
    most_sensitive = sorted(range(num_layers), key=lambda layer: (-increase[layer], layer))[:keep]
    precisions = ["w4a16" if layer in most_sensitive else "w4a8" for layer in range(num_layers)]
    measured = {
        "fraction_w4a16": auto_precision,
        "calibration_loss_all_w4a16": base,
        "loss_increase_at_w4a8": increase,
        "samples": len(samples),
    }
    return precisions, measured


def layers_pattern(precisions: list[str], precision: str) -> str:
    """The start of a ``re:`` compressed-tensors target that matches the decoder layers at
    ``precision``: any layer when all are at it, else the listed ones (W4AX)."""
    layers = [str(i) for i, p in enumerate(precisions) if p == precision]
    return r".*" if len(layers) == len(precisions) else rf"backbone\.layers\.({'|'.join(layers)})\."
