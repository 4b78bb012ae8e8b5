"""The one image type of medseg: an array together with where it lies in the patient.

Conventions (used everywhere inside medseg, converted only when reading and writing files):

* ``array`` is channel-first: ``(C, *spatial)``. A label map has ``C == 1``. Spatial axes are the file's voxel
  axes in storage order (i, j[, k]) -- nibabel's order, not SimpleITK's reversed (z, y, x) order.
* ``affine`` is a 4x4 float64 matrix mapping voxel indices ``(i, j, k, 1)`` to world coordinates in millimetres
  in **RAS+** (+x towards the patient's Right, +y Anterior, +z Superior), the NIfTI/nibabel convention. DICOM and ITK (LPS+) geometry is converted at the edge
  by flipping the signs of the first two world axes.
* 2D images (PNG/TIFF, 2D NIfTI) have ``spatial_dims == 2``; their affine is still 4x4, with the third column
  the unit normal, so the same code handles both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Volume", "LPS_TO_RAS"]

#: Multiply an LPS world affine by this on the left to get RAS (and vice versa).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """An image or label map with its world geometry.

    Args:
        array: channel-first array ``(C, *spatial)``.
        affine: 4x4 voxel-to-world (RAS+, mm) matrix.
        spatial_dims: 2 or 3; defaults to ``array.ndim - 1``.
        meta: what is needed to write the same file back (source path, format, header fields such as NIfTI
            qform/sform codes, intent and on-disk dtype, DICOM series UID). Never holds patient identifiers.
    """

    array: np.ndarray
    affine: np.ndarray
    spatial_dims: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.spatial_dims == 0:
            self.spatial_dims = self.array.ndim - 1
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.array.ndim != self.spatial_dims + 1:
            raise ValueError(
                f"array must be channel-first (C, *spatial) with {self.spatial_dims} spatial axes, "
                f"got shape {self.array.shape}"
            )

    # ----------------------------------------------------------------- geometry
    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape (without the channel axis)."""
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def channels(self) -> int:
        """Number of channels."""
        return int(self.array.shape[0])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis (norms of the affine's columns)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, : self.spatial_dims], axis=0))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World (RAS) position of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix of unit column vectors: the world direction of each voxel axis (RAS)."""
        cols = self.affine[:3, :3]
        norms = np.linalg.norm(cols, axis=0)
        norms[norms == 0] = 1.0
        return cols / norms

    def orientation(self) -> str:
        """Orientation code of the voxel axes, e.g. ``"RAS"`` or ``"LPI"`` (nibabel's ``aff2axcodes``)."""
        import nibabel as nib

        codes = nib.orientations.aff2axcodes(self.affine)
        return "".join(c if c is not None else "?" for c in codes[: self.spatial_dims])

    def same_geometry(self, other: Volume, atol: float = 1e-4) -> bool:
        """True when ``other`` has the same spatial shape and affine (within ``atol`` mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    # ----------------------------------------------------------------- helpers
    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """A new Volume with the same geometry and ``array`` (channel-first, same spatial shape)."""
        if tuple(array.shape[1:]) != self.shape:
            raise ValueError(f"spatial shape {array.shape[1:]} differs from {self.shape}")
        return Volume(array, self.affine.copy(), self.spatial_dims, {**self.meta, **meta})

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, channels={self.channels}, spacing=({sp}), "
            f"orientation={self.orientation()}, dtype={self.array.dtype})"
        )
