"""Per-case, per-class segmentation metrics, spacing-aware, on integer label maps.

:func:`compute_metrics` is what evaluation, the trainer's validation and ``medseg evaluate`` call. All distances
are in millimetres (the voxel spacing is applied), volumes in mL (areas in mm² for 2D images).

Definitions follow MONAI (which the tests check to 1e-6) and, for the overlap edge cases, nnU-Net:

* **Surface voxels** of a mask are the voxels removed by one binary erosion with the face-connected
  structuring element (``mask & ~erode(mask)``, voxels on the image border count as surface), exactly as
  MONAI's ``get_mask_edges`` without sub-voxel areas. Surface distances are exact Euclidean distances in mm
  between surface voxel centres (a distance transform over the structures' bounding box).
* **HD95**: MONAI's ``compute_hausdorff_distance(percentile=95)``: the 95th percentile (linear interpolation)
  of each directed set of surface distances, the larger of the two.
* **ASSD**: MONAI's ``compute_average_surface_distance(symmetric=True)``: the mean of both directed sets pooled.
* **NSD** (normalised surface Dice at ``tolerance_mm``): MONAI's ``compute_surface_dice`` (voxel counts, no
  sub-voxel areas): the fraction of surface voxels of both masks lying within the tolerance of the other.

Edge cases (``ref`` = reference mask of the class, ``pred`` = predicted mask):

===================  =============  =============  ===========  ============  ==========
case                 dice, iou      precision      recall       hd95, assd    nsd
===================  =============  =============  ===========  ============  ==========
both empty           NaN            NaN            NaN          NaN           NaN
ref empty only       0 (nnU-Net)    0              NaN          inf (MONAI)   0 (MONAI)
pred empty only      0              NaN            0            inf (MONAI)   0 (MONAI)
===================  =============  =============  ===========  ============  ==========

NaN means "undefined for this case": summaries leave it out and count it (``n_nan``). Dice/IoU follow nnU-Net
(NaN only when both are empty; MONAI's ``DiceMetric(ignore_empty=True)`` would instead give NaN whenever the
reference is empty, hiding false positives). Distances follow MONAI (inf when exactly one mask is empty);
summaries report the number of infinite values (``n_inf``) next to statistics of the finite ones. (MONAI's
HD95 gives NaN rather than inf in that case, an artefact of ``torch.quantile`` interpolating between
infinities; its plain Hausdorff distance and ASSD give inf, and so does our HD95.)
Accuracy, volumes and voxel counts are always defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "compute_metrics",
    "compute_region_metrics",
    "binary_metrics",
    "surface_distances",
    "metric_names",
    "HIGHER_IS_BETTER",
    "DEFAULT_NSD_TOLERANCE_MM",
]

#: Default tolerance of the normalised surface Dice, in mm.
DEFAULT_NSD_TOLERANCE_MM = 1.0

#: For each metric, whether a larger value is better (None: neither, e.g. a volume).
HIGHER_IS_BETTER: dict[str, bool | None] = {
    "dice": True,
    "iou": True,
    "accuracy": True,
    "precision": True,
    "recall": True,
    "hd95_mm": False,
    "assd_mm": False,
    "nsd": True,
    "volume_pred_ml": None,
    "volume_ref_ml": None,
    "volume_diff_ml": None,
    "area_pred_mm2": None,
    "area_ref_mm2": None,
    "area_diff_mm2": None,
    "n_pred": None,
    "n_ref": None,
}


def metric_names(spatial_dims: int = 3) -> tuple[str, ...]:
    """The metric keys :func:`compute_metrics` returns, in table order.

    Args:
        spatial_dims: 2 (volumes become areas in mm²) or 3.

    Returns:
        Tuple of metric names.
    """
    size = ("volume_pred_ml", "volume_ref_ml", "volume_diff_ml") if spatial_dims == 3 else (
        "area_pred_mm2", "area_ref_mm2", "area_diff_mm2")
    return ("dice", "iou", "accuracy", "precision", "recall", "hd95_mm", "assd_mm", "nsd", *size, "n_pred", "n_ref")


def _bbox_slices(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels (clipped to the array), or None when empty."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its face-connected erosion (border voxels are surface)."""
    if not mask.any():
        return mask.copy()
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm) between two binary masks.

    Args:
        pred: boolean mask (2D or 3D).
        ref: boolean mask of the same shape.
        spacing: voxel size in mm per axis.

    Returns:
        ``(pred_to_ref, ref_to_pred)``: for each surface voxel of ``pred`` the distance to the nearest surface
        voxel of ``ref``, and vice versa. When exactly one mask is empty the other's distances are ``inf``;
        when both are empty both arrays are empty.

    Raises:
        ValueError: shapes differ or ``spacing`` has the wrong length.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}D mask")
    box = _bbox_slices(pred | ref)
    if box is None:
        return np.zeros(0), np.zeros(0)
    pred_s, ref_s = _surface(pred[box]), _surface(ref[box])
    sampling = [float(s) for s in spacing]
    if not ref_s.any():
        return np.full(int(pred_s.sum()), np.inf), np.zeros(0)
    if not pred_s.any():
        return np.zeros(0), np.full(int(ref_s.sum()), np.inf)
    # exact nearest-surface-voxel distances by k-d trees over the surface points (in mm): the cost follows the
    # surface, not the bounding box, which scattered false positives can make the whole image (an EDT of the
    # box gives the same values, 2-10x slower; MONAI >= 1.4 does the same)
    from scipy.spatial import cKDTree

    scale = np.asarray(sampling, dtype=np.float64)
    p_idx, r_idx = np.argwhere(pred_s), np.argwhere(ref_s)

    def nearest(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        nn = cKDTree(dst * scale, leafsize=32).query(src * scale, k=1)[1]
        # the distance from integer offsets times the spacing, as the EDT computes it, so that a distance equal
        # to the NSD tolerance compares the same way (scaled coordinates would round differently)
        return np.sqrt((((src - dst[nn]) * scale) ** 2).sum(axis=1))

    return nearest(p_idx, r_idx), nearest(r_idx, p_idx)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def binary_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    valid: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics for one pair of binary masks (see the module docstring for definitions and edge cases).

    Args:
        pred: predicted boolean mask, 2D or 3D.
        ref: reference boolean mask of the same shape.
        spacing: voxel size in mm per spatial axis.
        nsd_tolerance_mm: tolerance of the normalised surface Dice.
        valid: boolean mask of the labelled voxels (the reference is not the ignore label), or None = all.
            Voxels outside it count in no metric: both masks are restricted to it, and accuracy is over it.

    Returns:
        ``{metric: value}`` with the keys of :func:`metric_names`.

    Raises:
        ValueError: shapes differ, ``spacing`` has the wrong length, or the tolerance is negative.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    n_voxels = pred.size
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        pred, ref, n_voxels = pred & valid, ref & valid, int(np.count_nonzero(valid))
    if nsd_tolerance_mm < 0 or not math.isfinite(nsd_tolerance_mm):
        raise ValueError(f"nsd_tolerance_mm must be a finite value >= 0, got {nsd_tolerance_mm}")
    d_pred, d_ref = surface_distances(pred, ref, spacing)
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(pred & ref))
    fp, fn = n_pred - tp, n_ref - tp
    tn = n_voxels - tp - fp - fn
    out: dict[str, float] = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "accuracy": _ratio(tp + tn, n_voxels),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }
    if d_pred.size + d_ref.size == 0:
        out.update(hd95_mm=math.nan, assd_mm=math.nan, nsd=math.nan)
    elif d_pred.size == 0 or d_ref.size == 0:  # exactly one mask empty
        out.update(hd95_mm=math.inf, assd_mm=math.inf, nsd=0.0)
    else:
        out["hd95_mm"] = float(max(np.quantile(d_pred, 0.95), np.quantile(d_ref, 0.95)))
        out["assd_mm"] = float((d_pred.sum() + d_ref.sum()) / (d_pred.size + d_ref.size))
        within = np.count_nonzero(d_pred <= nsd_tolerance_mm) + np.count_nonzero(d_ref <= nsd_tolerance_mm)
        out["nsd"] = float(within) / float(d_pred.size + d_ref.size)
    voxel = float(np.prod([float(s) for s in spacing]))
    if pred.ndim == 3:
        vp, vr = n_pred * voxel / 1000.0, n_ref * voxel / 1000.0
        out.update(volume_pred_ml=vp, volume_ref_ml=vr, volume_diff_ml=vp - vr)
    else:
        ap, ar = n_pred * voxel, n_ref * voxel
        out.update(area_pred_mm2=ap, area_ref_mm2=ar, area_diff_mm2=ap - ar)
    out.update(n_pred=float(n_pred), n_ref=float(n_ref))
    return out


