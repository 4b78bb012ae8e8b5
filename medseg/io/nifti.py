"""NIfTI-1/2 reading and writing with nibabel, keeping qform/sform codes, intent and dtype.

Geometry. NIfTI's world space is RAS+ already, so the Volume affine is nibabel's ``img.affine`` (the sform when its
code is set, else the qform) with no conversion. On writing, the affine goes into the sform, and into the qform too
when a qform can represent it (a rotation with positive spacings, no shear); otherwise the qform code is set to 0
so that no reader picks up an approximate qform. NIfTI stores the matrices as float32, so a round trip keeps the
affine to float32 precision (about 1e-5 mm for positions of a few hundred mm).

Shapes. ``(x, y)`` is a 2D image; ``(x, y, z)`` a 3D image (also with z = 1); ``(x, y, z, c)`` a 3D image with c
channels (or time points: refuse them with ``read_volume(..., max_channels=1)``); ``(x, y, z, 1, c)`` (ITK's vector
layout) c channels, 2D when z = 1. A 2D multi-channel volume is written as ``(x, y, 1, 1, c)`` with a vector intent.

Dtypes. The array's dtype is written unchanged, except bool (written as uint8) and int64, which many NIfTI readers
do not support: it is written as the smallest of uint8, int16, int32 that holds its values.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputError, MedsegError
from medseg.io.volume import Volume

__all__ = ["read_nifti", "write_nifti"]

log = logging.getLogger(__name__)


def read_nifti(path: str | Path) -> Volume:
    """Read a ``.nii``/``.nii.gz`` file into a channel-first :class:`Volume`.

    A 4D image becomes a multi-channel 3D volume (the 4th axis moves first); a 2D image (or 3D with one slice
    declared 2D by ``dim[0] == 2``) is 2D. RGB24/RGBA32 voxels become 3/4 channels.

    The header is checked before any voxel is read or decompressed: a grid larger than the voxel limit
    (:mod:`medseg.io.guard`), complex voxels, a zero voxel size where the geometry comes from ``pixdim`` (no sform),
    and an uncompressed file shorter than its header declares are refused.

    Raises:
        InputError: unreadable, truncated or non-NIfTI file, a refused header, or a non-invertible affine.
    """
    import nibabel as nib

    path = Path(path)
    warnings_: list[str] = []
    try:
        with _nibabel_quiet():
            img = nib.load(str(path))  # the header only: voxels are read below, once the header has been checked
            # the size nibabel will allocate comes from its (repaired) header, pixdim from the header as stored
            _check_header(path, img.header, _raw_header(path), warnings_)
            data = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (MemoryError, MedsegError):
        raise
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot be read as NIfTI ({type(exc).__name__}: {_first_line(exc)})",
                         "a valid .nii or .nii.gz file") from None
    hdr = img.header
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "has a non-invertible voxel-to-world affine", "a header with valid pixdim and qform/sform")
    file_shape = tuple(int(v) for v in data.shape)
    spatial_dims = 3
    if data.dtype.names:  # RGB24 / RGBA32: one structured value per voxel -> channels
        if data.ndim not in (2, 3):
            raise InputError(path, f"is an RGB image with {data.ndim} dimensions {data.shape}", "a 2D or 3D RGB image")
        array = np.stack([np.asarray(data[name]) for name in data.dtype.names], axis=0)
        spatial_dims = data.ndim
        file_shape = (*file_shape, len(data.dtype.names))
    elif data.ndim in (2, 3):
        array = data[None]
        spatial_dims = data.ndim
    elif data.ndim == 4:
        array = np.moveaxis(data, -1, 0)
    elif data.ndim == 5 and data.shape[3] == 1:
        array = np.moveaxis(data[:, :, :, 0, :], -1, 0)
        if data.shape[2] == 1:
            array, spatial_dims = array[:, :, :, 0], 2
    else:
        raise InputError(path, f"has {data.ndim} dimensions {data.shape}",
                         "a 2D, 3D or 4D (channels) image, or a 5D vector image (x, y, z, 1, c)")
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    meta = {
        "source": str(path),
        "format": "nifti",
        "qform_code": qcode,
        "sform_code": scode,
        "intent": _header_field(hdr.get_intent, path, "intent_code", warnings_),
        "disk_dtype": str(hdr.get_data_dtype()),
        "xyzt_units": _header_field(hdr.get_xyzt_units, path, "xyzt_units", warnings_),
        "file_shape": file_shape,
    }
    if warnings_:
        meta["warnings"] = warnings_
    return Volume(np.ascontiguousarray(array), affine, spatial_dims, meta)


def _header_field(getter, path: Path, name: str, warnings_: list[str]):
    """A descriptive header field, or None (with a warning) when its code is one nibabel does not know."""
    try:
        return getter()
    except (KeyError, ValueError, IndexError):
        msg = f"{path}: unknown {name} code ignored"
        log.warning(msg)
        warnings_.append(msg)
        return None


def _raw_header(path: Path):
    """The NIfTI-1/2 header exactly as stored (nibabel's loader silently repairs some fields), or None."""
    import struct

    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as fh:
            head = fh.read(540)
    except Exception:  # not gzip, unreadable: nib.load gives the one-line reason
        return None
    if len(head) < 348:
        return None
    for order in ("<", ">"):
        size = struct.unpack(order + "i", head[:4])[0]
        klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
        if klass is not None and len(head) >= size:
            try:
                return klass.from_fileobj(io.BytesIO(head[:size]), check=False)
            except Exception:
                return None
    # a damaged sizeof_hdr (nibabel repairs it): NIfTI-1, in the byte order whose dim[0] is plausible
    for order in ("<", ">"):
        if 1 <= struct.unpack(order + "h", head[40:42])[0] <= 7:
            fixed = struct.pack(order + "i", 348) + head[4:348]
            try:
                return nib.Nifti1Header.from_fileobj(io.BytesIO(fixed), check=False)
            except Exception:
                return None
    return None


def _check_header(path: Path, hdr, raw, warnings_: list[str]) -> None:
    """Refuse before reading: a grid over the voxel limit, complex voxels, a file shorter than declared, a zero
    voxel size where the geometry comes from pixdim.

    Args:
        hdr: the header nibabel loaded (and repaired: its shape and dtype are what nibabel will allocate).
        raw: the header as stored (:func:`_raw_header`), or None; its pixdim is checked (nibabel sets 0 to 1).
    """
    from medseg.io.guard import check_voxels

    try:
        shape = tuple(int(v) for v in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
    except Exception:  # a malformed dim or datatype field: reading the data gives the one-line reason
        return
    if dtype.kind == "c":
        raise InputError(path, f"holds complex voxel values ({dtype})",
                         "a real-valued image (save the magnitude, e.g. numpy.abs, first)")
    check_voxels(path, shape, len(dtype.names) if dtype.names else 1)
    if not path.name.lower().endswith(".gz"):
        try:
            offset = int(hdr.get_data_offset())
        except Exception:
            offset = 352
        need = offset + int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        have = path.stat().st_size
        if have < need:
            raise InputError(path, f"is truncated: its header declares {need - offset} bytes of voxel data from "
                             f"byte {offset}, the file holds {max(0, have - offset)}", "a complete .nii file")
    stored = raw if raw is not None else hdr
    if int(stored["sform_code"]) == 0:  # the affine then comes from pixdim (qform or the fallback)
        pixdim = np.asarray(stored["pixdim"], dtype=np.float64)
        k = min(len(shape), 3)
        bad = [i for i in range(1, k + 1) if not np.isfinite(pixdim[i]) or pixdim[i] == 0]
        if bad:
            raise InputError(path, f"declares voxel size {pixdim[bad[0]]:g} along axis {bad[0] - 1} (pixdim[{bad[0]}]) "
                             "and has no sform", "positive voxel sizes in pixdim[1..3] (fix the header; medseg does "
                             "not guess a voxel size)")
        neg = [i for i in range(1, k + 1) if pixdim[i] < 0]
        if neg:
            msg = f"{path}: negative voxel size in pixdim[{neg[0]}] taken as its absolute value"
            log.warning(msg)
            warnings_.append(msg)


@contextlib.contextmanager
def _nibabel_quiet():
    """nibabel logs its header repairs to stderr; medseg keeps them at debug level (its own checks come first)."""
    logger = logging.getLogger("nibabel")
    handler = _ToDebug()
    old = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    saved = [(h, h.level) for h in logging.getLogger("nibabel.global").handlers]
    for h, _ in saved:
        h.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old
        for h, level in saved:
            h.setLevel(level)


class _ToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.debug("nibabel: %s", record.getMessage())


def write_nifti(volume: Volume, path: str | Path, dtype: np.dtype | str | None = None) -> None:
    """Write ``volume`` as NIfTI, atomically (temporary name in the same folder, then rename).

    Args:
        volume: the volume; multi-channel volumes are written as 4D images.
        path: target ``.nii`` or ``.nii.gz``.
        dtype: on-disk dtype; default: the array's dtype (bool -> uint8; int64 -> the smallest of uint8, int16,
            int32 that holds the values).

    Raises:
        InputError: the affine is not invertible (it would make a file without usable geometry).
    """
    import nibabel as nib

    from medseg.io.atomic import atomic_path

    if not np.all(np.isfinite(volume.affine)) or abs(np.linalg.det(volume.affine[:3, :3])) < 1e-12:
        raise InputError(path, "cannot be written: the volume's affine is not invertible", "an invertible affine")
    arr = volume.array
    data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    vector_2d = volume.spatial_dims == 2 and arr.shape[0] != 1
    if vector_2d:
        data = data[:, :, None, None, :]  # 2D multi-channel: x, y, 1, 1, c (ITK's vector layout)
    out_dtype = np.dtype(dtype) if dtype is not None else data.dtype
    if out_dtype == np.bool_:
        out_dtype = np.dtype(np.uint8)
    if out_dtype == np.int64 and dtype is None:
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        out_dtype = next((np.dtype(t) for t in (np.uint8, np.int16, np.int32)
                          if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max), np.dtype(np.int64))
    if out_dtype != data.dtype:  # cast here (rounding to integers) so that nibabel never adds scl_slope scaling
        data = np.rint(data).astype(out_dtype) if (np.issubdtype(out_dtype, np.integer)
                                                   and np.issubdtype(data.dtype, np.floating)) \
            else data.astype(out_dtype)
    img = nib.Nifti1Image(data, volume.affine, dtype=out_dtype)
    hdr = img.header
    meta = volume.meta
    qcode = int(meta.get("qform_code", 1)) or 0
    scode = int(meta.get("sform_code", 1)) or 0
    if qcode == 0 and scode == 0:
        scode = 1  # never write a file without world geometry
    img.set_sform(volume.affine, code=scode)
    img.set_qform(volume.affine, code=qcode or 1)
    if not np.allclose(hdr.get_qform(), volume.affine, atol=1e-4):
        log.debug("affine has shear or a reflection a qform cannot hold: writing the sform only")
        img.set_qform(None, code=0)
        if scode == 0:
            img.set_sform(volume.affine, code=1)
    elif qcode == 0:
        img.set_qform(volume.affine, code=0)
    intent = meta.get("intent")
    if vector_2d:
        hdr.set_intent("vector")
    elif intent and intent[0] not in ("none", None) and dtype is None:
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
