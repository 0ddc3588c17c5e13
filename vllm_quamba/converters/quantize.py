"""``quantize()``: a source checkpoint -> a quamba checkpoint, for every implemented recipe.

Mamba1 (Quamba W8A8, with its naive-baseline switches) lives in ``recipe_mamba1``; the
Quamba2 W8A8 recipe for Mamba2 is here. Mamba2 order (quamba.md sections 0, 2 and 9): fold the
RMSNorm weights, rotate the residual stream, gather the sort statistic, sort-and-cluster and
permute, fuse the out_proj Hadamard, calibrate every activation scale on the permuted fp model,
quantize the weights, write. The Mamba2 naive W8A8 baseline (``hadamard=False`` with
``percentile_alpha=None``) only folds the norms, then calibrates and quantizes with one absmax
scale for all of x, B, C and the SSM state (no rotation, no sort-and-cluster). Everything is
checked before any work starts, and the output directory appears only when complete
(written beside it under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file
from tqdm import tqdm

from ..format import (
    DIM_GROUPS,
    EMBEDDING,
    EMBEDDING_BITS,
    HEAD_GROUPS,
    LM_HEAD,
    METHOD_VERSION,
    QUANT_METHOD,
    RECIPES,
    SUPPORTED_ARCHITECTURES,
    MAMBA2_QUANTIZED_LINEARS,
    W4_PRECISIONS,
    WEIGHTS_FILE,
    Mamba2Shapes,
    embedding_tensors,
    mamba2_mixer_tensors,
    mixer_prefix,
    w4_group_size,
)
from ..kernels.hadamard import is_supported_hadamard_size
from ..kernels.quant import quantize_int8, quantize_per_channel_int8, quantize_per_tensor_int8, symmetric_scale
from . import recipe_w4, recipe_w4ax, transforms
from .calibration import DEFAULT_CALIBRATION, ActivationStats, calibration_samples
from .gptq import group_scale, quantize_with_scale
from .reorder import Reordering, group_absmax, sort_and_cluster
from .simulate import HEAD_LAYER, Mamba2Reference
from .source import TOKENIZER_FILES, SourceModel, check_source, load_source

W4_RECIPES = ("w4a8", "w4a16", "w4ax")
# 4-bit embedding rows: clipping ratios of the absmax scale searched per row, and rows per
# search step (bounds the search's memory on large vocabularies).
EMBEDDING_CLIP_RATIOS = torch.linspace(0.5, 1.0, 51)
EMBEDDING_ROW_CHUNK = 4096
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
    if kind == "mamba2":
        _check_mamba2_switches(recipe, hadamard, percentile_alpha)
    return kind


def _check_mamba2_switches(recipe: str, hadamard: bool, percentile_alpha: float | None) -> None:
    """Mamba2 takes the Quamba2 recipe (Hadamards, no percentile) or, with both switches off,
    the naive W8A8 baseline; nothing in between."""
    if hadamard and percentile_alpha == DEFAULT_PERCENTILE_ALPHA:
        return
    if hadamard or percentile_alpha is not None:
        raise QuantizeError(
            "on Mamba2, --no-hadamard and --no-percentile go together: both give the naive W8A8 "
            "baseline (no rotations, no sort-and-cluster, per-tensor absmax scales); the Quamba2 "
            "recipe uses no percentile clipping, so --percentile-alpha does not apply"
        )
    if recipe != "w8a8":
        raise QuantizeError(
            f"the naive baseline (--no-hadamard --no-percentile) is implemented for recipe 'w8a8' "
            f"only, not {recipe!r}; the naive 4-bit baseline is --rtn"
        )


def _check_shapes(source: SourceModel) -> Mamba2Shapes:
    shapes = Mamba2Shapes.from_config(source.config)
    for what, size in (("hidden_size", shapes.hidden_size), ("intermediate_size", shapes.intermediate_size)):
        if not is_supported_hadamard_size(size):
            raise QuantizeError(
                f"{what} {size} is not a size the Hadamard transform supports "
                "(2^k, 12*2^k, 20*2^k, 28*2^k or 40*2^k); choose a model with a supported size"
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
    out.update(_ssm_group_scales(stats, layer, shapes, reordering))
    out["A_log"], out["A_log_scale"] = quantize_per_tensor_int8(t("A_log"))
    out["D"], out["D_scale"] = quantize_per_tensor_int8(t("D"))
    out["dt_bias"] = t("dt_bias")
    out["norm.weight"] = t("norm.weight")
    return {prefix + name: value.contiguous() for name, value in out.items()}


def _ssm_group_scales(stats: ActivationStats, layer, shapes, reordering: Reordering | None) -> dict[str, torch.Tensor]:
    """x, B, C and SSM-state scales with their group ranges: per sort-and-cluster block and SSD
    group (Quamba2), or, without a ``reordering`` (the naive baseline), one absmax scale per
    tensor, written in the same layout with every head and dim in the first group."""
    absmax = lambda point: stats.absmax[(layer, point)]  # noqa: E731
    if reordering is not None:
        x_absmax = absmax("x").reshape(shapes.num_heads, shapes.head_dim)
        return {
            "x_scales": symmetric_scale(group_absmax(x_absmax, reordering, shapes)),
            "x_head_group_range": reordering.head_group_range,
            "x_dim_group_range": reordering.dim_group_range,
            "B_scale": stats.scale(layer, "B"),
            "C_scale": stats.scale(layer, "C"),
            "ssm_state_scale": symmetric_scale(group_absmax(absmax("ssm_state"), reordering, shapes)),
        }
    G, N = shapes.n_groups, shapes.state_size
    per_tensor = lambda point, shape: symmetric_scale(absmax(point).amax()).expand(shape)  # noqa: E731
    return {
        "x_scales": per_tensor("x", (G, HEAD_GROUPS, DIM_GROUPS)),
        "x_head_group_range": torch.full((G, HEAD_GROUPS), shapes.num_heads // G, dtype=torch.int32),
        "x_dim_group_range": torch.full((G, HEAD_GROUPS, DIM_GROUPS), shapes.head_dim, dtype=torch.int32),
        "B_scale": per_tensor("B", (G,)),
        "C_scale": per_tensor("C", (G,)),
        "ssm_state_scale": per_tensor("ssm_state", (G, HEAD_GROUPS, DIM_GROUPS, N)),
    }


def _int8_args() -> dict[str, Any]:
    return dict(num_bits=8, type="int", symmetric=True, dynamic=False)


def _embedding_scheme(bits: int) -> QuantizationScheme:
    """Weight-only per-row ints, pack-quantized: what vLLM's compressed-tensors embedding reads."""
    return QuantizationScheme(
        targets=[EMBEDDING],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, dynamic=False, strategy="channel"),
        format="pack-quantized",
    )


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


