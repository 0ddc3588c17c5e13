"""``quantize()``: a source checkpoint -> a quamba checkpoint, for every implemented recipe.

Mamba1 (Quamba W8A8, with its naive-baseline switches) lives in ``recipe_mamba1``; the
Quamba2 W8A8 recipe for Mamba2 is here. Mamba2 order (quamba.md sections 0, 2 and 9): fold the
RMSNorm weights, rotate the residual stream, gather the sort statistic, sort-and-cluster and
permute, fuse the out_proj Hadamard, calibrate every activation scale on the permuted fp model,
quantize the weights, write. Everything is checked before any work starts, and the output
directory appears only when complete (written beside it under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file
from tqdm import tqdm

from ..format import (
    DIM_GROUPS,
    HEAD_GROUPS,
    METHOD_VERSION,
    QUANT_METHOD,
    RECIPES,
    SUPPORTED_ARCHITECTURES,
    MAMBA2_QUANTIZED_LINEARS,
    W4_PRECISIONS,
    WEIGHTS_FILE,
    Mamba2Shapes,
    mamba2_mixer_tensors,
    mixer_prefix,
    w4_group_size,
)
from ..kernels.hadamard import is_supported_hadamard_size
from ..kernels.quant import quantize_int8, quantize_per_channel_int8, quantize_per_tensor_int8, symmetric_scale
from . import recipe_w4, transforms
from .calibration import DEFAULT_CALIBRATION, ActivationStats, calibration_samples
from .reorder import Reordering, group_absmax, sort_and_cluster
from .simulate import Mamba2Reference
from .source import TOKENIZER_FILES, SourceModel, check_source, load_source

W4_RECIPES = ("w4a8", "w4a16", "w4ax")
IMPLEMENTED = {("mamba2", "w8a8"), ("mamba2", "w4a8"), ("mamba2", "w4a16"), ("mamba", "w8a8")}
# Quamba's percentile for the SSM input and state (quamba.md section 1, "at HEAD").
DEFAULT_PERCENTILE_ALPHA = 0.9995


class QuantizeError(ValueError):
    """Bad converter input, reported before any work is done."""


def check_request(
    model: str | Path,
    recipe: str,
    out_dir: Path,
    overwrite: bool,
    hadamard: bool = True,
    percentile_alpha: float | None = DEFAULT_PERCENTILE_ALPHA,
) -> str:
    """Everything that can be checked without reading weights or calibrating; returns the kind."""
    if percentile_alpha is not None and not (0.5 < percentile_alpha <= 1):
        raise QuantizeError(f"percentile alpha must be in (0.5, 1], got {percentile_alpha}")
    if recipe not in RECIPES:
        raise QuantizeError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if out_dir.exists() and not overwrite:
        raise QuantizeError(f"output directory {out_dir} exists; pass --overwrite to replace it")
    _, _, arch = check_source(model)
    kind = SUPPORTED_ARCHITECTURES[arch]
    if (kind, recipe) not in IMPLEMENTED:
        raise QuantizeError(
            f"recipe {recipe!r} for {arch} is not implemented in this version of vllm-quamba "
            f"(implemented: {sorted(IMPLEMENTED)})"
        )
    if kind == "mamba2" and not hadamard:
        raise QuantizeError(
            "--no-hadamard is implemented for Mamba1 only: Quamba2 checkpoints (Mamba2) always "
            "use the Hadamard rotations, and the Mamba2 runtime applies them unconditionally"
        )
    if kind == "mamba2" and percentile_alpha != DEFAULT_PERCENTILE_ALPHA:
        raise QuantizeError(
            "--no-percentile/--percentile-alpha apply to Mamba1 only: the Quamba2 recipe (Mamba2) "
            "uses no percentile clipping"
        )
    return kind


def _check_shapes(source: SourceModel) -> Mamba2Shapes:
    shapes = Mamba2Shapes.from_config(source.config)
    for what, size in (("hidden_size", shapes.hidden_size), ("intermediate_size", shapes.intermediate_size)):
        if not is_supported_hadamard_size(size):
            raise QuantizeError(
                f"{what} {size} is not a size the Hadamard transform supports "
                "(2^k, 12*2^k, 20*2^k, 28*2^k or 40*2^k)"
            )
    heads_per_group = shapes.num_heads // shapes.n_groups
    if heads_per_group < HEAD_GROUPS or shapes.head_dim < DIM_GROUPS:
        raise QuantizeError(
            f"sort-and-cluster needs >= {HEAD_GROUPS} heads per SSD group and head_dim >= "
            f"{DIM_GROUPS}; this model has {heads_per_group} and {shapes.head_dim}"
        )
    if source.config.get("use_bias"):
        raise QuantizeError("Mamba2 models with in_proj/out_proj biases are not supported")
    return shapes


def _observe(reference: Mamba2Reference, samples: list[torch.Tensor], desc: str) -> ActivationStats:
    stats = ActivationStats(reference.shapes.n_groups)
    reference.observer = stats
    for ids in tqdm(samples, desc=desc, unit="sample"):
        reference.logits(ids)
    return stats


def _reorder_all(tensors, shapes, config, samples) -> tuple[dict, list[Reordering]]:
    stats = _observe(Mamba2Reference(config, tensors), samples, "calibration 1/2 (sort statistic)")
    reorderings = []
    for layer in range(shapes.num_layers):
        reordering = sort_and_cluster(stats.channel_mean_abs[layer], shapes)
        tensors = transforms.permute_mamba2(
            tensors, shapes, layer, reordering.head_index, reordering.channel_index
        )
        reorderings.append(reordering)
    return tensors, reorderings


def _per_segment_int8(t: torch.Tensor, shapes: Mamba2Shapes) -> tuple[torch.Tensor, torch.Tensor]:
    gs = shapes.n_groups * shapes.state_size
    parts = torch.split(t, [shapes.intermediate_size, gs, gs])
    scales = torch.stack([symmetric_scale(p.abs().amax()) for p in parts])
    sizes = torch.tensor([shapes.intermediate_size, gs, gs])
    per_channel = scales.repeat_interleave(sizes).reshape(-1, *([1] * (t.dim() - 1)))
    return quantize_int8(t, per_channel), scales


def _quantize_mixer(tensors, layer, shapes, stats: ActivationStats, reordering: Reordering):
    prefix = mixer_prefix(layer)
    t = lambda name: tensors[prefix + name]  # noqa: E731
    scale = lambda point: stats.scale(layer, point)  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    for linear, point in (("in_proj", "in_proj_input"), ("out_proj", "out_proj_input")):
        out[f"{linear}.weight"], out[f"{linear}.weight_scale"] = quantize_per_channel_int8(t(f"{linear}.weight"))
        out[f"{linear}.input_scale"] = scale(point)
    out["z_scale"], out["dt_scale"] = scale("z"), scale("dt")
    out["conv1d.input_scale"] = torch.cat([scale("x_in"), scale("B_in"), scale("C_in")])
    out["conv1d.weight"], out["conv1d.weight_scale"] = _per_segment_int8(t("conv1d.weight"), shapes)
    out["conv1d.bias"], out["conv1d.bias_scale"] = _per_segment_int8(t("conv1d.bias"), shapes)
    x_absmax = stats.absmax[(layer, "x")].reshape(shapes.num_heads, shapes.head_dim)
    out["x_scales"] = symmetric_scale(group_absmax(x_absmax, reordering, shapes))
    out["x_head_group_range"] = reordering.head_group_range
    out["x_dim_group_range"] = reordering.dim_group_range
    out["B_scale"], out["C_scale"] = scale("B"), scale("C")
    out["A_log"], out["A_log_scale"] = quantize_per_tensor_int8(t("A_log"))
    out["D"], out["D_scale"] = quantize_per_tensor_int8(t("D"))
    out["dt_bias"] = t("dt_bias")
    out["norm.weight"] = t("norm.weight")
    out["ssm_state_scale"] = symmetric_scale(group_absmax(stats.absmax[(layer, "ssm_state")], reordering, shapes))
    return {prefix + name: value.contiguous() for name, value in out.items()}


def _int8_args() -> dict[str, Any]:
    return dict(num_bits=8, type="int", symmetric=True, dynamic=False)


def _linear_scheme(targets: list[str], precision: str, group_size: int | None) -> QuantizationScheme:
    """compressed-tensors' own scheme model of one set of linears at ``precision``."""
    int8 = _int8_args()
    static_int8_input = QuantizationArgs(strategy="tensor", **int8)
    if precision == "w8a8":
        return QuantizationScheme(
            targets=targets,
            weights=QuantizationArgs(strategy="channel", **int8),
            input_activations=static_int8_input,
            format="int-quantized",
        )
    return QuantizationScheme(
        targets=targets,
        weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, dynamic=False, strategy="group", group_size=group_size
        ),
        input_activations=static_int8_input if precision == "w4a8" else None,
        format="pack-quantized",
    )


