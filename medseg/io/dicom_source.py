"""The source image series a derived DICOM object (DICOM-SEG, RTSTRUCT) refers to: its grid and its headers.

Both writers need the same three things: the series (chosen by UID in a folder that may hold other objects), the
label map checked to lie on that series' grid, and the source headers with the type-2 patient/study attributes a
derived object must copy (anonymised series often drop them; they are added empty to the in-memory copy, the user's
files are never touched). Nothing here logs patient attributes or UIDs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.dicom_geometry import SliceStack
from medseg.io.volume import LPS_TO_RAS, Volume

__all__ = ["SourceSeries", "source_series", "label_on_grid", "labelled_source", "copyable_headers"]

#: Type-2 attributes of the Patient and General Study modules, which a derived object copies from its source.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass
class SourceSeries:
    """A source image series on disk.

    Attributes:
        uid: SeriesInstanceUID.
        files: the files in slice order.
        affine_lps: LPS voxel-to-world affine of ``(column, row, slice)`` indices of the grid the series reads to
            (for an irregular series: the regular grid it is resampled onto).
        sop_instance_uids: SOPInstanceUID of each slice (file), in slice order.
        shape: ``(columns, rows, slices)`` of that grid.
        folder: the folder it was found in.
        irregular: the slices' own geometry when they do not form a regular grid (tilt, uneven spacing), else
            None; then ``files`` are not the grid's slices one to one.
    """

    uid: str
    files: list[Path]
    affine_lps: np.ndarray
    sop_instance_uids: list[str]
    shape: tuple[int, int, int]
    folder: Path
    irregular: SliceStack | None = None

    def slice_planes(self) -> list[np.ndarray]:
        """For each file (slice) in order, the 4x4 LPS affine of its own ``(column, row, 0)`` pixel indices."""
        if self.irregular is None:
            planes = []
            for k in range(len(self.files)):
                a = self.affine_lps.copy()
                a[:3, 3] = self.affine_lps[:3, :3] @ [0, 0, k] + self.affine_lps[:3, 3]
                planes.append(a)
            return planes
        st = self.irregular
        dr, dc = (float(v) for v in st.pixel_spacing)
        planes = []
        for p in st.positions:
            a = self.affine_lps.copy()
            a[:3, 0], a[:3, 1], a[:3, 3] = st.row * dc, st.col * dr, p
            planes.append(a)
        return planes


def source_series(folder: str | Path, series_uid: str | None = None, *, allow_irregular: bool = False
                  ) -> SourceSeries:
    """Find and validate the image series a derived object refers to.

    Args:
        folder: folder holding the series (it may hold SEG/RTSTRUCT objects too).
        series_uid: the series to use; default the folder's only image series.
        allow_irregular: accept a tilted or unevenly spaced series (RTSTRUCT contours lie on each slice's own
            plane); its grid is then the regular grid :func:`medseg.io.read_volume` resamples it onto.

    Returns:
        The series, in slice order.

    Raises:
        InputError: no such series, several series and no UID, or a geometry that has no regular grid.
    """
    import pydicom

    from medseg.io.dicom import _select_series, list_dicom_series, series_geometry
    from medseg.io.dicom_geometry import IrregularSlices, regular_grid

    folder = Path(folder)
    info = _select_series(folder, list_dicom_series(folder), series_uid)
    try:
        files, affine_lps, sops = series_geometry(info.files, folder)
    except IrregularSlices as exc:
        if allow_irregular:
            st = exc.geometry
            first = pydicom.dcmread(st.files[0], stop_before_pixels=True)
            affine, n_out = regular_grid(st)
            return SourceSeries(info.uid, list(st.files), affine, list(st.sop_instance_uids),
                                (int(first.Columns), int(first.Rows), n_out), folder, st)
        raise InputError(folder, f"{exc.problem}: a DICOM-SEG or RTSTRUCT lies on the slices of its series, and "
                         "these slices do not form a regular grid", "NIfTI output for a tilted or unevenly spaced "
                         "series (its mask lies on the resampled grid)") from None
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return SourceSeries(info.uid, list(files), affine_lps, sops, (int(first.Columns), int(first.Rows), len(files)),
                        folder)


def label_on_grid(label: Volume, source: SourceSeries) -> np.ndarray:
    """The ``(columns, rows, slices)`` int64 label array, checked to lie on the source grid.

    Args:
        label: ``(1, columns, rows, slices)`` label map.
        source: the series it must lie on.

    Returns:
        The label values as int64.

    Raises:
        InputError: not a one-channel 3D map, not on the grid, or non-integer values.
    """
    where = label.meta.get("source", "label")
    if label.spatial_dims != 3 or label.channels != 1:
        raise InputError(where, f"is a {label.spatial_dims}D volume with {label.channels} channels",
                         "a 3D one-channel label map")
    ras = LPS_TO_RAS @ source.affine_lps
    if label.shape != source.shape or not np.allclose(label.affine, ras, atol=1e-3):
        raise InputError(where, f"is not on the grid of source series {source.uid} (label {label.shape}, source "
                         f"{source.shape}, max affine difference {np.abs(label.affine - ras).max():.3g} mm)",
                         "a label map with the source series' shape and affine (resample it onto the source first)")
    arr = np.asarray(label.array[0])
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        if not np.array_equal(arr, np.round(arr)):
            raise InputError(where, f"holds non-integer values ({arr.dtype})", "an integer label map")
    return arr.astype(np.int64)


def labelled_source(label: Volume, source_dir: str | Path, labels: dict[int, str], colors: dict | None,
                    codes: dict | None, series_uid: str | None, *, allow_irregular: bool = False):
    """What a derived-object writer starts from: the source, the label array on its grid, one style per label.

    Args:
        label: ``(1, columns, rows, slices)`` label map.
        source_dir: folder holding the source series.
        labels, colors, codes: see :func:`medseg.io.label_style.label_styles`.
        series_uid: the source series; default ``label.meta["series_uid"]``, else the folder's only image series.
        allow_irregular: see :func:`source_series`.

    Returns:
        ``(SourceSeries, int64 label array, [LabelStyle, ...])``.

    Raises:
        InputError: not on the grid, label values without a name, or no foreground label at all.
    """
    from medseg.io.label_style import label_styles

    where = label.meta.get("source", "label")
    source = source_series(Path(source_dir), series_uid or label.meta.get("series_uid"),
                           allow_irregular=allow_irregular)
    arr = label_on_grid(label, source)
    styles = label_styles(labels, colors, codes)
    unknown = sorted({int(v) for v in np.unique(arr)} - {0} - {s.value for s in styles})
    if unknown:
        raise InputError(where, f"holds label values {unknown} that have no name in labels={labels}",
                         "a name for every label value")
    if not styles:
        raise InputError(where, "has no labels to write (labels names only the background)",
                         "at least one foreground label, e.g. {1: 'tumour'}")
    return source, arr, styles


def copyable_headers(source: SourceSeries) -> list:
    """The source headers (no pixels), with absent type-2 patient/study attributes added empty (in memory only)."""
    import pydicom

    out = []
    for f in source.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet or "").strip():
            del ds.SpecificCharacterSet  # an empty value means the default repertoire; highdicom rejects ''
        out.append(ds)
    return out