def linears_config(linears: dict[str, tuple[str, int]], embedding_bits: int | None = None) -> dict[str, Any]:
    """The compressed-tensors part of ``quantization_config``, quamba method.

    ``linears`` maps a target (a ``re:`` layer-name pattern, or ``LM_HEAD``) to (precision,
    input features); targets with the same scheme share a config group. ``embedding_bits``
    adds the quantized embedding's group; an lm_head not among the targets is ignored (fp).
    """
    grouped: dict[tuple[str, int | None], list[str]] = {}
    for target, (precision, in_features) in linears.items():
        group_size = None if precision == "w8a8" else w4_group_size(in_features)
        grouped.setdefault((precision, group_size), []).append(target)
    groups = {
        f"group_{i}": _linear_scheme(targets, precision, group_size)
        for i, ((precision, group_size), targets) in enumerate(sorted(grouped.items(), key=str))
    }
    if embedding_bits is not None:
        groups[f"group_{len(groups)}"] = _embedding_scheme(embedding_bits)
    formats = {scheme.format for scheme in groups.values()}
    config = QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        ignore=[] if LM_HEAD in linears else [LM_HEAD],
    ).model_dump(mode="json", exclude_none=True)
    config.pop("quantization_status", None)
    config["quant_method"] = QUANT_METHOD
    return config


