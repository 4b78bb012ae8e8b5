"""One suffix -> reader/writer table: :func:`read_volume` and :func:`write_volume` pick the format by path."""

from __future__ import annotations

from pathlib import Path

from medseg.errors import InputError
from medseg.io.volume import Volume

__all__ = ["read_volume", "write_volume", "format_of"]


def format_of(path: str | Path) -> str:
    """The format name for a path: ``nifti``, ``nrrd``, ``mha``, ``png``, ``tiff`` or ``dicom`` (a folder)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    if name.endswith(".png"):
        return "png"
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    if name.endswith(".dcm") or p.is_dir():
        return "dicom"
    raise InputError(p, "has an unknown file type",
                     "a .nii/.nii.gz, .nrrd, .mha/.mhd, .png, .tif/.tiff file or a DICOM series folder")


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
        InputError: missing, unreadable or invalid input, or an image that does not meet the expectations, with a
            one-line explanation.
    """
    volume = _read(Path(path), strict_geometry, **kwargs)
    _check_expectations(volume, Path(path), spatial_dims, max_channels)
    return volume


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
        raise InputError(p, "does not exist")
    fmt = format_of(p)
    if fmt == "nifti":
        from medseg.io.nifti import read_nifti

        return read_nifti(p, **kwargs)
    if fmt in ("nrrd", "mha"):
        from medseg.io.itk import read_itk

        return read_itk(p, **kwargs)
    if fmt in ("png", "tiff"):
        from medseg.io.image2d import read_image2d

        return read_image2d(p, **kwargs)
    if p.is_file():
        from medseg.io.dicom_seg import is_dicom_seg, read_dicom_seg

        if is_dicom_seg(p):
            return read_dicom_seg(p, **kwargs)[0]
        from medseg.io.rtstruct import is_rtstruct, read_rtstruct

        if is_rtstruct(p):
            return read_rtstruct(p, strict_geometry=strict_geometry, **kwargs)[0]
    from medseg.io.dicom import read_dicom_series

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
    fmt = format_of(path) if not Path(path).is_dir() else "dicom"
    if fmt == "nifti":
        from medseg.io.nifti import write_nifti

        return write_nifti(volume, path, **kwargs)
    if fmt in ("nrrd", "mha"):
        from medseg.io.itk import write_itk

        return write_itk(volume, path, **kwargs)
    if fmt in ("png", "tiff"):
        from medseg.io.image2d import write_image2d

        return write_image2d(volume, path, **kwargs)
    raise InputError(path, "cannot be written: writing DICOM series is not supported",
                     "a .nii.gz, .nrrd, .mha, .png or .tif output path (DICOM-SEG via `medseg predict`)")
