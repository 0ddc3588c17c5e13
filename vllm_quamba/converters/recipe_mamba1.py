"""The Quamba W8A8 and Quamba2 W4A8/W4A16 recipes for Mamba1 (``MambaForCausalLM``), source
tensors -> quamba tensors.

Order (quamba.md sections 0, 1 "at HEAD", 2.4, 2.5 and 9): fold the RMSNorm weights; rotate the
residual stream and fuse the out_proj Hadamard (out_proj's input is rotated online at runtime);
calibrate every activation scale on that fp model; quantize the weights. Activation scales
are static per-tensor absmax/127, except the SSM input u (x_proj's input) and the final SSM
state, which use the percentile observer (``calibration.MambaActivationStats``).

The two switches give the naive baselines of the Quamba papers: ``hadamard=False`` keeps the
residual stream and out_proj's input unrotated (norms are still folded: that is exact and
changes nothing but where gamma lives), ``percentile_alpha=None`` uses absmax for u and the
state too. ``quantize.quantize`` checks the request and writes the checkpoint; this module
holds what is Mamba1-specific.

The 4-bit recipes (quamba.md section 2.5) start from the same rotated fp model. W4A8 is the
W8A8 mixer with in_proj and out_proj 4-bit by GPTQ (Hessians from the fp model with the online
Hadamard) and x_proj 4-bit by round-to-nearest; dt_proj stays W8A8 (K = dt_rank is too short for
the 4-bit kernel). W4A16 keeps the fp SSM (conv1d, A_log, D, dt_proj and its bias) and has the
same three linears 4-bit, weight-only. ``gptq=False`` rounds in_proj/out_proj to nearest too.
W4AX gives each layer one of the two: ``layer_options`` builds every layer at both, sharing the
4-bit weights and scales, and ``recipe_w4ax`` chooses.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from ..format import (
    W4_PRECISIONS,
    MambaShapes,
    mamba1_linear_precision,
    mamba1_mixer_tensors,
    mixer_prefix,
)
from ..kernels.hadamard import is_supported_hadamard_size
from ..kernels.quant import quantize_per_channel_int8, quantize_per_tensor_int8
from . import recipe_w4, recipe_w4ax, transforms
from .calibration import MambaActivationStats
from .simulate import MambaReference

TARGETS = r"re:.*mixer\.(in|x|dt|out)_proj$"
# The 4-bit linears: GPTQ's (the others' inputs are observed at these points) and RTN's.
GPTQ_INPUT_POINTS = {"in_proj_input": "in_proj", "out_proj_input": "out_proj"}
RTN_LINEARS = ("x_proj",)
FOUR_BIT_LINEARS = (*GPTQ_INPUT_POINTS.values(), *RTN_LINEARS)


def check_shapes(config: dict[str, Any], hadamard: bool, error: type[Exception]) -> MambaShapes:
    """The model's sizes, or ``error`` for a Mamba1 model the recipe cannot take."""
    shapes = MambaShapes.from_config(config)
    if hadamard:
        for what, size in (("hidden_size", shapes.hidden_size), ("intermediate_size", shapes.intermediate_size)):
            if not is_supported_hadamard_size(size):
                raise error(
                    f"{what} {size} is not a size the Hadamard transform supports "
                    "(2^k, 12*2^k, 20*2^k, 28*2^k or 40*2^k); --no-hadamard quantizes without it"
                )
    if config.get("use_bias"):
        raise error("Mamba1 models with in_proj/out_proj biases are not supported")
    return shapes


def transformed_tensors(tensors: dict[str, torch.Tensor], hadamard: bool) -> dict[str, torch.Tensor]:
    """The compute-invariant rewrites the recipe applies before calibration."""
    tensors = transforms.fold_norms(tensors)
    if hadamard:
        tensors = transforms.fuse_out_proj_hadamard(transforms.rotate_residual(tensors))
    return tensors


def calibrate(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    samples: list[torch.Tensor],
    hadamard: bool,
    percentile_alpha: float | None,
) -> MambaActivationStats:
    stats = MambaActivationStats(percentile_alpha)
    reference = MambaReference(config, tensors, online_hadamard=hadamard, observer=stats)
    for ids in tqdm(samples, desc="calibration (scales)", unit="sample"):
        reference.logits(ids)
    return stats


