"""Plan-space preprocessing of one case and its exact inverse.

``preprocess_volume``: reorient to RAS (exact permutation/flip) -> crop to the nonzero bounding box -> resample
to the configuration's spacing (image linear, label nearest) -> normalise per channel as the plan says.
``restore_original`` maps a plan-space array back: resample to the cropped shape, pad into the reoriented grid,
undo the reorientation -- giving the input's exact shape and voxel order, so ``volume.with_array(...)`` carries
the input's geometry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medseg.errors import ConfigError, InputError
from medseg.io import Volume
from medseg.planning.schema import Normalization, Plan
from medseg.transforms.case import from_ras, to_ras

__all__ = ["preprocess_volume", "restore_original", "normalize", "resample_array"]

log = logging.getLogger(__name__)


def resample_array(array: np.ndarray, shape: tuple[int, ...] | list[int], *, is_label: bool) -> np.ndarray:
    """Resample a channel-first array to ``shape`` (image: (bi/tri)linear, label: nearest-exact).

    Uses ``torch.nn.functional.interpolate`` with ``align_corners=False`` (voxel centres scale about the
    grid's outer edges), the same mapping :func:`restore_original` inverts.
    """
    import torch
    import torch.nn.functional as F

    shape = tuple(int(s) for s in shape)
    if tuple(array.shape[1:]) == shape:
        return array
    nd = len(shape)
    if is_label:
        t = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32))[None]
        out = F.interpolate(t, size=shape, mode="nearest-exact")[0].numpy()
        return np.rint(out).astype(array.dtype)
    mode = "trilinear" if nd == 3 else "bilinear"
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return F.interpolate(t, size=shape, mode=mode, align_corners=False)[0].numpy()


def normalize(image: np.ndarray, schemes: Sequence[Normalization]) -> np.ndarray:
    """Normalise each channel as the plan's ``normalization`` entries say.

    Args:
        image: float32 ``(C, *spatial)``.
        schemes: one :class:`~medseg.planning.Normalization` per channel: ``ct`` (clip, then the data set's
            foreground mean/std), ``zscore`` (this image's mean/std), ``zscore_nonzero`` (mean/std inside the
            nonzero mask, zero outside) or ``none``.

    Returns:
        The normalised float32 array (a new array).

    Raises:
        ConfigError: channel count differs.
    """
    if len(schemes) != image.shape[0]:
        raise ConfigError("plan.normalization", f"{len(schemes)} entries",
                          f"one entry per image channel ({image.shape[0]})")
    out = np.empty(image.shape, dtype=np.float32)
    for c, s in enumerate(schemes):
        x = image[c].astype(np.float32, copy=True)
        if s.scheme == "ct":
            lo, hi = s.clip  # type: ignore[misc]
            np.clip(x, lo, hi, out=x)
            x -= float(s.mean)
            x /= max(float(s.std), 1e-8)
        elif s.scheme in ("zscore", "zscore_nonzero"):
            mask = x != 0 if s.scheme == "zscore_nonzero" else None
            vals = x[mask] if mask is not None else x
            if vals.size == 0:
                vals = x
            mean, std = float(vals.mean()), float(vals.std())
            if mask is not None:
                x[mask] = (x[mask] - mean) / max(std, 1e-8)
                x[~mask] = 0.0
            else:
                x = (x - mean) / max(std, 1e-8)
        out[c] = x
    return out


def _target_shape(shape: tuple[int, ...], spacing: np.ndarray, target: list[float | None]) -> tuple[int, ...]:
    out = []
    for n, sp, t in zip(shape, spacing, target):
        out.append(n if t is None else max(1, int(round(n * float(sp) / float(t)))))
    return tuple(out)


def preprocess_volume(
    image: Volume, plan: Plan | Mapping[str, Any], config_name: str, label: Volume | None = None
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Bring one case into the plan space of ``config_name``.

    Args:
        image: the case's image (channel-first Volume, all channels).
        plan: a :class:`~medseg.planning.Plan` (or a plan dict, validated here).
        config_name: e.g. ``"3d_fullres"`` or ``"2d"``.
        label: its label map on the same grid, or None.

    Returns:
        ``(image float32 (C, *s), label int16 (1, *s) or None, props)``; ``props`` is JSON-serialisable and
        holds everything :func:`restore_original` needs, plus ``affine`` (the plan-space voxel-to-world affine).

    Raises:
        InputError: channel count or dimensionality differ from the plan, or the label grid differs.
        ConfigError: unknown configuration.
    """
    plan = Plan.coerce(plan)
    cfg = plan.configuration(config_name)
    src = image.meta.get("source")
    if image.channels != plan.in_channels:
        raise InputError(src, f"has {image.channels} channels", f"{plan.in_channels} as in the plan")
    if image.spatial_dims != plan.spatial_dims:
        raise InputError(src, f"is {image.spatial_dims}D", f"a {plan.spatial_dims}D image as in the plan")
    if label is not None and label.shape != image.shape:
        raise InputError(label.meta.get("source"), f"label shape {label.shape} differs from image {image.shape}",
                         "a label on the image's voxel grid")
    arr, affine, ornt = to_ras(np.asarray(image.array, dtype=np.float32), image.affine, image.spatial_dims)
    seg = None
    if label is not None:
        seg, _, _ = to_ras(np.asarray(label.array).astype(np.int16), label.affine, image.spatial_dims)
    ras_shape = arr.shape[1:]
    spacing = np.linalg.norm(affine[:3, : image.spatial_dims], axis=0)

    # crop to the nonzero region of the image (any channel), as nnU-Net does
    from monai.transforms.utils import generate_spatial_bounding_box

    nonzero = np.any(arr != 0, axis=0, keepdims=True)
    if nonzero.any():
        lo, hi = generate_spatial_bounding_box(nonzero, select_fn=lambda x: x)
        lo, hi = [int(v) for v in lo], [int(v) for v in hi]
    else:
        lo, hi = [0] * len(ras_shape), list(ras_shape)
    sl = (slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))
    arr = arr[sl]
    seg = seg[sl] if seg is not None else None
    crop_shape = arr.shape[1:]

    target = cfg.spacing
    if len(target) != len(crop_shape):
        raise ConfigError(f"{config_name}.spacing", cfg.spacing, f"{len(crop_shape)} values")
    new_shape = _target_shape(crop_shape, spacing, target)
    arr = resample_array(arr, new_shape, is_label=False)
    if seg is not None:
        seg = resample_array(seg, new_shape, is_label=True).astype(np.int16)
    arr = normalize(arr, plan.normalization)

    # plan-space affine: crop offset, then align_corners=False scaling
    scale = np.array(crop_shape, dtype=float) / np.array(new_shape, dtype=float)
    m = np.eye(4)
    for d in range(len(crop_shape)):
        m[d, d] = scale[d]
        m[d, 3] = lo[d] + (scale[d] - 1.0) / 2.0
    props = {
        "original_shape": [int(s) for s in image.shape],
        "original_affine": image.affine.tolist(),
        "ornt": np.asarray(ornt).tolist(),
        "ras_shape": [int(s) for s in ras_shape],
        "bbox": [lo, hi],
        "crop_shape": [int(s) for s in crop_shape],
        "shape": [int(s) for s in new_shape],
        "original_spacing": [float(s) for s in spacing],
        "spacing": [float(s) * float(f) for s, f in zip(spacing, scale)],
        "affine": (affine @ m).tolist(),
        "spatial_dims": int(image.spatial_dims),
    }
    return np.ascontiguousarray(arr, dtype=np.float32), seg, props