def _mixer_targets(shapes: Mamba2Shapes, precisions: list[str]) -> dict[str, tuple[str, int]]:
    """One target per (precision, linear): every layer's, or the listed layers' (W4AX)."""
    targets = {}
    for precision in sorted(set(precisions)):
        where = recipe_w4ax.layers_pattern(precisions, precision)
        targets[rf"re:{where}mixer\.in_proj$"] = (precision, shapes.hidden_size)
        targets[rf"re:{where}mixer\.out_proj$"] = (precision, shapes.intermediate_size)
    return targets


def quantization_config(
    recipe: str,
    shapes: Mamba2Shapes,
    calib: dict[str, Any],
    precisions: list[str],
    embedding: str | None = None,
    lm_head: str | None = None,
    naive: bool = False,
) -> dict[str, Any]:
    """compressed-tensors' own models for the linears (and the quantized embedding), plus the
    ``quamba`` section. ``embedding`` ("int8"/"int4") and ``lm_head`` (a precision) are None
    when those layers stay fp; ``naive``: the naive W8A8 baseline (no Hadamards, one group)."""
    targets = _mixer_targets(shapes, precisions)
    if lm_head is not None:
        targets[LM_HEAD] = (lm_head, shapes.hidden_size)
    config = linears_config(targets, EMBEDDING_BITS[embedding] if embedding else None)
    int8_ssm = any(p != "w4a16" for p in precisions)
    config["quamba"] = {
        "recipe": recipe,
        "method_version": METHOD_VERSION,
        "architecture": "mamba2",
        "hadamard": None if naive else {"residual": shapes.hidden_size, "out_proj_input": shapes.intermediate_size},
        "x_head_groups": (1 if naive else HEAD_GROUPS) if int8_ssm else None,
        "x_dim_groups": (1 if naive else DIM_GROUPS) if int8_ssm else None,
        "layer_precision": precisions if recipe == "w4ax" else None,
        "ssm_state_dtype": "int8" if int8_ssm else None,
        "conv_state_dtype": "int8" if int8_ssm else None,
        "weight_scales": "per-channel" if recipe == "w8a8" else "per-group",
        "embedding": embedding,
        "lm_head": lm_head,
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
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QuantizeError(f"writing {out_dir} failed ({exc}); nothing was written: free space and run again") from exc
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
    layer_precision: list[str] | None = None,
    auto_precision: float | None = None,
    quantize_embedding: bool = False,
    quantize_lm_head: bool = False,
) -> Path:
    """Quantize ``model`` (local dir or hub id) with ``recipe``; returns the output directory.

    ``hadamard=False`` (no residual rotation, no online out_proj Hadamard) and
    ``percentile_alpha=None`` (absmax instead of percentile clipping of the SSM input and state)
    are the naive baselines of the Quamba papers. Mamba1 takes each alone; Mamba2 (recipe w8a8)
    both together: the naive W8A8 baseline, also without sort-and-cluster (one absmax scale
    for all of x, B, C and the SSM state). ``hessian_budget_bytes`` bounds
    the memory of GPTQ's Hessians (4-bit recipes): as many layers per calibration pass as fit;
    ``gptq=False`` rounds the 4-bit weights to nearest instead (the naive 4-bit baseline).
    Recipe ``w4ax`` takes either ``layer_precision`` (one of "w4a8"/"w4a16" per layer) or
    ``auto_precision`` (the fraction of layers to keep at W4A16, chosen by measured calibration
    sensitivity: ``recipe_w4ax``).
    ``quantize_embedding`` / ``quantize_lm_head`` quantize the embedding (per-row int8 for w8a8,
    4-bit otherwise) and the lm_head (the recipe's precision; W4A8 for w4ax) too: Mamba2 only.
    """
    out_dir = Path(out_dir)
    kind = check_request(model, recipe, out_dir, overwrite, hadamard, percentile_alpha)
    if kind == "mamba" and (quantize_embedding or quantize_lm_head):
        raise QuantizeError(
            "--quantize-embedding and --quantize-lm-head are implemented for Mamba2 only in this "
            "version of vllm-quamba: Mamba1 checkpoints keep an fp embedding and lm_head"
        )
    if recipe != "w4ax" and (layer_precision is not None or auto_precision is not None):
        raise QuantizeError("--layer-precision and --auto-precision choose the layers of recipe 'w4ax' only")
    if not gptq and recipe not in W4_RECIPES:
        raise QuantizeError(f"--rtn applies to the 4-bit recipes {W4_RECIPES}, not {recipe!r}")
    torch.manual_seed(seed)
    source = load_source(model, tokenizer)
    if kind == "mamba":
        return _quantize_mamba1(
            source, out_dir, recipe, calib, calib_samples, calib_seqlen, overwrite, seed, hadamard, percentile_alpha,
            gptq, hessian_budget_bytes, layer_precision, auto_precision,
        )
    shapes = _check_shapes(source)
    embedding, lm_head = _head_to_toe_choice(recipe, shapes, source.config, quantize_embedding, quantize_lm_head)
    candidates = ("w4a8", "w4a16") if recipe == "w4ax" else (recipe,)
    if recipe == "w4ax":
        recipe_w4ax.check_choice(layer_precision, auto_precision, shapes.num_layers, QuantizeError)
    samples = _samples(source, calib, calib_samples, calib_seqlen)
    tensors = transforms.fold_norms(source.tensors)
    int8_ssm = any(p != "w4a16" for p in candidates)
    reorderings = [None] * shapes.num_layers  # None: the naive baseline's per-tensor SSM scales
    if hadamard:
        tensors = transforms.rotate_residual(tensors)
        if int8_ssm:  # sort-and-cluster and the SSM scales serve the int8 SSM path only
            tensors, reorderings = _reorder_all(tensors, shapes, source.config, samples)
        tensors = transforms.fuse_out_proj_hadamard(tensors)
    stats = None
    if int8_ssm:
        stats = _observe(
            Mamba2Reference(source.config, tensors, online_hadamard=hadamard), samples, "calibration 2/2 (scales)"
        )
    # GPTQ's weights do not depend on the activation precision: W4A8 and W4A16 share them.
    four_bit = [candidates[0]] * shapes.num_layers if candidates[0] in W4_PRECISIONS else []
    w4 = _w4_mixer_linears(
        source.config, tensors, four_bit, samples, hessian_budget_bytes, gptq, lm_head in W4_PRECISIONS
    )
    options = {
        precision: [
            _layer_tensors(tensors, layer, shapes, precision, w4, stats, reorderings[layer])
            for layer in range(shapes.num_layers)
        ]
        for precision in candidates
    }
    quantized, precisions, sensitivity = recipe_w4ax.chosen_tensors(
        recipe, layer_precision, auto_precision, options,
        {name: t.contiguous() for name, t in tensors.items() if ".mixer." not in name}, source.config, samples,
        lambda chosen: quantization_config("w4ax", shapes, {}, chosen),
    )
    quantized.update(_head_to_toe_tensors(quantized, embedding, lm_head, w4, stats))
    calib_info = {"source": str(calib), "samples": len(samples), "seqlen": calib_seqlen, "seed": seed}
    config = {
        **{k: v for k, v in source.config.items() if k != "torch_dtype"},
        "tie_word_embeddings": False,
        "dtype": "float32",
        "quantization_config": quantization_config(
            recipe, shapes, calib_info, precisions, embedding, lm_head, naive=not hadamard
        ),
    }
    if sensitivity is not None:
        config["quantization_config"]["quamba"]["auto_precision"] = sensitivity
    _write_checkpoint(out_dir, config, quantized, source.tokenizer_dir, overwrite)
    return out_dir


