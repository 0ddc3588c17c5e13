"""Compute-invariant rewrites of an fp Mamba checkpoint (quamba.md sections 0 and 2.2).

Each function takes and returns a dict of fp32 tensors under transformers names and leaves
the model's fp output unchanged (up to float rounding):

- ``fold_norms``: each block's RMSNorm weight goes into the columns of the next linear
  (in_proj, and the lm_head for the final norm); the norm weights become 1.
- ``rotate_residual``: the residual stream lives in Hadamard space, r' = H r: the embedding
  rows and the lm_head/in_proj inputs are rotated, out_proj outputs too. An RMSNorm with unit
  weight commutes with an orthonormal rotation, which is why folding comes first.
- ``fuse_out_proj_hadamard``: out_proj's input is rotated online at runtime
  (y' = H y, before its int8 quantization), so its weight becomes W H^T.
- ``permute_mamba2``: the sort-and-cluster channel and head order of Quamba2.

Convention: ``hadamard_transform_ref(v) == v @ H.T`` for row vectors v.
"""

from __future__ import annotations

import torch

from ..format import Mamba2Shapes
from ..kernels.hadamard import hadamard_transform_ref

LAYER = "backbone.layers.{}."


def _layer_indices(tensors: dict[str, torch.Tensor]) -> list[int]:
    return sorted(
        {int(name.split(".")[2]) for name in tensors if name.startswith("backbone.layers.")}
    )


def _rotate_rows(weight: torch.Tensor) -> torch.Tensor:
    """W -> W H^T: a linear whose input now arrives rotated (x' = H x)."""
    return hadamard_transform_ref(weight)


def _rotate_output(weight: torch.Tensor) -> torch.Tensor:
    """W -> H W: a linear whose output must leave rotated."""
    return hadamard_transform_ref(weight.t()).t().contiguous()


def fold_norms(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for i in _layer_indices(tensors):
        prefix = LAYER.format(i)
        gamma = out[prefix + "norm.weight"]
        out[prefix + "mixer.in_proj.weight"] = out[prefix + "mixer.in_proj.weight"] * gamma
        out[prefix + "norm.weight"] = torch.ones_like(gamma)
    gamma_f = out["backbone.norm_f.weight"]
    out["lm_head.weight"] = out["lm_head.weight"] * gamma_f
    out["backbone.norm_f.weight"] = torch.ones_like(gamma_f)
    return out


def rotate_residual(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Needs folded norms (unit weights); unties the lm_head from the embedding."""
    out = dict(tensors)
    out["backbone.embeddings.weight"] = _rotate_rows(tensors["backbone.embeddings.weight"])
    out["lm_head.weight"] = _rotate_rows(tensors["lm_head.weight"])
    for i in _layer_indices(tensors):
        mixer = LAYER.format(i) + "mixer."
        out[mixer + "in_proj.weight"] = _rotate_rows(tensors[mixer + "in_proj.weight"])
        out[mixer + "out_proj.weight"] = _rotate_output(tensors[mixer + "out_proj.weight"])
        if mixer + "out_proj.bias" in tensors:
            out[mixer + "out_proj.bias"] = hadamard_transform_ref(tensors[mixer + "out_proj.bias"])
    return out


def fuse_out_proj_hadamard(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for i in _layer_indices(tensors):
        name = LAYER.format(i) + "mixer.out_proj.weight"
        out[name] = _rotate_rows(tensors[name])
    return out


def permute_mamba2(
    tensors: dict[str, torch.Tensor],
    shapes: Mamba2Shapes,
    layer: int,
    head_index: torch.Tensor,
    channel_index: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Reorder one mixer's heads and channels (quamba.md 2.2): a new dict, same fp output.

    ``channel_index`` orders the d_inner channels (x and z alike), ``head_index`` the heads.
    Heads only move inside their SSD group, so B and C stay as they are. Apply before
    ``fuse_out_proj_hadamard``: the permutation acts on out_proj's un-rotated input.
    """
    I, H = shapes.intermediate_size, shapes.num_heads
    mixer = LAYER.format(layer) + "mixer."
    out = dict(tensors)
    in_proj = tensors[mixer + "in_proj.weight"]
    z, x, bc, dt = torch.split(in_proj, [I, I, shapes.conv_dim - I, H])
    out[mixer + "in_proj.weight"] = torch.cat([z[channel_index], x[channel_index], bc, dt[head_index]])
    conv_order = torch.cat([channel_index, torch.arange(I, shapes.conv_dim)])
    out[mixer + "conv1d.weight"] = tensors[mixer + "conv1d.weight"][conv_order]
    if mixer + "conv1d.bias" in tensors:
        out[mixer + "conv1d.bias"] = tensors[mixer + "conv1d.bias"][conv_order]
    for name in ("A_log", "D", "dt_bias"):
        out[mixer + name] = tensors[mixer + name][head_index]
    out[mixer + "norm.weight"] = tensors[mixer + "norm.weight"][channel_index]
    out[mixer + "out_proj.weight"] = tensors[mixer + "out_proj.weight"][:, channel_index]
    return out
