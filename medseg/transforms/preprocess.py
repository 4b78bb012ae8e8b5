"""Plan-space preprocessing of one case and its exact inverse.

``preprocess_volume``: reorient to RAS (exact permutation/flip) -> crop to the nonzero bounding box -> map the
label's file values to class indices (the plan's ``label_values``) -> resample to the configuration's spacing
(image linear, label nearest; an anisotropic case -- coarsest axis > 3x finest -- has its coarse axis resampled
on its own with nearest, in-plane linear, as nnU-Net's separate-z) -> normalise per channel as the plan says.
``restore_original`` maps a plan-space array back: resample to the cropped shape, pad into the reoriented grid,
undo the reorientation -- giving the input's exact shape and voxel order, so ``volume.with_array(...)`` carries
the input's geometry. ``restore_label`` does the same for probabilities and takes the argmax on the input's grid,
in bounded slabs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from medseg.errors import ConfigError, InputError
from medseg.io import Volume
from medseg.planning.schema import Normalization, Plan
from medseg.transforms.case import from_ras, to_ras
from medseg.transforms.labels import encode_labels

__all__ = ["preprocess_volume", "restore_original", "restore_label", "normalize", "resample_array", "separate_axis",
           "ANISOTROPY_RATIO"]

log = logging.getLogger(__name__)


#: A case is anisotropic when its coarsest axis spacing exceeds this many times its finest (nnU-Net's rule).
ANISOTROPY_RATIO = 3.0


def separate_axis(spacing: Sequence[float | None], target: Sequence[float | None] | None = None) -> int | None:
    """The axis to resample on its own (nnU-Net's separate-z): the coarsest axis of an anisotropic spacing.

    The case's own spacing (RAS voxel axes) decides first; a case that is isotropic itself but goes to an
    anisotropic target spacing uses the target's coarsest axis. ``None`` entries (axes not resampled) and 2D
    spacings never give a separate axis.

    Args:
        spacing: the case's spacing per voxel axis.
        target: the configuration's spacing, or None.

    Returns:
        The axis index, or None when neither spacing is anisotropic (coarsest <= 3x finest).
    """
    for sp in (spacing, target):
        if sp is None or len(sp) != 3 or any(s is None for s in sp):
            continue
        vals = np.asarray([float(s) for s in sp])  # type: ignore[arg-type]
        if vals.max() > ANISOTROPY_RATIO * vals.min():
            return int(np.argmax(vals))
    return None


def _axis_source(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``(i0, i1)`` and weight ``w`` of ``i1`` for each output index along one axis.

    The mapping is ``torch.nn.functional.interpolate``'s with ``align_corners=False``: linear reads
    ``x = (i + 0.5) * n_in / n_out - 0.5`` (clamped at the edges), nearest-exact ``floor((i + 0.5) * n_in / n_out)``.
    """
    scale = n_in / n_out
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    if mode == "nearest":
        i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
        return i0, i0, np.zeros(n_out, dtype=np.float32)
    x = np.maximum(pos - 0.5, 0.0)
    i0 = np.minimum(np.floor(x).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (x - i0).astype(np.float32)


def _resample_axis(t: Any, axis: int, size: int, mode: str) -> Any:
    """Resample a float tensor along one ``axis`` to ``size`` (``linear`` or ``nearest``)."""
    import torch

    n_in = int(t.shape[axis])
    if n_in == size:
        return t
    i0, i1, w = _axis_source(n_in, size, mode)
    a = t.index_select(axis, torch.from_numpy(i0).to(t.device))
    if mode == "nearest":
        return a
    b = t.index_select(axis, torch.from_numpy(i1).to(t.device))
    shape = [1] * t.ndim
    shape[axis] = size
    wt = torch.from_numpy(w).to(t.device, t.dtype).reshape(shape)
    return a.add_((b - a).mul_(wt))


def _resample_separable(t: Any, shape: Sequence[int], modes: Sequence[str]) -> Any:
    """Resample the spatial axes of a channel-first tensor one axis at a time (each its own mode).

    Linear per axis is exactly multilinear interpolation (it is separable); shrinking axes go first so the
    intermediates stay small.
    """
    order = sorted(range(len(shape)), key=lambda d: shape[d] / max(1, t.shape[1 + d]))
    for d in order:
        t = _resample_axis(t, 1 + d, int(shape[d]), modes[d])
    return t


def resample_array(array: np.ndarray, shape: tuple[int, ...] | list[int], *, is_label: bool,
                   separate: int | None = None) -> np.ndarray:
    """Resample a channel-first array to ``shape`` (image: (bi/tri)linear, label: nearest-exact).

    Uses ``torch.nn.functional.interpolate``'s mapping with ``align_corners=False`` (voxel centres scale about
    the grid's outer edges), the same mapping :func:`restore_original` inverts, whatever the interpolation.

    Args:
        array: ``(C, *spatial)``.
        shape: the new spatial shape.
        is_label: nearest-exact on every axis (the dtype is kept).
        separate: for images of anisotropic cases (:func:`separate_axis`): this axis is resampled on its own with
            nearest, the in-plane axes linearly (nnU-Net's separate-z resampling); None = trilinear.

    Returns:
        The resampled array (labels keep their dtype, images float32).
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
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if separate is not None:
        modes = ["nearest" if d == separate else "linear" for d in range(nd)]
        return _resample_separable(t, shape, modes).numpy()
    mode = "trilinear" if nd == 3 else "bilinear"
    return F.interpolate(t[None], size=shape, mode=mode, align_corners=False)[0].numpy()


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
        label: its label map on the same grid (the data's own values, those of ``plan.label_values``), or None.

    Returns:
        ``(image float32 (C, *s), label int16 (1, *s) class indices or None, props)``; ``props`` is
        JSON-serialisable and
        holds everything :func:`restore_original` needs, plus ``affine`` (the plan-space voxel-to-world affine).

    Raises:
        InputError: channel count or dimensionality differ from the plan, the label grid differs, or the label
            holds a value that is not one of the plan's ``label_values``.
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
        classes = encode_labels(np.asarray(label.array), plan.label_values, label.meta.get("source"),
                                ignore_value=plan.ignore_value)
        seg, _, _ = to_ras(classes, label.affine, image.spatial_dims)
    spacing = np.linalg.norm(affine[:3, : image.spatial_dims], axis=0)
    # an "acquisition" frame plan (cases of one data set stored in different orientations): this case's axes are
    # permuted so that its own coarse axis comes last, as the plan's spacing, patch and network expect
    perm = list(range(image.spatial_dims))
    if cfg.frame == "acquisition":
        from medseg.planning.plan import acquisition_permutation

        perm = acquisition_permutation(spacing.tolist())
    if perm != sorted(perm):
        axes = [0] + [p + 1 for p in perm]
        arr = np.ascontiguousarray(arr.transpose(axes))
        seg = None if seg is None else np.ascontiguousarray(seg.transpose(axes))
        affine = affine.copy()
        affine[:, : image.spatial_dims] = affine[:, perm]
        spacing = spacing[perm]
    ras_shape = arr.shape[1:]

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
    from medseg.io.guard import check_resampled

    # an absurd spacing would make the resampler allocate terabytes: refused in one line before it does
    check_resampled(src, crop_shape, spacing.tolist(), target, image.channels + (0 if label is None else 1),
                    purpose=f"for configuration {config_name}")
    new_shape = _target_shape(crop_shape, spacing, target)
    sep = separate_axis(spacing.tolist(), target) if image.spatial_dims == 3 else None
    arr = resample_array(arr, new_shape, is_label=False, separate=sep)
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
        "separate_axis": sep,
        "frame_perm": [int(p) for p in perm],
    }
    return np.ascontiguousarray(arr, dtype=np.float32), seg, props


def _to_input_grid(full: np.ndarray, props: dict[str, Any]) -> np.ndarray:
    """A ``(C, *frame shape)`` array back into the input's voxel order: undo the frame permutation, then RAS."""
    perm = props.get("frame_perm")  # absent in props of the first release: RAS frame
    if perm and list(perm) != sorted(perm):
        full = full.transpose([0] + [int(i) + 1 for i in np.argsort(perm)])
    return from_ras(full, props["ornt"])


def restore_original(array: np.ndarray, props: dict[str, Any], *, is_label: bool,
                     background_channel: bool = True) -> np.ndarray:
    """Map a plan-space array back onto the input's original grid (shape and voxel order).

    Args:
        array: ``(C, *props["shape"])``: a label map (``C == 1``, integers) or per-class probabilities ``(K, ...)``.
        props: the ``props`` returned by :func:`preprocess_volume` for this input.
        is_label: nearest resampling and zero fill for labels; linear resampling for probabilities, with the
            region outside the nonzero crop filled as certain background (channel 0 = 1, others 0).
        background_channel: probabilities have a background channel 0 (softmax classes); False for region
            probabilities, which are all 0 outside the crop.

    Returns:
        Array ``(C, *props["original_shape"])`` (labels keep their dtype, probabilities float32).

    Raises:
        ValueError: ``array`` does not have the plan-space shape recorded in ``props``.
    """
    shape = tuple(props["shape"])
    if tuple(array.shape[1:]) != shape:
        raise ValueError(f"array spatial shape {tuple(array.shape[1:])} differs from the plan-space shape {shape}")
    crop = resample_array(array if is_label else array.astype(np.float32), props["crop_shape"], is_label=is_label,
                          separate=props.get("separate_axis"))
    ras_shape = tuple(props["ras_shape"])
    full = np.zeros((array.shape[0], *ras_shape), dtype=crop.dtype)
    if not is_label and array.shape[0] > 1 and background_channel:
        full[0] = 1.0
    lo, hi = props["bbox"]
    full[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))] = crop
    out = _to_input_grid(full, props)
    if tuple(out.shape[1:]) != tuple(props["original_shape"]):  # pragma: no cover - guards a logic error
        raise AssertionError(f"restored shape {out.shape[1:]} != original {props['original_shape']}")
    return out