def _w4_mixer_linears(config, tensors, precisions, samples, hessian_budget_bytes, gptq: bool, lm_head: bool = False):
    """in_proj/out_proj of every 4-bit layer (and the lm_head, keyed (HEAD_LAYER, LM_HEAD), when
    ``lm_head``): GPTQ, Hessians from the fp (rotated, permuted, Hadamard-fused) model with the
    online out_proj Hadamard, in the same calibration passes; or round-to-nearest."""
    weights = {
        (layer, linear): tensors[mixer_prefix(layer) + linear + ".weight"]
        for layer, precision in enumerate(precisions)
        if precision in W4_PRECISIONS
        for linear in MAMBA2_QUANTIZED_LINEARS
    }
    if lm_head:
        weights[(HEAD_LAYER, LM_HEAD)] = tensors[f"{LM_HEAD}.weight"]
    if not gptq:
        return {key: recipe_w4.rtn_w4(weight) for key, weight in weights.items()}
    if not weights:
        return {}
    return recipe_w4.gptq_linears(
        weights,
        {"in_proj_input": "in_proj", "out_proj_input": "out_proj", "lm_head_input": LM_HEAD},
        lambda observer: Mamba2Reference(config, tensors, online_hadamard=True, observer=observer),
        samples,
        hessian_budget_bytes,
    )