def _label_pair(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Two label maps as spatial integer arrays of one shape (a leading channel of one dropped; float maps
    rounded), checked against the dimensionality ``len(spacing)``."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    nd = len(spacing)
    if nd not in (2, 3):
        raise ValueError(f"spacing must have 2 or 3 values, got {tuple(spacing)}")
    if pred.ndim == nd + 1 and pred.shape[0] == 1:
        pred = pred[0]
    if ref.ndim == nd + 1 and ref.shape[0] == 1:
        ref = ref[0]
    if pred.shape != ref.shape or pred.ndim != nd:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} must have the same {nd}D shape")
    if np.issubdtype(pred.dtype, np.floating) or np.issubdtype(ref.dtype, np.floating):
        pred, ref = np.rint(pred).astype(np.int64), np.rint(ref).astype(np.int64)
    return pred, ref


def compute_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Sequence[int] | Mapping[int, str],
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    ignore: int | None = None,
) -> dict[int, dict[str, float]]:
    """Metrics of every requested class of an integer label map against its reference.

    With ``ignore`` (the data set's ignore label), voxels where the reference holds it are left out of every
    metric: overlap counts and accuracy exactly; surface distances and volumes are those of the masks restricted
    to the labelled voxels (a predicted structure in an unlabelled region is neither right nor wrong).

    Args:
        pred: predicted label map, spatial ``(*spatial)`` or channel-first ``(1, *spatial)``.
        ref: reference label map of the same shape.
        spacing: voxel size in mm per spatial axis (``Volume.spacing``); its length sets 2D or 3D.
        labels: the class values to score (a sequence, or a ``{value: name}`` mapping; 0 is allowed).
        nsd_tolerance_mm: tolerance of the normalised surface Dice in mm.
        ignore: the reference value of unlabelled voxels, or None.

    Returns:
        ``{label: {metric: value}}``, metric keys as in :func:`metric_names` (NaN/inf per the edge-case table).

    Raises:
        ValueError: shapes differ, the spacing does not match the dimensionality, or no labels are given.
    """
    pred, ref = _label_pair(pred, ref, spacing)
    keys = [int(k) for k in (labels.keys() if isinstance(labels, Mapping) else labels)]
    if not keys:
        raise ValueError("labels is empty; expected at least one class value")
    valid = None if ignore is None else ref != int(ignore)
    return {
        k: binary_metrics(pred == k, ref == k, spacing, nsd_tolerance_mm=nsd_tolerance_mm, valid=valid)
        for k in keys if k != ignore
    }