def quantize_mixer(
    tensors: dict[str, torch.Tensor], layer: int, shapes: MambaShapes, stats: MambaActivationStats
) -> dict[str, torch.Tensor]:
    """One W8A8 mixer's quamba tensors (format.mamba1_mixer_tensors), full names."""
    prefix = mixer_prefix(layer)
    t = lambda name: tensors[prefix + name]  # noqa: E731
    scale = lambda point: stats.scale(layer, point)  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    x_proj_out = scale("x_proj_output")
    input_scales = {
        "in_proj": scale("in_proj_input"),
        "x_proj": scale("u"),
        "dt_proj": x_proj_out,  # dt_low arrives quantized with the x_proj output scale
        "out_proj": scale("out_proj_input"),
    }
    for linear, input_scale in input_scales.items():
        out[f"{linear}.weight"], out[f"{linear}.weight_scale"] = quantize_per_channel_int8(t(f"{linear}.weight"))
        out[f"{linear}.input_scale"] = input_scale.clone()
    out["x_scale"], out["z_scale"] = scale("x"), scale("z")
    out["x_proj.output_scale"], out["dt_scale"] = x_proj_out.clone(), scale("dt")
    out["conv1d.weight"], out["conv1d.weight_scale"] = quantize_per_tensor_int8(t("conv1d.weight"))
    conv_bias = tensors.get(prefix + "conv1d.bias", torch.zeros(shapes.intermediate_size))
    out["conv1d.bias"], out["conv1d.bias_scale"] = quantize_per_tensor_int8(conv_bias)
    out["A_log"], out["A_log_scale"] = quantize_per_tensor_int8(t("A_log"))
    out["D"], out["D_scale"] = quantize_per_tensor_int8(t("D"))
    dt_bias = tensors.get(prefix + "dt_proj.bias", torch.zeros(shapes.intermediate_size))
    out["dt_bias"], out["dt_bias_scale"] = quantize_per_tensor_int8(dt_bias)
    out["ssm_state_scale"] = scale("ssm_state")
    return {prefix + name: value.contiguous() for name, value in out.items()}


def layer_options(
    config: dict[str, Any],
    source_tensors: dict[str, torch.Tensor],
    shapes: MambaShapes,
    samples: list[torch.Tensor],
    hadamard: bool,
    percentile_alpha: float | None,
    candidates: tuple[str, ...],
    gptq: bool = True,
    hessian_budget_bytes: int = recipe_w4.DEFAULT_HESSIAN_BUDGET_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, list[dict[str, torch.Tensor]]]]:
    """Source tensors (transformers names, fp32) -> (the checkpoint's tensors outside the mixers,
    ``options[precision][layer]``: each mixer's tensors at every candidate precision).

    W4AX's two candidates share the 4-bit weights (GPTQ does not depend on the activation
    precision) and the activation scales (calibrated once, used by the W4A8 layers only).
    """
    tensors = transformed_tensors(source_tensors, hadamard)
    base = {name: t.contiguous() for name, t in tensors.items() if ".mixer." not in name}
    stats = None
    if any(p != "w4a16" for p in candidates):  # the scales serve the int8 SSM path only
        stats = calibrate(config, tensors, samples, hadamard, percentile_alpha)
    w4 = {}
    if any(p in W4_PRECISIONS for p in candidates):
        w4 = w4_linears(config, tensors, shapes, samples, hadamard, gptq, hessian_budget_bytes)
    options = {
        precision: [_layer_tensors(tensors, layer, shapes, precision, stats, w4) for layer in range(shapes.num_layers)]
        for precision in candidates
    }
    return base, options


def _layer_tensors(tensors, layer: int, shapes: MambaShapes, precision: str, stats, w4) -> dict[str, torch.Tensor]:
    """One mixer's checkpoint tensors at ``precision`` (format.mamba1_mixer_tensors)."""
    out = _fp_ssm(tensors, layer, shapes) if precision == "w4a16" else quantize_mixer(tensors, layer, shapes, stats)
    if precision in W4_PRECISIONS:
        for linear in FOUR_BIT_LINEARS:  # W4A8 keeps the int8 linear's input_scale
            recipe_w4.replace_linear(out, mixer_prefix(layer) + linear + ".", w4[(layer, linear)])
    return out