def _head_to_toe_choice(
    recipe: str, shapes: Mamba2Shapes, config: dict, quantize_embedding: bool, quantize_lm_head: bool
) -> tuple[str | None, str | None]:
    """(embedding "int8"/"int4" or None, lm_head precision or None); Quamba2's choices
    (quamba.md section 2.5): 8-bit with w8a8, 4-bit rows otherwise; the lm_head at the recipe's
    precision, W4A8 under w4ax."""
    embedding = ("int8" if recipe == "w8a8" else "int4") if quantize_embedding else None
    lm_head = ("w4a8" if recipe == "w4ax" else recipe) if quantize_lm_head else None
    if embedding:
        try:
            embedding_tensors(config["vocab_size"], shapes.hidden_size, EMBEDDING_BITS[embedding])
        except ValueError as exc:
            raise QuantizeError(f"--quantize-embedding: {exc}") from exc
    return embedding, lm_head


def _head_to_toe_tensors(quantized, embedding: str | None, lm_head: str | None, w4, stats) -> dict[str, torch.Tensor]:
    """The quantized embedding / lm_head tensors, replacing their fp ``weight`` in ``quantized``."""
    out: dict[str, torch.Tensor] = {}
    if embedding:
        weight = quantized.pop(f"{EMBEDDING}.weight")
        out.update({f"{EMBEDDING}.{n}": t for n, t in _quantize_embedding(weight, EMBEDDING_BITS[embedding]).items()})
    if lm_head == "w8a8":
        q, scale = quantize_per_channel_int8(quantized[f"{LM_HEAD}.weight"])
        out.update({f"{LM_HEAD}.weight": q, f"{LM_HEAD}.weight_scale": scale})
    elif lm_head:
        quantized.pop(f"{LM_HEAD}.weight")
        out.update({f"{LM_HEAD}.{n}": t for n, t in w4[(HEAD_LAYER, LM_HEAD)].items()})
    if lm_head in ("w8a8", "w4a8"):
        out[f"{LM_HEAD}.input_scale"] = stats.scale(HEAD_LAYER, "lm_head_input")
    return {name: t.contiguous() for name, t in out.items()}