def linears_config(linears: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """The compressed-tensors part of ``quantization_config``, quamba method.

    ``linears`` maps a target (a ``re:`` layer-name pattern) to (precision, input features);
    targets with the same scheme share a config group.
    """
    grouped: dict[tuple[str, int | None], list[str]] = {}
    for target, (precision, in_features) in linears.items():
        group_size = None if precision == "w8a8" else w4_group_size(in_features)
        grouped.setdefault((precision, group_size), []).append(target)
    groups = {
        f"group_{i}": _linear_scheme(targets, precision, group_size)
        for i, ((precision, group_size), targets) in enumerate(sorted(grouped.items(), key=str))
    }
    formats = {scheme.format for scheme in groups.values()}
    config = QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        ignore=["lm_head"],
    ).model_dump(mode="json", exclude_none=True)
    config.pop("quantization_status", None)
    config["quant_method"] = QUANT_METHOD
    return config


def _mixer_targets(shapes: Mamba2Shapes, precisions: list[str]) -> dict[str, tuple[str, int]]:
    """One target per (precision, linear): every layer's, or the listed layers' (W4AX)."""
    targets = {}
    for precision in sorted(set(precisions)):
        layers = [str(i) for i, p in enumerate(precisions) if p == precision]
        where = r".*" if len(layers) == len(precisions) else rf"backbone\.layers\.({'|'.join(layers)})\."
        targets[rf"re:{where}mixer\.in_proj$"] = (precision, shapes.hidden_size)
        targets[rf"re:{where}mixer\.out_proj$"] = (precision, shapes.intermediate_size)
    return targets