def compute_region_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    regions: Sequence[Sequence[int]] | Sequence[Any],
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    ignore: int | None = None,
) -> dict[int, dict[str, float]]:
    """Metrics of every region (the union of its label values) of a label map against its reference.

    Region ``i`` (numbered from 1) is scored as the binary masks ``isin(pred, values_i)`` and ``isin(ref, values_i)``
    with :func:`binary_metrics`, so the result equals :func:`compute_metrics` of those masks as label 1.

    Args:
        pred: predicted label map (label values), spatial or ``(1, *spatial)``.
        ref: reference label map of the same shape.
        spacing: voxel size in mm per spatial axis.
        regions: each region's label values (or :class:`medseg.data.regions.Region` objects).
        nsd_tolerance_mm: tolerance of the normalised surface Dice in mm.
        ignore: the reference value of unlabelled voxels, left out of every metric, or None.

    Returns:
        ``{region number: {metric: value}}``.

    Raises:
        ValueError: shapes differ, the spacing does not match the dimensionality, or no regions are given.
    """
    from medseg.data.regions import region_masks

    pred, ref = _label_pair(pred, ref, spacing)
    if not regions:
        raise ValueError("regions is empty; expected at least one region")
    valid = None if ignore is None else ref != int(ignore)
    p_masks, r_masks = region_masks(pred, regions), region_masks(ref, regions)
    return {i + 1: binary_metrics(p, r, spacing, nsd_tolerance_mm=nsd_tolerance_mm, valid=valid)
            for i, (p, r) in enumerate(zip(p_masks, r_masks))}
