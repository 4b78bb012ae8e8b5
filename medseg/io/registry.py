"""One format table: :data:`FORMATS` maps each format to its suffixes, reader and writer; :func:`read_volume` and
:func:`write_volume` pick the row by path, and every module that lists image files uses :data:`IMAGE_SUFFIXES` /
:func:`split_suffix` from here (data set discovery, batch prediction, evaluation).

Every read goes through the same checks whatever the format: the reader refuses a header that declares more voxels
than the memory limit before it allocates (:mod:`medseg.io.guard`), and :func:`read_volume` then refuses what
medseg cannot use (complex or structured voxels, a non-invertible voxel-to-world affine) and turns a
``MemoryError`` into a one-line :class:`~medseg.errors.InputError`.
"""

from __future__ import annotations

import importlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import Volume

log = logging.getLogger(__name__)

__all__ = ["ImageFormat", "FORMATS", "IMAGE_SUFFIXES", "PLANAR_SUFFIXES", "split_suffix", "format_of", "read_volume", "write_volume"]


@dataclass(frozen=True)
class ImageFormat:
    """One row of the format table.

    Args:
        name: the format's name (``Volume.meta["format"]`` of what its reader returns).
        suffixes: file name endings, lower case.
        reader: ``"module:function"`` taking ``(path, **kwargs)`` and returning a Volume.
        writer: ``"module:function"`` taking ``(volume, path, **kwargs)``, or None when medseg does not write it.
        listed: whether files with these suffixes are image files when a folder is listed (DICOM files are
            recognised by content and grouped into series instead).
        planar: a 2D picture format without patient geometry (PNG, TIFF): a data set of them is 2D.
    """

    name: str
    suffixes: tuple[str, ...]
    reader: str
    writer: str | None
    listed: bool = True
    planar: bool = False

    def load(self, which: str) -> Callable:
        """The reader (``which="reader"``) or writer function."""
        target = getattr(self, which)
        module, _, func = target.partition(":")
        return getattr(importlib.import_module(module), func)


#: The format table, in the order suffixes are tried.
FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("nifti", (".nii.gz", ".nii"), "medseg.io.nifti:read_nifti", "medseg.io.nifti:write_nifti"),
    ImageFormat("nrrd", (".nrrd", ".nhdr"), "medseg.io.itk:read_itk", "medseg.io.itk:write_itk"),
    ImageFormat("mha", (".mha", ".mhd"), "medseg.io.itk:read_itk", "medseg.io.itk:write_itk"),
    ImageFormat("png", (".png",), "medseg.io.image2d:read_image2d", "medseg.io.image2d:write_image2d", planar=True),
    ImageFormat("tiff", (".tiff", ".tif"), "medseg.io.image2d:read_image2d", "medseg.io.image2d:write_image2d",
                planar=True),
    ImageFormat("dicom", (".dcm",), "medseg.io.registry:_read_dicom", None, listed=False),
)
_BY_NAME = {f.name: f for f in FORMATS}

#: Endings of image files (every listed format), longest first so that ``.nii.gz`` wins over ``.gz``.
IMAGE_SUFFIXES: tuple[str, ...] = tuple(sorted((s for f in FORMATS if f.listed for s in f.suffixes),
                                               key=len, reverse=True))
#: Endings of the planar (2D picture) formats.
PLANAR_SUFFIXES: tuple[str, ...] = tuple(s for f in FORMATS if f.planar for s in f.suffixes)
_ALL_SUFFIXES = tuple(sorted((s for f in FORMATS for s in f.suffixes), key=len, reverse=True))
#: What readers raise on header values they did not anticipate (pydicom converts values lazily, on access).
_DAMAGED = (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, OverflowError,
            ZeroDivisionError, struct.error, UnicodeDecodeError)
_EXPECTED = "a .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, .png, .tif/.tiff file or a DICOM series folder"


def split_suffix(name: str) -> tuple[str, str]:
    """``"a_0000.nii.gz"`` -> ``("a_0000", ".nii.gz")``; ``("notes.txt", "")`` for a name that is no image file.

    The suffix keeps the name's own case (``"X.PNG"`` -> ``("X", ".PNG")``); matching ignores case.
    """
    low = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return name, ""


def _format_row(path: Path) -> ImageFormat | None:
    low = path.name.lower()
    for suffix in _ALL_SUFFIXES:
        if low.endswith(suffix):
            return next(f for f in FORMATS if suffix in f.suffixes)
    return None


def format_of(path: str | Path) -> str:
    """The format name for a path: ``nifti``, ``nrrd``, ``mha``, ``png``, ``tiff`` or ``dicom`` (a folder).

    Raises:
        InputError: a suffix no row of :data:`FORMATS` has.
    """
    p = Path(path)
    row = _format_row(p)
    if row is not None:
        return row.name
    if p.is_dir():
        return "dicom"
    raise InputError(p, "has an unknown file type", _EXPECTED)