def _quantize_embedding(weight: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Per-row symmetric ints, packed like a pack-quantized channel-wise weight: 8-bit rows
    absmax/127 (Quamba2's), 4-bit rows with the least-squares clipping scale."""
    if bits == 8:
        q, scale = quantize_per_channel_int8(weight.float())
    else:
        scale = torch.cat([_least_squares_row_scale(rows.float(), bits) for rows in weight.split(EMBEDDING_ROW_CHUNK)])
        q = quantize_with_scale(weight, scale, bits)
    return {
        "weight_packed": pack_to_int32(q, bits),
        "weight_scale": scale.float(),
        "weight_shape": torch.tensor(q.shape, dtype=torch.int64),
    }


def _least_squares_row_scale(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, 1]: per row, the clipped absmax scale (ratio from EMBEDDING_CLIP_RATIOS) whose
    rounding + clipping error is smallest. 4-bit rows are coarse enough for clipping to pay:
    on the tiny Mamba2 the embedding alone costs +0.84% perplexity against +1.49% at absmax."""
    candidates = group_scale(rows, bits).unsqueeze(1) * EMBEDDING_CLIP_RATIOS
    errors = torch.stack([
        (quantize_with_scale(rows, scale[:, None], bits) * scale[:, None] - rows).pow(2).sum(dim=1)
        for scale in candidates.t()
    ], dim=1)
    return candidates.gather(1, errors.argmin(dim=1, keepdim=True))


def _layer_tensors(tensors, layer, shapes, precision, w4, stats, reordering) -> dict[str, torch.Tensor]:
    """One mixer's checkpoint tensors at ``precision``."""
    if precision == "w4a16":
        out = _fp_mixer(tensors, layer, shapes)
        for linear in MAMBA2_QUANTIZED_LINEARS:  # fp SSM: the linears carry no input scale
            out.update({mixer_prefix(layer) + f"{linear}.{n}": t for n, t in w4[(layer, linear)].items()})
        return out
    out = _quantize_mixer(tensors, layer, shapes, stats, reordering)
    for linear in MAMBA2_QUANTIZED_LINEARS if precision == "w4a8" else ():
        recipe_w4.replace_linear(out, mixer_prefix(layer) + linear + ".", w4[(layer, linear)])
    return out


def _fp_mixer(tensors, layer: int, shapes: Mamba2Shapes) -> dict[str, torch.Tensor]:
    """A W4A16 layer's fp SSM tensors (format.mamba2_mixer_tensors(..., "w4a16"))."""
    prefix = mixer_prefix(layer)
    names = [n for n in mamba2_mixer_tensors(shapes, "w4a16") if n.split(".")[0] not in MAMBA2_QUANTIZED_LINEARS]
    return {prefix + n: tensors[prefix + n].float().contiguous() for n in names}


def _samples(source: SourceModel, calib: str, calib_samples: int, calib_seqlen: int) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    return calibration_samples(calib, AutoTokenizer.from_pretrained(source.tokenizer_dir), calib_samples, calib_seqlen)


def _quantize_mamba1(
    source, out_dir, recipe, calib, calib_samples, calib_seqlen, overwrite, seed, hadamard, percentile_alpha,
    gptq, hessian_budget_bytes, layer_precision, auto_precision,
) -> Path:
    from . import recipe_mamba1

    shapes = recipe_mamba1.check_shapes(source.config, hadamard, QuantizeError)
    if recipe == "w4ax":
        recipe_w4ax.check_choice(layer_precision, auto_precision, shapes.num_layers, QuantizeError)
    samples = _samples(source, calib, calib_samples, calib_seqlen)
    candidates = W4_PRECISIONS if recipe == "w4ax" else (recipe,)
    base, options = recipe_mamba1.layer_options(
        source.config, source.tensors, shapes, samples, hadamard, percentile_alpha, candidates, gptq,
        hessian_budget_bytes,
    )
    calib_info = {"source": str(calib), "samples": len(samples), "seqlen": calib_seqlen, "seed": seed}

    def quant_config(precisions: list[str]) -> dict[str, Any]:
        config = linears_config(recipe_mamba1.linear_targets(precisions, shapes))
        config["quamba"] = {
            **recipe_mamba1.quamba_section(recipe, precisions, shapes, hadamard, percentile_alpha),
            "method_version": METHOD_VERSION,
            "calibration": calib_info,
        }
        return config

    quantized, precisions, sensitivity = recipe_w4ax.chosen_tensors(
        recipe, layer_precision, auto_precision, options, base, source.config, samples, quant_config
    )
    config = {
        **{k: v for k, v in source.config.items() if k != "torch_dtype"},
        "tie_word_embeddings": False,
        "dtype": "float32",
        "quantization_config": quant_config(precisions),
    }
    if sensitivity is not None:
        config["quantization_config"]["quamba"]["auto_precision"] = sensitivity
    _write_checkpoint(out_dir, config, quantized, source.tokenizer_dir, overwrite)
    return out_dir
