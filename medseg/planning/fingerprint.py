"""Dataset fingerprint: what planning needs to know about a data set, computed once from its files.

Per case (after exact reorientation to RAS, as preprocessing does): spacing, shape, shape after cropping to the
nonzero region (all channels and per channel), foreground intensity samples and whole-image 0.5/99.5 percentiles
per channel, the voxel count of every label value found, each foreground label's centroid relative to the
foreground's bounding box (the mirror-axis statistic) and the DICOM Modality tag. Aggregated: the label values
(those dataset.json declares and those the files hold, sorted; class index ``k`` is ``label_values[k]``),
per-channel foreground intensity statistics (mean, std, 0.5/99.5 percentiles), class frequencies per class index,
and the modality of each channel from the manifest (dataset.json).

Voxels holding the data set's ignore label (``Manifest.ignore_label``) are not a class: they are left out of
the label counts and class frequencies, the foreground intensity samples and the mirror-axis centroids, and
counted apart (``ignored_voxels``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.transforms.case import load_case, to_ras

__all__ = ["fingerprint", "case_fingerprint"]

log = logging.getLogger(__name__)

#: Foreground voxels sampled per case and channel for the intensity statistics (nnU-Net uses 10,000).
SAMPLES_PER_CASE = 10_000


def _bounds(mask: np.ndarray) -> list[tuple[int, int]] | None:
    """``[(first, last)]`` per axis of the True voxels (from per-axis projections), or None when there are none."""
    out = []
    for a in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(b for b in range(mask.ndim) if b != a)))
        if hit.size == 0:
            return None
        out.append((int(hit[0]), int(hit[-1])))
    return out


def _class_offsets(seg: np.ndarray, values: np.ndarray) -> dict[int, list[float]]:
    """Each foreground value's centroid relative to the foreground bounding box centre, per axis, in units of the
    box's half-extent (-1: at the low end of the axis, +1: at the high end)."""
    bounds = _bounds(seg > 0)
    if bounds is None:
        return {}
    box = seg[tuple(slice(lo, hi + 1) for lo, hi in bounds)]
    lo = np.array([b[0] for b in bounds], dtype=float)
    hi = np.array([b[1] for b in bounds], dtype=float)
    centre, half = (hi - lo) / 2.0, np.maximum((hi - lo) / 2.0, 0.5)  # in the box's coordinates
    out = {}
    for v in values:
        if v <= 0:
            continue
        centroid = np.array([p.mean() for p in np.nonzero(box == v)], dtype=float)
        out[int(v)] = [float(x) for x in (centroid - centre) / half]
    return out


def case_fingerprint(images: list, label: Any, seed: int = 0, label_names: Any = None,
                     ignore_label: int | None = None) -> dict[str, Any]:
    """Fingerprint of one case.

    Args:
        images: channel files of the case.
        label: label file or None (intensity statistics then use the nonzero region).
        seed: seed of the voxel sampling.
        label_names: name mapping of a DICOM-SEG / RTSTRUCT label (the case's ``label_names``).
        ignore_label: the value of unlabelled voxels, skipped by every label statistic (counted in
            ``ignored_voxels``), or None.

    Returns:
        dict with ``spacing``, ``shape``, ``cropped_shape``, ``crop_fraction`` (nonzero box of all channels /
        image), ``channel_crop_fraction`` (the same per channel), ``fg_samples`` (foreground voxels per channel),
        ``image_range`` (whole-image 0.5/99.5 percentiles per channel), ``label_counts`` (``{value: voxels}``),
        ``class_offsets`` (``{value: [offset per axis]}``, see :func:`_class_offsets`), ``dicom_modality``
        (the DICOM Modality tag of the first channel, or None), ``spatial_dims``, ``channels`` and
        ``ignored_voxels``. Spatial
        quantities are in RAS-reoriented voxel axes.

    Raises:
        InputError: a negative label value.
    """
    image, seg = load_case(list(images), label, label_names)
    arr, affine, _ = to_ras(image.array, image.affine, image.spatial_dims)
    spacing = np.linalg.norm(affine[:3, : image.spatial_dims], axis=0)
    nonzero = np.any(arr != 0, axis=0)

    def box(mask: np.ndarray) -> list[int]:
        bounds = _bounds(mask)
        return list(mask.shape) if bounds is None else [hi - lo + 1 for lo, hi in bounds]

    cropped = box(nonzero)
    size = max(1, int(np.prod(arr.shape[1:])))
    counts: dict[int, int] = {}
    offsets: dict[int, list[float]] = {}
    ignored = 0
    if seg is not None:
        s, _, _ = to_ras(seg.array, seg.affine, image.spatial_dims)
        values, cnt = np.unique(s, return_counts=True)
        if values.size and values[0] < 0:
            raise InputError(label, f"holds the negative label value {int(values[0])}",
                             "non-negative integer label values")
        counts = {int(v): int(c) for v, c in zip(values, cnt)}
        labelled = s[0]
        if ignore_label is not None:
            ignored = counts.pop(int(ignore_label), 0)
            labelled = np.where(labelled == ignore_label, 0, labelled)
            values = values[values != ignore_label]
        offsets = _class_offsets(labelled, values)
        fg = labelled > 0
    else:
        fg = nonzero
    rng = np.random.default_rng(seed)
    samples, ranges = [], []
    flat_pick = rng.choice(size, min(size, 10 * SAMPLES_PER_CASE), replace=False) if size > 10 * SAMPLES_PER_CASE \
        else slice(None)
    for c in range(arr.shape[0]):
        vals = arr[c][fg]
        if vals.size > SAMPLES_PER_CASE:
            vals = rng.choice(vals, SAMPLES_PER_CASE, replace=False)
        samples.append(vals.astype(np.float32))
        whole = arr[c].reshape(-1)[flat_pick]
        ranges.append([float(np.percentile(whole, 0.5)), float(np.percentile(whole, 99.5))])
    tag = image.meta.get("modality")
    return {
        "spacing": [float(v) for v in spacing],
        "shape": [int(v) for v in arr.shape[1:]],
        "cropped_shape": cropped,
        "crop_fraction": float(np.prod(cropped) / size),
        "channel_crop_fraction": [float(np.prod(box(arr[c] != 0)) / size) for c in range(arr.shape[0])],
        "fg_samples": samples,
        "image_range": ranges,
        "label_counts": counts,
        "class_offsets": offsets,
        "dicom_modality": str(tag).upper() if tag else None,
        "spatial_dims": int(image.spatial_dims),
        "channels": int(image.channels),
        "ignored_voxels": int(ignored),
    }


