"""4-bit linears of the W4A8, W4A16 and W4AX recipes: Hessians, GPTQ, packing.

GPTQ (``gptq.gptq_quantize``) needs each linear's input Hessian, gathered by running the fp
model (already folded, rotated and permuted: the weights GPTQ sees are the ones the checkpoint
stores) over the calibration samples with an observer. A layer's Hessians take 8*K^2 bytes
each, so they are gathered for as many layers at a time as ``hessian_budget_bytes`` allows
(at least one layer), each group quantized and dropped before the next calibration pass:
memory stays bounded whatever the depth of the model.

The 4-bit tensors are compressed-tensors' ``pack-quantized`` ones (``format.linear_tensors``),
packed with the library's own ``pack_to_int32``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from compressed_tensors.compressors import pack_to_int32
from tqdm import tqdm

from ..format import w4_group_size
from .gptq import HessianAccumulator, gptq_quantize, rtn_quantize

DEFAULT_HESSIAN_BUDGET_BYTES = 2 << 30
# GPTQ settings of Quamba2 (quamba.md section 2.6).
PERCDAMP = 0.01
BITS = 4

# A reference model factory: observer -> an object whose ``logits(ids)`` runs one sample.
ReferenceFactory = Callable[[Callable[[int, str, torch.Tensor], None]], object]


def pack_w4(q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 values in [-8, 7] [N, K] and group scales -> the pack-quantized tensors."""
    return {
        "weight_packed": pack_to_int32(q.to(torch.int8).contiguous(), BITS),
        "weight_scale": scale.to(torch.float32).contiguous(),
        "weight_shape": torch.tensor(q.shape, dtype=torch.int64),
    }


def rtn_w4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Round-to-nearest 4-bit: the naive baseline, and Quamba's choice for Mamba1's x_proj."""
    return pack_w4(*rtn_quantize(weight.float(), BITS, w4_group_size(weight.shape[1])))


def _layer_chunks(layers: list[int], bytes_per_layer: int, budget: int) -> Iterable[list[int]]:
    per_pass = max(1, budget // max(bytes_per_layer, 1))
    for start in range(0, len(layers), per_pass):
        yield layers[start:start + per_pass]


def gptq_linears(
    weights: dict[tuple[int, str], torch.Tensor],
    input_points: dict[str, str],
    make_reference: ReferenceFactory,
    samples: list[torch.Tensor],
    hessian_budget_bytes: int = DEFAULT_HESSIAN_BUDGET_BYTES,
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """GPTQ every ``weights[(layer, linear)]`` [N, K] on the calibration ``samples``.

    ``input_points`` maps an observer point to the linear whose input it is (e.g.
    ``{"in_proj_input": "in_proj"}``). Returns the pack-quantized tensors per (layer, linear).
    """
    point_of = {linear: point for point, linear in input_points.items()}
    layers = sorted({layer for layer, _ in weights})
    bytes_per_layer = max(
        sum(8 * w.shape[1] ** 2 for (l, _), w in weights.items() if l == layer) for layer in layers
    )
    chunks = list(_layer_chunks(layers, bytes_per_layer, hessian_budget_bytes))
    packed: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for index, chunk in enumerate(chunks):
        chunk_weights = {key: w for key, w in weights.items() if key[0] in chunk}
        desc = f"GPTQ Hessians {index + 1}/{len(chunks)}"
        packed.update(_gptq_chunk(chunk_weights, point_of, make_reference, samples, desc))
    return packed


def _gptq_chunk(weights, point_of, make_reference, samples, desc):
    """One calibration pass gathering these linears' Hessians, then GPTQ on each; the
    Hessians go when this returns."""
    hessians = {(layer, point_of[linear]): HessianAccumulator(w.shape[1]) for (layer, linear), w in weights.items()}
    reference = make_reference(_hessian_observer(hessians))
    for ids in tqdm(samples, desc=desc, unit="sample"):
        reference.logits(ids)
    packed = {}
    for (layer, linear), weight in tqdm(weights.items(), desc="GPTQ", unit="linear"):
        hessian = hessians[(layer, point_of[linear])].hessian
        q, scale = gptq_quantize(weight.float(), hessian, BITS, w4_group_size(weight.shape[1]), PERCDAMP)
        packed[(layer, linear)] = pack_w4(q, scale)
    return packed


def _hessian_observer(hessians: dict[tuple[int, str], HessianAccumulator]):
    def observe(layer: int, point: str, t: torch.Tensor) -> None:
        acc = hessians.get((layer, point))
        if acc is not None:
            acc.add(t)

    return observe


def replace_linear(quantized: dict, prefix: str, packed: dict[str, torch.Tensor]) -> None:
    """Swap a linear's int8 or fp weight for its pack-quantized tensors (keeping input_scale)."""
    for name in ("weight", "weight_scale"):
        quantized.pop(prefix + name, None)
    quantized.update({prefix + name: t for name, t in packed.items()})