def read_volume(path: str | Path, *, spatial_dims: int | None = None, max_channels: int | None = None,
                strict_geometry: bool = False, **kwargs) -> Volume:
    """Read any supported image into a :class:`Volume` (format chosen from the path).

    Args:
        path: file, or folder holding a DICOM series (a ``.dcm`` DICOM-SEG or RTSTRUCT file is read as a label map;
            an RTSTRUCT's referenced series must be in its folder or given as ``source_dir``).
        spatial_dims: if given (2 or 3), refuse images with another number of spatial dimensions.
        max_channels: if given, refuse images with more channels (e.g. ``1`` refuses a 4D NIfTI where a 3D image is
            expected).
        strict_geometry: refuse gantry-tilted or unevenly spaced DICOM series instead of resampling them
            (ignored for other formats).
        **kwargs: passed to the format's reader (e.g. ``series_uid`` for DICOM, ``spacing`` for PNG).

    Returns:
        The Volume (RAS affine, channel-first array).

    Raises:
        InputError: missing, unreadable or invalid input, an image larger than the voxel limit
            (:class:`medseg.io.guard.SizeLimitError`), or an image that does not meet the expectations, with a
            one-line explanation.
    """
    p = Path(path)
    try:
        volume = _read(p, strict_geometry, **kwargs)
    except MemoryError:
        raise InputError(p, "needs more memory than is available to read it", "a smaller image, or more memory "
                         "(--max-voxels lowers the limit that refuses such files before reading)") from None
    except _DAMAGED as exc:  # a header value no reader anticipated (found by fuzzing): still one line naming the file
        log.debug("reading %s failed", p, exc_info=True)
        detail = " ".join(str(exc).split())[:200] or "no details"
        raise InputError(p, f"cannot be read: a damaged or unusual header ({type(exc).__name__}: {detail})",
                         _EXPECTED) from None
    _check_volume(volume, p)
    _check_expectations(volume, p, spatial_dims, max_channels)
    return volume


def _check_volume(volume: Volume, path: Path) -> None:
    """What no reader may return: complex or structured voxels, a non-finite or singular affine."""
    dtype = volume.array.dtype
    if dtype.kind == "c":
        raise InputError(path, f"holds complex voxel values ({dtype})",
                         "a real-valued image (save the magnitude, e.g. numpy.abs, first)")
    if dtype.kind not in "biuf":
        raise InputError(path, f"holds voxels of type {dtype} that are not numbers", "an integer or float image")
    aff = volume.affine
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError(path, "has a non-invertible voxel-to-world geometry (zero or non-finite voxel size, or "
                         "singular direction)", "an image with positive voxel sizes and an invertible orientation")


def _check_expectations(volume: Volume, path: Path, spatial_dims: int | None, max_channels: int | None) -> None:
    file_shape = tuple(volume.meta.get("file_shape") or (volume.shape if volume.channels == 1
                                                          else (*volume.shape, volume.channels)))
    ndim = len(file_shape)
    if spatial_dims is not None and volume.spatial_dims != spatial_dims:
        raise InputError(path, f"is a {volume.spatial_dims}D image of shape {volume.shape}",
                         f"a {spatial_dims}D image")
    if max_channels is not None and volume.channels > max_channels:
        want = spatial_dims or volume.spatial_dims
        what = f"a {want}D image" if max_channels == 1 else f"a {want}D image with at most {max_channels} channels"
        raise InputError(path, f"has {ndim} dimensions {file_shape} ({volume.channels} channels or time points)",
                         what)


def _read(p: Path, strict_geometry: bool, **kwargs) -> Volume:
    if not p.exists():
        if p.is_symlink():
            raise InputError(p, "is a dangling symbolic link (or a link loop)", "a link to an existing image")
        raise InputError(p, "does not exist")
    row = _format_row(p)
    if row is None:
        if not p.is_dir():
            raise InputError(p, "has an unknown file type", _EXPECTED)
        row = _BY_NAME["dicom"]
    elif not p.is_file() and row.name != "dicom":
        raise InputError(p, "is not a regular file", f"a {row.name} image file")
    if row.name == "dicom":
        return _read_dicom(p, strict_geometry=strict_geometry, **kwargs)
    return row.load("reader")(p, **kwargs)


def _read_dicom(p: Path, *, strict_geometry: bool = False, **kwargs) -> Volume:
    """A DICOM series folder or single file; a DICOM-SEG or RTSTRUCT file is read as a label map."""
    from medseg.io.dicom import _read_header, read_dicom_series

    if p.is_file():
        ds = _read_header(p)
        if ds is not None and str(ds.get("Modality", "")).upper() == "SEG":
            from medseg.io.dicom_seg import read_dicom_seg
            from medseg.io.guard import check_voxels

            try:
                grid = (int(ds.Columns), int(ds.Rows), int(ds.get("NumberOfFrames", 1) or 1))
            except (AttributeError, TypeError, ValueError):
                raise InputError(p, "is a DICOM-SEG without valid Rows/Columns/NumberOfFrames",
                                 "a DICOM Segmentation object") from None
            check_voxels(p, grid)
            return read_dicom_seg(p, **kwargs)[0]
        from medseg.io.rtstruct import is_rtstruct, read_rtstruct

        if is_rtstruct(p):
            return read_rtstruct(p, strict_geometry=strict_geometry, **kwargs)[0]
    return read_dicom_series(p, strict_geometry=strict_geometry, **kwargs)


def write_volume(volume: Volume, path: str | Path, **kwargs) -> None:
    """Write ``volume`` atomically to ``path`` in the format its suffix names (NIfTI, NRRD, MHA, PNG, TIFF).

    Args:
        volume: the volume to write.
        path: target file; its suffix picks the format.
        **kwargs: passed to the format's writer (e.g. ``dtype``).

    Raises:
        InputError: an unknown suffix, a DICOM target (use :func:`medseg.io.dicom_seg.write_dicom_seg`), or data the
            format cannot hold.
    """
    p = Path(path)
    row = _format_row(p) if not p.is_dir() else _BY_NAME["dicom"]
    if row is None:
        raise InputError(p, "has an unknown file type", _EXPECTED)
    if row.writer is None:
        raise InputError(path, "cannot be written: writing DICOM series is not supported",
                         "a .nii.gz, .nrrd, .mha, .png or .tif output path (DICOM-SEG via `medseg predict`)")
    return row.load("writer")(volume, p, **kwargs)
