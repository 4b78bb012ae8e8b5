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


def read_volume(path: str | Path, **kwargs) -> Volume:
    """Read any supported image into a :class:`Volume` (format chosen from the path).

    Args:
        path: file, or folder holding a DICOM series.
        **kwargs: passed to the format's reader (e.g. ``series_uid`` for DICOM, ``spacing`` for PNG).

    Raises:
        InputError: missing, unreadable or invalid input, with a one-line explanation.
    """
    p = Path(path)
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
    from medseg.io.dicom import read_dicom_series

    return read_dicom_series(p, **kwargs)


def write_volume(volume: Volume, path: str | Path, **kwargs) -> None:
    """Write ``volume`` atomically to ``path`` in the format its suffix names (NIfTI, NRRD, MHA, PNG, TIFF)."""
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
