"""NRRD (``.nrrd``/``.nhdr``) and MetaImage (``.mha``/``.mhd``) reading and writing with SimpleITK.

Geometry. ITK images live in LPS+ world coordinates with ``origin``, ``spacing`` and a ``direction`` matrix whose
columns are the world directions of the index axes; the voxel-to-world map is
``x_lps = origin + direction @ diag(spacing) @ index``. ITK's index order ``(i, j, k)`` is medseg's voxel order;
only its NumPy view is reversed (``GetArrayFromImage`` gives ``(k, j, i)``), so arrays are transposed. The RAS
affine is ``diag(-1, -1, 1, 1) @ affine_lps`` (:data:`medseg.io.volume.LPS_TO_RAS`); writing applies the same
matrix (it is its own inverse). NRRD files in other spaces (e.g. ``right-anterior-superior``) are converted to LPS by
ITK on reading, so every file ends in medseg's RAS.

Multi-component pixels (vector images) are channels. A 2D image whose affine lies in the world z = 0 plane is
written as a 2D ITK image; any other 2D volume is written as a one-slice 3D image so that no geometry is lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import LPS_TO_RAS, Volume

__all__ = ["read_itk", "write_itk", "volume_to_sitk", "sitk_to_volume"]

log = logging.getLogger(__name__)


def sitk_to_volume(img, meta: dict | None = None, *, path: str | Path | None = None) -> Volume:
    """Convert a SimpleITK image (2D or 3D, scalar or vector) to a :class:`Volume` with a RAS affine.

    Args:
        img: ``SimpleITK.Image``.
        meta: extra metadata for ``Volume.meta``.
        path: the source file, for error messages.

    Returns:
        The Volume.

    Raises:
        InputError: an image with other than 2 or 3 dimensions, or a non-invertible geometry.
    """
    import SimpleITK as sitk

    dim = img.GetDimension()
    if dim not in (2, 3):
        raise InputError(path, f"has {dim} dimensions {img.GetSize()}", "a 2D or 3D image")
    arr = sitk.GetArrayFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp > 1:  # (..., c) -> (c, i, j[, k])
        array = np.transpose(arr, (dim, *range(dim - 1, -1, -1)))
    else:
        array = np.transpose(arr, tuple(range(dim - 1, -1, -1)))[None]
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    affine = np.eye(4)
    affine[:dim, :dim] = direction @ np.diag(np.array(img.GetSpacing(), dtype=np.float64))
    affine[:dim, 3] = img.GetOrigin()
    affine = LPS_TO_RAS @ affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "has a non-invertible voxel-to-world geometry (zero spacing or singular direction)",
                         "an image with positive spacing and an invertible direction matrix")
    return Volume(np.ascontiguousarray(array), affine, dim, dict(meta or {}))


def read_itk(path: str | Path) -> Volume:
    """Read an NRRD or MetaImage file into a :class:`Volume` (RAS affine).

    Args:
        path: ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file.

    Returns:
        The Volume; ``meta`` holds ``source`` and ``format``.

    Raises:
        InputError: missing, unreadable or corrupt file, or unsupported dimensionality.
    """
    path = Path(path)
    img = read_sitk_image(path)
    fmt = "nrrd" if path.name.lower().endswith((".nrrd", ".nhdr")) else "mha"
    return sitk_to_volume(img, {"source": str(path), "format": fmt}, path=path)


def volume_to_sitk(volume: Volume):
    """Convert a :class:`Volume` to a SimpleITK image (LPS geometry; vector image when it has several channels).

    Args:
        volume: the volume.

    Returns:
        ``SimpleITK.Image``; 2D only when the 2D affine lies in the world z = 0 plane, else a one-slice 3D image.
    """
    import SimpleITK as sitk

    arr = volume.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    affine = LPS_TO_RAS @ volume.affine
    dim = volume.spatial_dims
    if dim == 2 and not (np.allclose(affine[2, :2], 0) and np.allclose(affine[:2, 2], 0)
                         and abs(affine[2, 3]) < 1e-9):
        arr = arr[..., None]
        dim = 3
    spatial = tuple(range(dim, 0, -1))  # channel-first (c, i, j[, k]) -> (k, j, i)
    if arr.shape[0] > 1:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (*spatial, 0))), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr[0], tuple(s - 1 for s in spatial))))
    m = affine[:dim, :dim]
    spacing = np.linalg.norm(m, axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (m / spacing).ravel()])
    img.SetOrigin([float(v) for v in affine[:dim, 3]])
    return img


def write_itk(volume: Volume, path: str | Path, dtype: np.dtype | str | None = None,
              compress: bool = True) -> None:
    """Write ``volume`` as NRRD or MetaImage, atomically.

    Args:
        volume: the volume (several channels become a vector image).
        path: target ``.nrrd`` or ``.mha`` (single-file formats only).
        dtype: on-disk dtype; default the array's dtype (bool is written as uint8).
        compress: gzip the pixel data.

    Raises:
        InputError: a ``.nhdr``/``.mhd`` target (a header + data pair cannot be written atomically).
    """
    import SimpleITK as sitk

    from medseg.io.atomic import atomic_path

    if Path(path).suffix.lower() in (".nhdr", ".mhd"):
        raise InputError(path, "is a detached-header format (header + separate data file)",
                         "a single-file .nrrd or .mha output path")
    if dtype is not None:
        volume = volume.with_array(volume.array.astype(dtype))
    img = volume_to_sitk(volume)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=compress)


def _itk_reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Description:" in ln:
            return ln.split("Description:", 1)[1].strip()[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _check_header_geometry(path: Path, reader, dim: int) -> None:
    """Refuse a direction that is not a matrix of direction cosines (unit columns), or a non-finite or singular
    direction x spacing, before the pixels are read: ITK's reader hangs in an SVD of a direction matrix holding
    huge or non-finite values (a MetaImage TransformMatrix entry of 1e308; found by fuzzing)."""
    direction = np.array(reader.GetDirection(), dtype=np.float64)
    spacing = np.array(reader.GetSpacing(), dtype=np.float64)
    origin = np.array(reader.GetOrigin(), dtype=np.float64)
    with np.errstate(all="ignore"):
        ok = direction.size == dim * dim and np.all(np.isfinite(direction)) and np.all(np.isfinite(origin))
        if ok:
            d = direction.reshape(dim, dim)
            m = d * spacing
            # direction cosines: unit columns (a TransformMatrix entry of -1e308 hangs ITK too)
            ok = (np.all(np.isfinite(m)) and np.allclose(np.linalg.norm(d, axis=0), 1.0, atol=1e-2)
                  and abs(np.linalg.det(m)) > 1e-12)
    if not ok:
        def fmt(values) -> str:
            return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

        raise InputError(path, "has a non-invertible or non-finite voxel-to-world geometry (spacing "
                         f"{fmt(spacing)}, direction {fmt(direction)})",
                         "an image with positive spacing and an invertible direction matrix")


def _check_metaimage_header(path: Path) -> None:
    """Refuse a MetaImage ``NDims`` that ITK's MetaIO cannot take: an out-of-range value crashes it with a
    segmentation fault in ``ReadImageInformation`` (found by fuzzing), so it is checked here first."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror})", "a readable file") from None
    for raw in head.split(b"\n"):
        key, sep, value = raw.partition(b"=")
        key = key.strip().lower()
        if key == b"elementdatafile":
            break
        if sep and key == b"ndims":
            text = value.strip().decode("latin-1")
            if not (text.isdigit() and 1 <= int(text) <= 8):
                raise InputError(path, f"declares NDims = {text[:20]!r}", "a MetaImage header with NDims 2 or 3")


