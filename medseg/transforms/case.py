"""Loading one case (all channels and its label) and reorienting it to RAS, exactly and reversibly.

Reorientation only permutes and flips voxel axes (nibabel's ``io_orientation``), so it never interpolates and
its inverse is exact; an oblique affine stays oblique, its axes are merely put closest to R, A, S.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io import Volume, read_volume

__all__ = ["load_case", "load_image", "load_label", "to_ras", "from_ras", "ras_ornt"]

log = logging.getLogger(__name__)


def load_case(images: list[Path] | list[str], label: Path | str | None = None, label_names: Any = None, *,
              strict_geometry: bool = False) -> tuple[Volume, Volume | None]:
    """Read a case's channels (one file per channel, or one multi-channel file) and its label.

    Args:
        images: channel files in channel order (a single entry may itself hold several channels).
        label: label map file (a DICOM-SEG / RTSTRUCT too), or ``None``.
        label_names: for a DICOM-SEG / RTSTRUCT label, the case's ``label_names``
            (:class:`medseg.data.dicom_labels.LabelNames`), which maps its names to values.
        strict_geometry: refuse tilted or unevenly spaced DICOM series instead of resampling them.

    Returns:
        ``(image, label)``: the image as one channel-first float32 Volume, the label as an int16 Volume (int32 when its
        values need it; the file's own label values) or None.

    Raises:
        InputError: unreadable files, channels or label on a different grid than the first channel, or a label
            with non-integer values.
    """
    image = load_image(images, strict_geometry=strict_geometry)
    if label is None:
        return image, None
    return image, load_label(label, image, images[0], label_names=label_names, source_images=images)


def load_image(images: list[Path] | list[str], *, strict_geometry: bool = False) -> Volume:
    """Read a case's channel files into one channel-first float32 Volume (see :func:`load_case`).

    Raises:
        InputError: no files, unreadable files, or channels on different grids.
    """
    if not images:
        raise InputError(None, "a case has no image files", "at least one image per case")
    vols = [read_volume(p, strict_geometry=strict_geometry) for p in images]
    first = vols[0]
    for p, v in zip(images[1:], vols[1:]):
        if not v.same_geometry(first, atol=1e-3):
            raise InputError(p, f"channel grid {v.shape} differs from the first channel {first.shape} "
                                f"({images[0]})", "all channels of a case on one voxel grid")
    arr = np.concatenate([np.asarray(v.array, dtype=np.float32) for v in vols], axis=0)
    return Volume(arr, first.affine.copy(), first.spatial_dims, dict(first.meta))


def load_label(label: Path | str, image: Volume | None = None, image_path: Path | str | None = None, *,
               label_names: Any = None, source_images: list[Path] | list[str] | None = None) -> Volume:
    """Read a label map as an int16 Volume, checked to be single-channel integers on ``image``'s grid.

    Args:
        label: the label file (a DICOM-SEG / RTSTRUCT is rasterised onto ``source_images``' series).
        image: its image (None: no grid check); image_path: named in the grid-mismatch message.
        label_names: for DICOM labels, the mapping of segment / ROI names to values.
        source_images: the case's image files (the series a DICOM label refers to).

    Raises:
        InputError: unreadable, several channels, another grid than ``image``, or non-integer values.
    """
    from medseg.data.dicom_labels import read_label

    lv = read_label(label, label_names, [Path(p) for p in (source_images or ([image_path] if image_path else []))])
    if lv.channels != 1:
        raise InputError(label, f"label has {lv.channels} channels", "a single-channel integer label map")
    if image is not None and (lv.shape != image.shape or not np.allclose(lv.affine, image.affine, atol=1e-3)):
        raise InputError(label, f"label grid {lv.shape} does not match its image grid {image.shape} "
                                f"({image_path})", "a label on the same voxel grid as its image")
    larr = np.asarray(lv.array)
    if not np.issubdtype(larr.dtype, np.integer):
        rounded = np.rint(larr)
        if not np.array_equal(rounded, larr):
            raise InputError(label, "label holds non-integer values", "an integer label map")
        larr = rounded
    dtype = np.int16 if larr.size == 0 or (larr.min() >= -32768 and larr.max() <= 32767) else np.int32
    return Volume(larr.astype(dtype), lv.affine.copy(), lv.spatial_dims, dict(lv.meta))


def ras_ornt(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """The nibabel orientation array taking voxel axes to (closest) RAS; identity for 2D images."""
    import nibabel as nib

    if spatial_dims == 2:
        return np.array([[0, 1], [1, 1]], dtype=float)
    return nib.orientations.io_orientation(affine)


def to_ras(array: np.ndarray, affine: np.ndarray, spatial_dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Permute/flip a channel-first array's voxel axes to RAS order.

    Args:
        array: ``(C, *spatial)``.
        affine: its 4x4 voxel-to-world affine.
        spatial_dims: 2 or 3 (2D images are left as they are).

    Returns:
        ``(array_ras, affine_ras, ornt)``; ``ornt`` is what :func:`from_ras` needs to undo it.
    """
    import nibabel as nib

    ornt = ras_ornt(affine, spatial_dims)
    if spatial_dims == 2 or np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, affine.copy(), ornt
    shape = array.shape[1:]
    out = np.stack([nib.orientations.apply_orientation(c, ornt) for c in array])
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return np.ascontiguousarray(out), new_affine, ornt


def from_ras(array: np.ndarray, ornt: np.ndarray | list[Any]) -> np.ndarray:
    """Undo :func:`to_ras` on a channel-first array (exact: a permutation and flips)."""
    import nibabel as nib

    ornt = np.asarray(ornt, dtype=float)
    if len(ornt) == 2 or np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array
    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    back = nib.orientations.ornt_transform(identity, ornt)
    return np.ascontiguousarray(np.stack([nib.orientations.apply_orientation(c, back) for c in array]))
