"""Series whose slices do not form a regular grid (gantry tilt, uneven spacing), and their resampling onto one.

:func:`medseg.io.dicom.series_geometry` raises :class:`IrregularSlices` (an :class:`~medseg.errors.InputError`, so a
strict reader refuses the series with the same one-line message) carrying what is needed to resample it.
:func:`resample_irregular` then does what dcm2niix does for tilted CT: it builds a regular grid whose axes are the
slices' row and column directions and their normal ``n = row x column`` (so in-plane voxels stay where they were),
with origin the first slice's ImagePositionPatient and slice step the smallest distance between neighbouring
slices, and fills it by linear interpolation:

* along ``n``, between the two original slices that bracket each target slice;
* in-plane, each original slice sampled (bilinearly) at the target voxels' projection onto its own plane, which for
  a tilted series is the target grid shifted by ``(p_0 - p_s) . row / dc`` columns and ``(p_0 - p_s) . col / dr``
  rows.

Voxels that no original slice covers (the corner a tilted stack leaves) take the image minimum. The result's world
positions are the original slices' world positions wherever both exist (tested against the slices' own IPP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import InputError

__all__ = ["IrregularSlices", "SliceStack", "regular_grid", "resample_irregular"]


class IrregularSlices(InputError):
    """A series that can be read only by resampling: gantry tilt or uneven slice spacing.

    Args:
        where: the series folder.
        problem: what is irregular (the strict refusal's message).
        expected: what a strict reader wants instead.
        geometry: the slice stack's geometry, for :func:`resample_irregular`.
    """

    def __init__(self, where: str | Path, problem: str, expected: str, geometry: SliceStack):
        super().__init__(where, problem, expected)
        self.geometry = geometry


@dataclass
class SliceStack:
    """Parallel slices in their order along the normal.

    Attributes:
        files: the slice files in order.
        positions: ``(K, 3)`` ImagePositionPatient of each slice (LPS mm).
        row: unit row direction (first IOP triple: the direction of increasing column index).
        col: unit column direction.
        pixel_spacing: ``(dr, dc)`` PixelSpacing (between rows, between columns).
        sop_instance_uids: in order.
        what: a short description of the irregularity for the warning, e.g. ``"gantry tilt of 12.0 degrees"``.
    """

    files: list[Path]
    positions: np.ndarray
    row: np.ndarray
    col: np.ndarray
    pixel_spacing: np.ndarray
    sop_instance_uids: list[str] = field(default_factory=list)
    what: str = "irregular slices"

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal ``row x col``."""
        return np.cross(self.row, self.col)


def _target_step(dist: np.ndarray) -> tuple[float, int]:
    steps = np.diff(dist)
    span = float(dist[-1] - dist[0])
    dz = float(steps.min())
    if np.max(np.abs(steps - span / len(steps))) <= max(1e-3, 0.01 * span / len(steps)):
        dz = span / len(steps)  # regular along the normal (tilt only): keep the slices' own step
    n = int(round(span / dz)) + 1
    return span / (n - 1), n


def regular_grid(stack: SliceStack) -> tuple[np.ndarray, int]:
    """The regular grid :func:`resample_irregular` fills: ``(4x4 LPS affine, number of slices)``.

    Args:
        stack: the slices' geometry.

    Returns:
        The affine of ``(column, row, slice)`` indices and the slice count of the grid.
    """
    dr, dc = (float(v) for v in stack.pixel_spacing)
    pos = np.asarray(stack.positions, dtype=np.float64)
    dz, n_out = _target_step(pos @ stack.normal)
    affine = np.eye(4)
    affine[:3, 0] = stack.row * dc
    affine[:3, 1] = stack.col * dr
    affine[:3, 2] = stack.normal * dz
    affine[:3, 3] = pos[0]
    return affine, n_out


def resample_irregular(array: np.ndarray, stack: SliceStack, fill: float | None = None
                       ) -> tuple[np.ndarray, np.ndarray, str]:
    """Resample a ``(C, columns, rows, K)`` slice stack onto a regular grid (see the module docstring).

    Args:
        array: the slices' pixels in ``stack`` order, medseg's ``(C, column, row, slice)`` layout.
        stack: their geometry.
        fill: value of voxels no slice covers; default the image minimum.

    Returns:
        ``(float32 array (C, columns, rows, K'), 4x4 LPS affine, one-line description of what was done)``.
    """
    from scipy.ndimage import map_coordinates

    dr, dc = (float(v) for v in stack.pixel_spacing)
    pos = np.asarray(stack.positions, dtype=np.float64)
    dist = pos @ stack.normal
    affine, n_out = regular_grid(stack)
    dz = float(np.linalg.norm(affine[:3, 2]))
    origin = pos[0]
    n_cols, n_rows = array.shape[1], array.shape[2]
    if fill is None:
        fill = float(array.min()) if array.size else 0.0
    shifts = [((origin - p) @ stack.row / dc, (origin - p) @ stack.col / dr) for p in pos]
    ii, jj = np.meshgrid(np.arange(n_cols, dtype=np.float64), np.arange(n_rows, dtype=np.float64), indexing="ij")
    out = np.empty((array.shape[0], n_cols, n_rows, n_out), dtype=np.float32)
    cache: dict[tuple[int, int], np.ndarray] = {}

    def sampled(c: int, s: int) -> np.ndarray:
        if (c, s) not in cache:
            su, sv = shifts[s]
            cache[(c, s)] = map_coordinates(array[c, :, :, s].astype(np.float32), [ii + su, jj + sv], order=1,
                                            mode="constant", cval=fill)
        return cache[(c, s)]

    for t in range(n_out):
        z = dist[0] + t * dz
        a = int(np.clip(np.searchsorted(dist, z, side="right") - 1, 0, len(dist) - 2)) if len(dist) > 1 else 0
        w = float(np.clip((z - dist[a]) / (dist[a + 1] - dist[a]), 0.0, 1.0)) if len(dist) > 1 else 0.0
        for c in range(array.shape[0]):
            if w < 1e-6:
                out[c, :, :, t] = sampled(c, a)
            elif w > 1 - 1e-6:
                out[c, :, :, t] = sampled(c, a + 1)
            else:
                out[c, :, :, t] = (1 - w) * sampled(c, a) + w * sampled(c, a + 1)
        for key in [k for k in cache if k[1] < a]:
            del cache[key]
    note = (f"{stack.what}: resampled {len(dist)} slices onto a regular grid of {n_out} slices {dz:.4g} mm apart "
            "along the slice normal (linear interpolation, as dcm2niix does); --strict-geometry refuses instead")
    return out, affine, note
