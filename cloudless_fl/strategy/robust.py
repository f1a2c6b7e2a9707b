"""Robust aggregation of the regions' updates: one bad region cannot drag the average anywhere.

A mean follows any single update as far as it goes (× −10 or × 1e4 of an honest
one moves the model as far); a coordinate-wise median or a trimmed mean is
bounded by the honest updates as long as fewer than half (median) or fewer
than `trim` of each side (trimmed mean) are bad (Yin et al. 2018,
arXiv 1803.01498). The cost: weights by data size are dropped (every region
counts once), and with non-IID data the median sits nearer the majority's
data. Flower's `FedMedian` and `FedTrimmedAvg` do the same for its FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

AGGREGATIONS = ("mean", "median", "trimmed_mean")


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per entry, the median over regions (the mean of the two middle values for an even count)."""
    return {k: torch.quantile(torch.stack([u[k] for u in updates]).float(), 0.5, dim=0).to(updates[0][k].dtype)
            for k in updates[0]}


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], trim: float) -> dict[str, torch.Tensor]:
    """Per entry, the mean over regions after dropping the `trim` fraction of largest and of smallest values."""
    cut = math.floor(trim * len(updates))
    if 2 * cut >= len(updates):
        raise ValueError(f"trim={trim} leaves nothing of {len(updates)} updates; use trim < 0.5")
    out = {}
    for k in updates[0]:
        values = torch.sort(torch.stack([u[k] for u in updates]), dim=0).values
        out[k] = values[cut:len(updates) - cut].mean(dim=0)
    return out
