"""Region targets and region predictions (region-based training; the declaration is :mod:`medseg.data.regions`).

The preprocessed cache keeps integer class indices; a region network's targets are made from them on the fly by
:func:`regions_onehot` (one channel per region: the voxel's class is one of the region's classes), in the loss
(:class:`medseg.losses.RegionLoss`) and in validation (:func:`region_dice`). A prediction of per-region
probabilities becomes one label map by :func:`paint_regions`: region ``i`` is painted with its
``regions_class_order`` class wherever its probability exceeds 0.5, in order, so later regions overwrite earlier
ones (nnU-Net v2's convention); a voxel in no region is background (class 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["regions_onehot", "paint_regions", "region_dice", "REGION_THRESHOLD"]

#: Probability above which a voxel belongs to a region (sigmoid 0.5: logit 0).
REGION_THRESHOLD = 0.5


def regions_onehot(target: torch.Tensor, region_classes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Region masks of an integer target: channel ``i`` is 1 where the class is one of region ``i``'s classes.

    Args:
        target: integer class indices ``(B, 1, *spatial)`` (the cache's values; the ignore index belongs to no
            region, so the loss must mask it out).
        region_classes: the class indices of each region (the plan's :meth:`~medseg.planning.Plan.region_classes`).

    Returns:
        float32 ``(B, R, *spatial)`` of 0 and 1, on ``target``'s device.
    """
    labels = target[:, 0].long()
    masks = [torch.isin(labels, torch.as_tensor(list(c), dtype=torch.long, device=labels.device))
             for c in region_classes]
    return torch.stack(masks, 1).float()


def paint_regions(prob: torch.Tensor, paint_classes: Sequence[int], *, logits: bool = False) -> torch.Tensor:
    """One label map from per-region probabilities, painted in order (later regions overwrite earlier ones).

    Args:
        prob: ``(R, *spatial)`` region probabilities (or logits with ``logits=True``).
        paint_classes: the class index painted for each region (its ``regions_class_order`` value's class).
        logits: ``prob`` holds logits: a voxel is in a region where its logit exceeds 0.

    Returns:
        int16 ``(*spatial)`` class indices, 0 where no region is predicted, on ``prob``'s device.
    """
    if prob.shape[0] != len(paint_classes):
        raise ValueError(f"{prob.shape[0]} region channels for {len(paint_classes)} painted classes")
    threshold = 0.0 if logits else REGION_THRESHOLD
    out = torch.zeros(prob.shape[1:], dtype=torch.int16, device=prob.device)
    for i, cls in enumerate(paint_classes):
        out[prob[i] > threshold] = int(cls)
    return out


def region_dice(logits: torch.Tensor, ref: np.ndarray, region_classes: Sequence[Sequence[int]],
                ignore_index: int | None = None) -> list[float]:
    """Dice of each region of a prediction (logit > 0) against the region masks of a reference.

    Args:
        logits: ``(R, *spatial)`` region logits.
        ref: ``(*spatial)`` class indices (the cache's values).
        region_classes: the class indices of each region.
        ignore_index: the class index of unlabelled voxels (left out), or None.

    Returns:
        ``R`` floats (NaN where prediction and reference are both empty).
    """
    ref_t = torch.as_tensor(np.asarray(ref), device=logits.device)[None, None]
    target = regions_onehot(ref_t, region_classes)[0].bool()
    pred = logits > 0
    if ignore_index is not None:
        pred &= ref_t[0] != int(ignore_index)
    out = []
    for p, r in zip(pred, target):
        denom = int(p.sum()) + int(r.sum())
        out.append(math.nan if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out