def restore_original(array: np.ndarray, props: dict[str, Any], *, is_label: bool) -> np.ndarray:
    """Map a plan-space array back onto the input's original grid (shape and voxel order).

    Args:
        array: ``(C, *props["shape"])``: a label map (``C == 1``, integers) or per-class probabilities ``(K, ...)``.
        props: the ``props`` returned by :func:`preprocess_volume` for this input.
        is_label: nearest resampling and zero fill for labels; linear resampling for probabilities, with the
            region outside the nonzero crop filled as certain background (channel 0 = 1, others 0).

    Returns:
        Array ``(C, *props["original_shape"])`` (labels keep their dtype, probabilities float32).

    Raises:
        ValueError: ``array`` does not have the plan-space shape recorded in ``props``.
    """
    shape = tuple(props["shape"])
    if tuple(array.shape[1:]) != shape:
        raise ValueError(f"array spatial shape {tuple(array.shape[1:])} differs from the plan-space shape {shape}")
    crop = resample_array(array if is_label else array.astype(np.float32), props["crop_shape"], is_label=is_label)
    ras_shape = tuple(props["ras_shape"])
    full = np.zeros((array.shape[0], *ras_shape), dtype=crop.dtype)
    if not is_label and array.shape[0] > 1:
        full[0] = 1.0
    lo, hi = props["bbox"]
    full[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))] = crop
    out = from_ras(full, props["ornt"])
    if tuple(out.shape[1:]) != tuple(props["original_shape"]):  # pragma: no cover - guards a logic error
        raise AssertionError(f"restored shape {out.shape[1:]} != original {props['original_shape']}")
    return out