def w4_linears(config, tensors, shapes: MambaShapes, samples, hadamard: bool, gptq: bool, hessian_budget_bytes: int):
    """(layer, linear) -> pack-quantized tensors of in_proj, x_proj and out_proj: x_proj by
    round-to-nearest (Quamba2's choice), the other two by GPTQ unless ``gptq`` is False."""
    def weights(linears):
        return {
            (layer, linear): tensors[mixer_prefix(layer) + linear + ".weight"]
            for layer in range(shapes.num_layers)
            for linear in linears
        }

    rtn = {key: recipe_w4.rtn_w4(w) for key, w in weights(RTN_LINEARS).items()}
    gptq_weights = weights(GPTQ_INPUT_POINTS.values())
    if not gptq:
        return {**rtn, **{key: recipe_w4.rtn_w4(w) for key, w in gptq_weights.items()}}
    packed = recipe_w4.gptq_linears(
        gptq_weights,
        GPTQ_INPUT_POINTS,
        lambda observer: MambaReference(config, tensors, online_hadamard=hadamard, observer=observer),
        samples,
        hessian_budget_bytes,
    )
    return {**rtn, **packed}


def _fp_ssm(tensors, layer: int, shapes: MambaShapes) -> dict[str, torch.Tensor]:
    """A W4A16 mixer's fp tensors (all of format.mamba1_mixer_tensors(..., "w4a16") but the
    4-bit linears', which ``w4_linears`` supplies)."""
    prefix = mixer_prefix(layer)
    names = [n for n in mamba1_mixer_tensors(shapes, "w4a16") if n.split(".")[0] not in FOUR_BIT_LINEARS]
    return {prefix + n: tensors[prefix + n].float().contiguous() for n in names}


def linear_targets(precisions: list[str], shapes: MambaShapes) -> dict[str, tuple[str, int]]:
    """``quantize.linears_config``'s input: target -> (precision, input features) of every
    quantized mixer linear, given each layer's precision (a W4A16 layer's dt_proj is fp: no
    target)."""
    if set(precisions) == {"w8a8"}:
        return {TARGETS: ("w8a8", shapes.hidden_size)}
    in_features = {
        "in_proj": shapes.hidden_size, "x_proj": shapes.intermediate_size,
        "dt_proj": shapes.time_step_rank, "out_proj": shapes.intermediate_size,
    }  # fmt: skip
    targets = {}
    for layer_precision in sorted(set(precisions)):
        where = recipe_w4ax.layers_pattern(precisions, layer_precision)
        for linear, cols in in_features.items():
            precision = mamba1_linear_precision(layer_precision, linear)
            if precision is not None:
                targets[rf"re:{where}mixer\.{linear}$"] = (precision, cols)
    return targets


def quamba_section(
    recipe: str, precisions: list[str], shapes: MambaShapes, hadamard: bool, percentile_alpha: float | None
) -> dict[str, Any]:
    """The Mamba1 entries of ``quantization_config.quamba`` (besides method version, calibration)."""
    int8_ssm = any(p != "w4a16" for p in precisions)  # W4A16 layers keep the fp SSM and fp states
    return {
        "recipe": recipe,
        "architecture": "mamba",
        "hadamard": (
            {"residual": shapes.hidden_size, "out_proj_input": shapes.intermediate_size} if hadamard else None
        ),
        "percentile_alpha": percentile_alpha if int8_ssm else None,
        "percentile_points": ["x_proj_input", "ssm_state"] if int8_ssm and percentile_alpha is not None else [],
        "layer_precision": precisions if recipe == "w4ax" else None,
        "ssm_state_dtype": "int8" if int8_ssm else None,
        "conv_state_dtype": "int8" if int8_ssm else None,
        "weight_scales": "per-channel" if recipe == "w8a8" else "per-group",
    }