def fingerprint(manifest: Any, *, max_cases: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Fingerprint a data set described by a manifest.

    Args:
        manifest: a :class:`medseg.data.manifest.Manifest` (uses ``name``, ``cases``, ``labels``,
            ``channel_names``).
        max_cases: fingerprint at most this many cases (evenly spread), for huge data sets; None = all.
        seed: seed of the intensity sampling.

    Returns:
        A JSON-serialisable dict (see module docstring), including per-case ``spacings`` and ``shapes``.

    Raises:
        InputError: no labelled cases, mixed dimensionality or channel counts, unreadable files.
    """
    cases = [c for c in manifest.cases if c.label is not None]
    if not cases:
        raise InputError(getattr(manifest, "root", None), "has no labelled cases", "cases with label files")
    if max_cases is not None and len(cases) > max_cases:
        pick = np.linspace(0, len(cases) - 1, max_cases).round().astype(int)
        cases = [cases[i] for i in sorted(set(pick))]
    declared = {int(k): str(v) for k, v in manifest.labels.items()}
    ignore = getattr(manifest, "ignore_label", None)
    per_case = []
    for i, case in enumerate(cases):
        fp = case_fingerprint(case.images, case.label, seed=seed + i, label_names=getattr(case, "label_names", None),
                              ignore_label=ignore)
        if per_case and fp["spatial_dims"] != per_case[0]["spatial_dims"]:
            raise InputError(case.images[0], f"is {fp['spatial_dims']}D while earlier cases are "
                                             f"{per_case[0]['spatial_dims']}D", "one dimensionality per data set")
        if per_case and fp["channels"] != per_case[0]["channels"]:
            raise InputError(case.images[0], f"has {fp['channels']} channels, earlier cases "
                                             f"{per_case[0]['channels']}", "the same channels in every case")
        undeclared = sorted(set(fp["label_counts"]) - set(declared)) if declared else []
        if undeclared:
            raise InputError(case.label, f"holds label value(s) {undeclared} that dataset.json does not list",
                             "only the values listed in the data set's labels: " + ", ".join(map(str, declared)))
        per_case.append(fp)
    # the label values: those declared (dataset.json) and those found in the files; 0 is always background
    values = sorted(set(declared) | {v for fp in per_case for v in fp["label_counts"]} | {0})
    labels = {v: declared.get(v, "background" if v == 0 else f"label_{v}") for v in values}
    index = {v: k for k, v in enumerate(values)}
    channels = per_case[0]["channels"]
    intensity = []
    for c in range(channels):
        vals = np.concatenate([fp["fg_samples"][c] for fp in per_case]).astype(np.float64)
        if vals.size == 0:
            vals = np.zeros(1)
        intensity.append({
            "mean": float(vals.mean()), "std": float(vals.std()), "median": float(np.median(vals)),
            "min": float(vals.min()), "max": float(vals.max()),
            "percentile_00_5": float(np.percentile(vals, 0.5)),
            "percentile_99_5": float(np.percentile(vals, 99.5)),
        })
    counts = np.zeros(len(values), dtype=np.int64)
    for fp in per_case:
        for v, n in fp["label_counts"].items():
            counts[index[v]] += n
    channel_names = {int(k): str(v) for k, v in getattr(manifest, "channel_names", {}).items()}
    return {
        "dataset": str(manifest.name),
        "manifest_hash": manifest.hash() if hasattr(manifest, "hash") else None,
        "num_cases": len(per_case),
        "spatial_dims": per_case[0]["spatial_dims"],
        "channels": channels,
        "modalities": [channel_names.get(c, "unknown") for c in range(channels)],
        "dicom_modalities": [fp["dicom_modality"] for fp in per_case],
        "labels": {str(v): labels[v] for v in values},
        "label_values": values,
        "case_ids": [c.case_id for c in cases],
        "spacings": [fp["spacing"] for fp in per_case],
        "shapes": [fp["shape"] for fp in per_case],
        "cropped_shapes": [fp["cropped_shape"] for fp in per_case],
        "median_crop_fraction": float(np.median([fp["crop_fraction"] for fp in per_case])),
        "channel_crop_fraction": [float(np.median([fp["channel_crop_fraction"][c] for fp in per_case]))
                                  for c in range(channels)],
        "image_ranges": [[fp["image_range"][c] for fp in per_case] for c in range(channels)],
        "class_offsets": [[fp["class_offsets"].get(v) for v in values[1:]] for fp in per_case],
        "intensity": intensity,
        "class_voxels": [int(v) for v in counts],
        "ignore_value": None if ignore is None else int(ignore),
        "ignored_voxels": int(sum(fp["ignored_voxels"] for fp in per_case)),
        "class_frequency": [float(v) / max(1.0, float(counts.sum())) for v in counts],
        **({"regions": [r.to_dict() for r in manifest.regions]} if getattr(manifest, "regions", None) else {}),
    }