def read_sitk_image(path: Path, *, geometry: bool = True):
    """``SimpleITK.ReadImage`` with medseg's one-line errors (shared by the NRRD/MHA and PNG/TIFF readers).

    The header is read first (``ReadImageInformation``) and its declared size checked against the voxel limit
    (:func:`medseg.io.guard.check_voxels`), so that no pixel buffer is allocated or decompressed for a file that
    declares more than the limit.

    Raises:
        InputError: missing, unreadable, corrupt or too large file; complex pixels.
    """
    import SimpleITK as sitk

    from medseg.io.guard import check_voxels

    if not path.is_file():
        raise InputError(path, "does not exist or is not a file")
    if path.suffix.lower() in (".mha", ".mhd"):
        _check_metaimage_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, f"cannot be read as an image ({_itk_reason(exc)})",
                         f"a valid {path.suffix} file") from None
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents() or 1)
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelIDValue())
    if "complex" in pixel_type.lower():
        raise InputError(path, f"holds complex voxel values ({pixel_type})",
                         "a real-valued image (save the magnitude first)")
    check_voxels(path, size, components)
    if geometry:
        _check_header_geometry(path, reader, len(size))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(path, f"cannot be read as an image ({_itk_reason(exc)})",
                         f"a valid {path.suffix} file") from None