def restore_label(prob: Any, props: dict[str, Any], *, chunk_voxels: int = 2**22,
                  decide: Callable[[Any], Any] | None = None) -> np.ndarray:
    """The class-index label on the input's original grid, by resampling probabilities there and taking the argmax.

    Resampling class probabilities (or logits) and deciding on the fine grid gives smooth boundaries where a case
    is finer than the plan's spacing (nearest-resampling the plan-space argmax gives blocky ones). The resampling
    is :func:`restore_original`'s (linear; the separate axis of an anisotropic case nearest), done in slabs along
    the first spatial axis, so besides the input only one slab of ``K x chunk_voxels`` floats is held at a time.

    Args:
        prob: ``(K, *props["shape"])`` probabilities or logits (numpy or a torch tensor, on any device: the work
            runs there).
        props: the ``props`` :func:`preprocess_volume` returned for this input.
        chunk_voxels: the slab size, in voxels per class.
        decide: ``(K, *slab) probabilities -> (*slab) int16 class indices`` on the input's grid; default the
            argmax over channels (regions: :func:`medseg.transforms.regions.paint_regions`).

    Returns:
        int16 ``(1, *props["original_shape"])`` class indices (0 outside the nonzero crop).

    Raises:
        ValueError: ``prob`` does not have the plan-space shape recorded in ``props``.
    """
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(prob)
    shape = tuple(props["shape"])
    if tuple(t.shape[1:]) != shape:
        raise ValueError(f"array spatial shape {tuple(t.shape[1:])} differs from the plan-space shape {shape}")
    if not t.is_floating_point():
        t = t.float()
    crop_shape = tuple(int(s) for s in props["crop_shape"])
    sep = props.get("separate_axis")
    modes = ["nearest" if d == sep else "linear" for d in range(len(crop_shape))]
    i0, i1, w = _axis_source(shape[0], crop_shape[0], modes[0])
    rest = int(np.prod(crop_shape[1:])) if len(crop_shape) > 1 else 1
    rest_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    step = max(1, chunk_voxels // max(rest, rest_in))
    crop = np.empty(crop_shape, dtype=np.int16)
    idx0, idx1 = torch.from_numpy(i0).to(t.device), torch.from_numpy(i1).to(t.device)
    wt = torch.from_numpy(w).to(t.device, t.dtype)
    if decide is None:
        def decide(p: Any) -> Any:
            return p.argmax(0).to(torch.int16)
    for a in range(0, crop_shape[0], step):
        b = min(a + step, crop_shape[0])
        slab = t.index_select(1, idx0[a:b])
        if modes[0] == "linear":
            other = t.index_select(1, idx1[a:b])
            slab.add_((other - slab).mul_(wt[a:b].reshape(1, -1, *([1] * (len(shape) - 1)))))
        if len(crop_shape) > 1 and all(m == "linear" for m in modes[1:]) and slab.shape[2:] != crop_shape[1:]:
            mode = "bilinear" if len(crop_shape) == 3 else "linear"  # the slab's rows as the batch: one call
            slab = F.interpolate(slab.movedim(1, 0), size=crop_shape[1:], mode=mode, align_corners=False)
            crop[a:b] = decide(slab.movedim(0, 1)).cpu().numpy()
        else:
            slab = _resample_separable(slab, (b - a, *crop_shape[1:]), modes)
            crop[a:b] = decide(slab).cpu().numpy()
    full = np.zeros((1, *props["ras_shape"]), dtype=np.int16)
    lo, hi = props["bbox"]
    full[(slice(None),) + tuple(slice(x, y) for x, y in zip(lo, hi))] = crop[None]
    return _to_input_grid(full, props)
