"""NIfTI-1/2 reading and writing with nibabel, keeping qform/sform codes, intent and on-disk dtype."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import Volume

__all__ = ["read_nifti", "write_nifti"]

log = logging.getLogger(__name__)


def read_nifti(path: str | Path) -> Volume:
    """Read a ``.nii``/``.nii.gz`` file into a channel-first :class:`Volume`.

    A 4D image becomes a multi-channel 3D volume (the 4th axis moves first); a 2D image (or 3D with one slice
    declared 2D by ``dim[0] == 2``) is 2D.

    Raises:
        InputError: unreadable, truncated or non-NIfTI file, or a non-invertible affine.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot be read as NIfTI ({type(exc).__name__}: {_first_line(exc)})",
                         "a valid .nii or .nii.gz file") from None
    hdr = img.header
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "has a non-invertible voxel-to-world affine", "a header with valid pixdim and qform/sform")
    if data.ndim == 2:
        array = data[None]
    elif data.ndim == 3:
        array = data[None]
    elif data.ndim == 4:
        array = np.moveaxis(data, -1, 0)
    elif data.ndim == 5 and data.shape[3] == 1:
        array = np.moveaxis(data[:, :, :, 0, :], -1, 0)
    else:
        raise InputError(path, f"has {data.ndim} dimensions {data.shape}", "a 2D, 3D or 4D (channels) image")
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    meta = {
        "source": str(path),
        "format": "nifti",
        "qform_code": int(qcode),
        "sform_code": int(scode),
        "intent": hdr.get_intent(),
        "disk_dtype": str(hdr.get_data_dtype()),
        "xyzt_units": hdr.get_xyzt_units(),
    }
    return Volume(np.ascontiguousarray(array), affine, array.ndim - 1, meta)


def write_nifti(volume: Volume, path: str | Path, dtype: np.dtype | str | None = None) -> None:
    """Write ``volume`` as NIfTI, atomically (temporary name in the same folder, then rename).

    Args:
        volume: the volume; multi-channel volumes are written as 4D images.
        path: target ``.nii`` or ``.nii.gz``.
        dtype: on-disk dtype; default: the array's dtype (or the source header's dtype when the volume came from
            a NIfTI file and the array dtype is unchanged).
    """
    import nibabel as nib

    from medseg.io.atomic import atomic_path

    arr = volume.array
    data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if volume.spatial_dims == 2 and data.ndim == 3 and arr.shape[0] != 1:
        data = data[:, :, None, :]  # 2D multi-channel: x, y, 1, c
    img = nib.Nifti1Image(data, volume.affine)
    hdr = img.header
    meta = volume.meta
    out_dtype = np.dtype(dtype) if dtype is not None else data.dtype
    if out_dtype == np.bool_:
        out_dtype = np.dtype(np.uint8)
    if out_dtype == np.int64 and data.size and data.min() >= 0 and data.max() < 256:
        out_dtype = np.dtype(np.uint8)
    hdr.set_data_dtype(out_dtype)
    qcode = int(meta.get("qform_code", 1)) or 0
    scode = int(meta.get("sform_code", 1)) or 0
    if qcode == 0 and scode == 0:
        scode = 1  # never write a file without world geometry
    img.set_qform(volume.affine, code=qcode)
    img.set_sform(volume.affine, code=scode)
    intent = meta.get("intent")
    if intent and intent[0] not in ("none", None) and dtype is None:
        try:
            hdr.set_intent(intent[0], tuple(intent[1]), name=intent[2])
        except Exception:  # an intent that does not fit the new data is dropped, not fatal
            log.debug("dropping NIfTI intent %r", intent)
    units = meta.get("xyzt_units")
    if units:
        hdr.set_xyzt_units(*units)
    else:
        hdr.set_xyzt_units("mm")
    if np.issubdtype(out_dtype, np.integer):
        hdr.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no details"
