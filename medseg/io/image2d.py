"""2D PNG and TIFF images (SimpleITK) for 2D data sets such as ultrasound or microscopy.

Geometry. These files carry no patient frame, so the affine is ``diag(sx, sy, 1, 1)``: voxel axis ``i`` is the
image column (left to right), ``j`` the row (top to bottom), spacing 1 unless the caller passes ``spacing=``
(any spacing stored in the file, e.g. a PNG pHYs chunk, is ignored on purpose: it is rarely a physical size).
The affine is taken as RAS as it is (no LPS flip), so the array is never mirrored. The array is
``(C, columns, rows)``: SimpleITK's ``(rows, columns)`` NumPy view transposed; RGB(A) pixels are channels.
A multi-page TIFF is a 3D volume with unit slice spacing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import Volume

__all__ = ["read_image2d", "write_image2d"]

log = logging.getLogger(__name__)

_PNG_DTYPES = (np.uint8, np.uint16)


def _spacing_tuple(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        values = (float(spacing),) * ndim  # type: ignore[arg-type]
    else:
        values = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
        if len(values) == 2 and ndim == 3:
            values = (*values, 1.0)
    if len(values) != ndim or any(not np.isfinite(v) or v <= 0 for v in values):
        from medseg.errors import ConfigError

        raise ConfigError("spacing", spacing, f"one or {ndim} positive numbers (mm)")
    return values


def read_image2d(path: str | Path, spacing: float | Sequence[float] | None = None) -> Volume:
    """Read a PNG or TIFF image into a 2D :class:`Volume` (or 3D for a multi-page TIFF).

    Args:
        path: ``.png``, ``.tif`` or ``.tiff`` file.
        spacing: pixel size in mm, one number or one per axis; default 1.

    Returns:
        The Volume ``(C, columns, rows)``; ``meta`` holds ``source`` and ``format``.

    Raises:
        InputError: missing or unreadable file.
        ConfigError: ``spacing`` is not one or one-per-axis positive numbers.
    """
    import SimpleITK as sitk

    from medseg.io.itk import read_sitk_image

    path = Path(path)
    img = read_sitk_image(path, geometry=False)  # PNG/TIFF geometry is not read
    dim = img.GetDimension()
    if dim == 3 and img.GetSize()[2] == 1:
        img = img[:, :, 0]
        dim = 2
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        array = np.transpose(arr, (dim, *range(dim - 1, -1, -1)))
    else:
        array = np.transpose(arr, tuple(range(dim - 1, -1, -1)))[None]
    affine = np.eye(4)
    affine[:dim, :dim] = np.diag(_spacing_tuple(spacing, dim))
    fmt = "png" if path.suffix.lower() == ".png" else "tiff"
    return Volume(np.ascontiguousarray(array), affine, dim, {"source": str(path), "format": fmt})


def write_image2d(volume: Volume, path: str | Path) -> None:
    """Write a 2D volume as PNG or TIFF, atomically (the geometry is not stored: these formats have none).

    Args:
        volume: a 2D volume with 1 (grey), 3 (RGB) or 4 (RGBA) channels. PNG takes uint8/uint16 (integer arrays
            whose values fit are converted; bool becomes 0/1 uint8); TIFF also takes float32.
        path: target ``.png``, ``.tif`` or ``.tiff``.

    Raises:
        InputError: a 3D volume for PNG, an unsupported channel count, or values the format cannot hold.
    """
    import SimpleITK as sitk

    from medseg.io.atomic import atomic_path

    path = Path(path)
    is_png = path.suffix.lower() == ".png"
    if volume.spatial_dims != 2 and is_png:
        raise InputError(path, f"cannot hold a {volume.spatial_dims}D volume {volume.shape}", "a 2D volume for PNG")
    if volume.channels not in (1, 3, 4):
        raise InputError(path, f"cannot hold {volume.channels} channels", "1 (grey), 3 (RGB) or 4 (RGBA) channels")
    arr = volume.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    allowed = _PNG_DTYPES if is_png else (*_PNG_DTYPES, np.int16, np.float32)
    if arr.dtype not in allowed:
        if np.issubdtype(arr.dtype, np.integer) and arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            target = next((t for t in allowed if np.issubdtype(t, np.integer)
                           and np.iinfo(t).min <= lo and hi <= np.iinfo(t).max), None)
        elif arr.dtype == np.float64 and not is_png:
            target = np.float32
        else:
            target = None
        if target is None:
            kinds = ", ".join(np.dtype(t).name for t in allowed)
            raise InputError(path, f"cannot store {arr.dtype} values in [{arr.min()}, {arr.max()}]",
                             f"an array of {kinds} (cast it first, or write .nii.gz)")
        arr = arr.astype(target)
    dim = volume.spatial_dims
    spatial = tuple(range(dim, 0, -1))
    if arr.shape[0] > 1:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (*spatial, 0))), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr[0], tuple(s - 1 for s in spatial))))
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp))