def quantization_config(
    recipe: str, shapes: Mamba2Shapes, calib: dict[str, Any], precisions: list[str]
) -> dict[str, Any]:
    """compressed-tensors' own models for the linears, plus the ``quamba`` section."""
    config = linears_config(_mixer_targets(shapes, precisions))
    int8_ssm = any(p != "w4a16" for p in precisions)
    config["quamba"] = {
        "recipe": recipe,
        "method_version": METHOD_VERSION,
        "architecture": "mamba2",
        "hadamard": {"residual": shapes.hidden_size, "out_proj_input": shapes.intermediate_size},
        "x_head_groups": HEAD_GROUPS if int8_ssm else None,
        "x_dim_groups": DIM_GROUPS if int8_ssm else None,
        "layer_precision": precisions if recipe == "w4ax" else None,
        "ssm_state_dtype": "int8" if int8_ssm else None,
        "conv_state_dtype": "int8" if int8_ssm else None,
        "weight_scales": "per-channel" if recipe == "w8a8" else "per-group",
        "calibration": calib,
    }
    return config


def _write_checkpoint(out_dir: Path, config: dict, tensors: dict, tokenizer_dir: Path | None, overwrite: bool):
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        save_file({k: tensors[k] for k in sorted(tensors)}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        if out_dir.exists() and overwrite:
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def quantize(
    model: str | Path,
    out_dir: str | Path,
    recipe: str = "w8a8",
    calib: str = DEFAULT_CALIBRATION,
    calib_samples: int = 64,
    calib_seqlen: int = 512,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    hadamard: bool = True,
    percentile_alpha: float | None = DEFAULT_PERCENTILE_ALPHA,
    hessian_budget_bytes: int = recipe_w4.DEFAULT_HESSIAN_BUDGET_BYTES,
    gptq: bool = True,
) -> Path:
    """Quantize ``model`` (local dir or hub id) with ``recipe``; returns the output directory.

    ``hadamard=False`` (no residual rotation, no online out_proj Hadamard) and
    ``percentile_alpha=None`` (absmax instead of percentile clipping of the SSM input and state)
    are the naive baselines of the Quamba papers; Mamba1 only. ``hessian_budget_bytes`` bounds
    the memory of GPTQ's Hessians (4-bit recipes): as many layers per calibration pass as fit;
    ``gptq=False`` rounds the 4-bit weights to nearest instead (the naive 4-bit baseline).
    """
    out_dir = Path(out_dir)
    kind = check_request(model, recipe, out_dir, overwrite, hadamard, percentile_alpha)
    if not gptq and recipe not in W4_RECIPES:
        raise QuantizeError(f"--rtn applies to the 4-bit recipes {W4_RECIPES}, not {recipe!r}")
    torch.manual_seed(seed)
    source = load_source(model, tokenizer)
    if kind == "mamba":
        return _quantize_mamba1(
            source, out_dir, recipe, calib, calib_samples, calib_seqlen, overwrite, seed, hadamard, percentile_alpha
        )
    shapes = _check_shapes(source)
    precisions = [recipe] * shapes.num_layers
    samples = _samples(source, calib, calib_samples, calib_seqlen)
    tensors = transforms.rotate_residual(transforms.fold_norms(source.tensors))
    int8_layers = [i for i, p in enumerate(precisions) if p != "w4a16"]
    if int8_layers:  # sort-and-cluster and the SSM scales serve the int8 SSM path only
        tensors, reorderings = _reorder_all(tensors, shapes, source.config, samples)
    tensors = transforms.fuse_out_proj_hadamard(tensors)
    if int8_layers:
        stats = _observe(
            Mamba2Reference(source.config, tensors, online_hadamard=True), samples, "calibration 2/2 (scales)"
        )
    w4 = _w4_mixer_linears(source.config, tensors, precisions, samples, hessian_budget_bytes, gptq)
    quantized = {name: t.contiguous() for name, t in tensors.items() if ".mixer." not in name}
    for layer, precision in enumerate(precisions):
        if precision == "w4a16":
            quantized.update(_fp_mixer(tensors, layer, shapes))
        else:
            quantized.update(_quantize_mixer(tensors, layer, shapes, stats, reorderings[layer]))
        for linear in MAMBA2_QUANTIZED_LINEARS if precision in W4_PRECISIONS else ():
            _replace_linear(quantized, mixer_prefix(layer) + linear + ".", w4[(layer, linear)])
    calib_info = {"source": str(calib), "samples": len(samples), "seqlen": calib_seqlen, "seed": seed}
    config = {
        **{k: v for k, v in source.config.items() if k != "torch_dtype"},
        "tie_word_embeddings": False,
        "dtype": "float32",
        "quantization_config": quantization_config(recipe, shapes, calib_info, precisions),
    }
    _write_checkpoint(out_dir, config, quantized, source.tokenizer_dir, overwrite)
    return out_dir


def _w4_mixer_linears(config, tensors, precisions, samples, hessian_budget_bytes, gptq: bool):
    """in_proj/out_proj of every 4-bit layer: GPTQ, Hessians from the fp (rotated, permuted,
    Hadamard-fused) model with the online out_proj Hadamard; or round-to-nearest."""
    weights = {
        (layer, linear): tensors[mixer_prefix(layer) + linear + ".weight"]
        for layer, precision in enumerate(precisions)
        if precision in W4_PRECISIONS
        for linear in MAMBA2_QUANTIZED_LINEARS
    }
    if not gptq:
        return {key: recipe_w4.rtn_w4(weight) for key, weight in weights.items()}
    if not weights:
        return {}
    return recipe_w4.gptq_linears(
        weights,
        {"in_proj_input": "in_proj", "out_proj_input": "out_proj"},
        lambda observer: Mamba2Reference(config, tensors, online_hadamard=True, observer=observer),
        samples,
        hessian_budget_bytes,
    )


def _replace_linear(quantized: dict, prefix: str, packed: dict[str, torch.Tensor]) -> None:
    """Swap a linear's int8 or fp weight for its pack-quantized tensors (keeping input_scale)."""
    for name in ("weight", "weight_scale"):
        quantized.pop(prefix + name, None)
    quantized.update({prefix + name: t for name, t in packed.items()})


def _fp_mixer(tensors, layer: int, shapes: Mamba2Shapes) -> dict[str, torch.Tensor]:
    """A W4A16 layer's fp SSM tensors (format.mamba2_mixer_tensors(..., "w4a16"))."""
    prefix = mixer_prefix(layer)
    names = [n for n in mamba2_mixer_tensors(shapes, "w4a16") if n.split(".")[0] not in MAMBA2_QUANTIZED_LINEARS]
    return {prefix + n: tensors[prefix + n].float().contiguous() for n in names}


def _samples(source: SourceModel, calib: str, calib_samples: int, calib_seqlen: int) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    return calibration_samples(calib, AutoTokenizer.from_pretrained(source.tokenizer_dir), calib_samples, calib_seqlen)


def _quantize_mamba1(
    source, out_dir, recipe, calib, calib_samples, calib_seqlen, overwrite, seed, hadamard, percentile_alpha
) -> Path:
    from . import recipe_mamba1

    shapes = recipe_mamba1.check_shapes(source.config, hadamard, QuantizeError)
    samples = _samples(source, calib, calib_samples, calib_seqlen)
    quantized = recipe_mamba1.quantize_tensors(
        source.config, source.tensors, shapes, samples, hadamard, percentile_alpha
    )
    calib_info = {"source": str(calib), "samples": len(samples), "seqlen": calib_seqlen, "seed": seed}
    quant_config = linears_config({recipe_mamba1.TARGETS: ("w8a8", shapes.hidden_size)})
    quant_config["quamba"] = {
        **recipe_mamba1.quamba_section(recipe, shapes, hadamard, percentile_alpha),
        "method_version": METHOD_VERSION,
        "calibration": calib_info,
    }
    config = {
        **{k: v for k, v in source.config.items() if k != "torch_dtype"},
        "tie_word_embeddings": False,
        "dtype": "float32",
        "quantization_config": quant_config,
    }
    _write_checkpoint(out_dir, config, quantized, source.tokenizer_dir, overwrite)
    return out_dir
