"""Quamba2 sort-and-cluster of the SSM input x (quamba.md section 2.1).

Within each head the channels are sorted by their calibration statistic; within each SSD
group the heads are clustered (Ward agglomerative clustering of the L2-normalised sorted
profiles) into head groups, and inside each head group the sorted dim positions are
clustered by KMeans into contiguous dim groups. Each (SSD group, head group, dim group)
block then gets its own int8 scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans

from ..format import DIM_GROUPS, HEAD_GROUPS, Mamba2Shapes


@dataclasses.dataclass
class Reordering:
    head_index: torch.Tensor  # [H] new head -> old head
    channel_index: torch.Tensor  # [I] new channel -> old channel
    head_group_range: torch.Tensor  # [G, HG] int32 cumulative head-group sizes
    dim_group_range: torch.Tensor  # [G, HG, DG] int32 cumulative dim-group sizes


def _contiguous_sizes(labels: np.ndarray, n_clusters: int) -> list[int]:
    """Cluster sizes ordered by mean position, so that groups are contiguous ranges.

    KMeans on sorted profiles gives contiguous labels in practice (the reference asserts
    it); ordering by mean position keeps every group a range even when it does not.
    """
    positions = np.arange(len(labels))
    present = [c for c in range(n_clusters) if (labels == c).any()]
    order = sorted(present, key=lambda c: positions[labels == c].mean())
    return [int((labels == c).sum()) for c in order]


def _dim_groups(profiles: np.ndarray) -> list[int]:
    """profiles [heads, head_dim] (sorted, normalised) -> DG contiguous dim-group sizes."""
    points = profiles.T  # one point per sorted dim position, features = the heads
    head_dim = points.shape[0]
    init = points[[head_dim * k // DIM_GROUPS for k in range(DIM_GROUPS)]]
    labels = KMeans(DIM_GROUPS, init=init, n_init=1).fit_predict(points)
    sizes = _contiguous_sizes(labels, DIM_GROUPS)
    return sizes + [0] * (DIM_GROUPS - len(sizes))


def sort_and_cluster(channel_stat: torch.Tensor, shapes: Mamba2Shapes) -> Reordering:
    """channel_stat [I]: per-channel max over samples of mean |x| (x after conv and SiLU)."""
    G, P = shapes.n_groups, shapes.head_dim
    heads_per_group = shapes.num_heads // G
    stat = channel_stat.double().reshape(G, heads_per_group, P)
    sorted_stat, dim_order = torch.sort(stat, dim=-1, stable=True)
    profiles = (sorted_stat / sorted_stat.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()
    head_index, channel_index, head_ranges, dim_ranges = [], [], [], []
    for g in range(G):
        labels = AgglomerativeClustering(HEAD_GROUPS, linkage="ward").fit_predict(profiles[g])
        local_order = np.argsort(labels, kind="stable")
        sizes = np.bincount(labels, minlength=HEAD_GROUPS)
        head_ranges.append(np.cumsum(sizes))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        dim_ranges.append(
            [np.cumsum(_dim_groups(profiles[g][local_order[a:b]])) for a, b in zip(starts, starts[1:])]
        )
        for local in local_order:
            old_head = g * heads_per_group + int(local)
            head_index.append(old_head)
            channel_index.append(old_head * P + dim_order[g, local])
    return Reordering(
        head_index=torch.tensor(head_index),
        channel_index=torch.cat(channel_index),
        head_group_range=torch.tensor(np.array(head_ranges), dtype=torch.int32),
        dim_group_range=torch.tensor(np.array(dim_ranges), dtype=torch.int32),
    )


def group_absmax(
    values: torch.Tensor, reordering: Reordering, shapes: Mamba2Shapes
) -> torch.Tensor:
    """Reduce per-(head, dim, *rest) absmax [H, P, *rest] (already in the new order) to
    per-(SSD group, head group, dim group, *rest) maxima [G, HG, DG, *rest]."""
    G, P = shapes.n_groups, shapes.head_dim
    heads_per_group = shapes.num_heads // G
    grouped = values.reshape(G, heads_per_group, P, *values.shape[2:])
    rest = values.shape[2:]
    out = torch.zeros(G, HEAD_GROUPS, DIM_GROUPS, *rest, dtype=values.dtype)
    for g in range(G):
        h_start = 0
        for hg, h_end in enumerate(reordering.head_group_range[g].tolist()):
            d_start = 0
            for dg, d_end in enumerate(reordering.dim_group_range[g, hg].tolist()):
                block = grouped[g, h_start:h_end, d_start:d_end]
                if block.numel():
                    out[g, hg, dg] = block.abs().amax(dim=(0, 1))
                d_start = d_end
            h_start = h_end
    return out
