"""Dataset fingerprint: what planning needs to know about a data set, computed once from its files.

Per case (after exact reorientation to RAS, as preprocessing does): spacing, shape, shape after cropping to the
nonzero region, foreground intensity samples per channel and label voxel counts. Aggregated: median spacing and
shape, per-channel foreground intensity statistics (mean, std, 0.5/99.5 percentiles), class frequencies, and the
modality of each channel from the manifest (dataset.json).
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


def case_fingerprint(images: list, label: Any, num_classes: int, seed: int = 0, label_names: Any = None
                     ) -> dict[str, Any]:
    """Fingerprint of one case.

    Args:
        images: channel files of the case.
        label: label file or None (intensity statistics then use the nonzero region).
        num_classes: number of label values (``max label + 1``) to count.
        seed: seed of the foreground voxel sampling.
        label_names: name mapping of a DICOM-SEG / RTSTRUCT label (the case's ``label_names``).

    Returns:
        dict with ``spacing``, ``shape``, ``cropped_shape``, ``crop_fraction``, ``fg_samples`` (list per channel),
        ``class_counts`` and ``spatial_dims``.
    """
    image, seg = load_case(list(images), label, label_names)
    arr, affine, _ = to_ras(image.array, image.affine, image.spatial_dims)
    spacing = np.linalg.norm(affine[:3, : image.spatial_dims], axis=0)
    nonzero = np.any(arr != 0, axis=0)
    if nonzero.any():
        idx = np.nonzero(nonzero)
        cropped = [int(i.max() - i.min() + 1) for i in idx]
    else:
        cropped = list(arr.shape[1:])
    counts = [0] * num_classes
    if seg is not None:
        s, _, _ = to_ras(seg.array, seg.affine, image.spatial_dims)
        values, cnt = np.unique(s, return_counts=True)
        for v, c in zip(values, cnt):
            if v < 0 or v >= num_classes:
                raise InputError(label, f"holds label value {int(v)}",
                                 f"values 0..{num_classes - 1} as listed in the data set's labels")
            counts[int(v)] = int(c)
        fg = s[0] > 0
    else:
        fg = nonzero
    rng = np.random.default_rng(seed)
    samples = []
    for c in range(arr.shape[0]):
        vals = arr[c][fg]
        if vals.size > SAMPLES_PER_CASE:
            vals = rng.choice(vals, SAMPLES_PER_CASE, replace=False)
        samples.append(vals.astype(np.float32))
    return {
        "spacing": [float(v) for v in spacing],
        "shape": [int(v) for v in arr.shape[1:]],
        "cropped_shape": cropped,
        "crop_fraction": float(np.prod(cropped) / max(1, np.prod(arr.shape[1:]))),
        "fg_samples": samples,
        "class_counts": counts,
        "spatial_dims": int(image.spatial_dims),
        "channels": int(image.channels),
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
    labels = {int(k): str(v) for k, v in manifest.labels.items()}
    num_classes = max(labels) + 1 if labels else 2
    per_case = []
    for i, case in enumerate(cases):
        fp = case_fingerprint(case.images, case.label, num_classes, seed=seed + i,
                              label_names=getattr(case, "label_names", None))
        if per_case and fp["spatial_dims"] != per_case[0]["spatial_dims"]:
            raise InputError(case.images[0], f"is {fp['spatial_dims']}D while earlier cases are "
                                             f"{per_case[0]['spatial_dims']}D", "one dimensionality per data set")
        if per_case and fp["channels"] != per_case[0]["channels"]:
            raise InputError(case.images[0], f"has {fp['channels']} channels, earlier cases "
                                             f"{per_case[0]['channels']}", "the same channels in every case")
        per_case.append(fp)
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
    counts = np.sum([fp["class_counts"] for fp in per_case], axis=0)
    channel_names = {int(k): str(v) for k, v in getattr(manifest, "channel_names", {}).items()}
    return {
        "dataset": str(manifest.name),
        "manifest_hash": manifest.hash() if hasattr(manifest, "hash") else None,
        "num_cases": len(per_case),
        "spatial_dims": per_case[0]["spatial_dims"],
        "channels": channels,
        "modalities": [channel_names.get(c, "unknown") for c in range(channels)],
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "case_ids": [c.case_id for c in cases],
        "spacings": [fp["spacing"] for fp in per_case],
        "shapes": [fp["shape"] for fp in per_case],
        "cropped_shapes": [fp["cropped_shape"] for fp in per_case],
        "median_crop_fraction": float(np.median([fp["crop_fraction"] for fp in per_case])),
        "intensity": intensity,
        "class_voxels": [int(v) for v in counts],
        "class_frequency": [float(v) / max(1.0, float(counts.sum())) for v in counts],
    }
