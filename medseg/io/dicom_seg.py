"""DICOM Segmentation objects (DICOM-SEG) with highdicom: write a label map that references its source series,
and read one back as a label :class:`Volume`.

Geometry. A label written here must lie on the source series' grid (same shape and affine, as a prediction made
from :func:`medseg.io.dicom.read_dicom_series` does): frame ``k`` of the SEG is slice ``k`` of the source, with the
``(column, row)`` voxel axes transposed to DICOM's ``(row, column)`` frame layout. On reading, highdicom's volume
(indices ``(slice, row, column)``, LPS affine) is transposed to medseg's ``(column, row, slice)`` order, its slice
axis turned to follow the image normal ``row x column`` (as series are read), and the affine converted to RAS with
``diag(-1, -1, 1, 1)`` (:data:`medseg.io.volume.LPS_TO_RAS`). With ``source_dir`` the label is placed on the
source series' full grid (frames that the SEG omitted because they were empty become 0).

Segments. Label value ``v`` (``v > 0``) of ``labels`` becomes a segment labelled ``labels[v]``; segment numbers are
1..n in increasing label value, and :func:`read_dicom_seg` returns the map from segment number to name.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import LPS_TO_RAS, Volume

__all__ = ["write_dicom_seg", "read_dicom_seg", "is_dicom_seg"]

log = logging.getLogger(__name__)


def is_dicom_seg(path: str | Path) -> bool:
    """True when ``path`` is a DICOM file whose Modality is ``SEG``.

    Args:
        path: any file.

    Returns:
        Whether it is a DICOM Segmentation object.
    """
    from medseg.io.dicom import _read_header

    ds = _read_header(Path(path))
    return ds is not None and str(ds.get("Modality", "")).upper() == "SEG"


def _source_series(source_dir: Path, series_uid: str | None):
    from medseg.io.dicom import _select_series, list_dicom_series, series_geometry

    info = _select_series(source_dir, list_dicom_series(source_dir), series_uid)
    files, affine_lps, _ = series_geometry(info.files, source_dir)
    return info, files, affine_lps


#: Type-2 attributes of the Patient and General Study modules, which highdicom copies from the source images.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def write_dicom_seg(label: Volume, source_dir: str | Path, path: str | Path, labels: dict[int, str], *,
                    series_uid: str | None = None, series_description: str = "medseg segmentation",
                    series_number: int = 300) -> None:
    """Write a label map as a BINARY DICOM-SEG that references the source image series, atomically.

    Args:
        label: ``(1, columns, rows, slices)`` integer label map on the source series' grid.
        source_dir: folder holding the source DICOM series.
        path: output ``.dcm`` file.
        labels: label value -> segment name, e.g. ``{1: "liver"}`` (value 0, the background, is ignored).
        series_uid: the source series to reference; default ``label.meta["series_uid"]``, else the folder's only
            image series.
        series_description: SeriesDescription of the new SEG series.
        series_number: SeriesNumber of the new SEG series.

    Raises:
        InputError: the label is not on the source grid, holds values missing from ``labels``, or the source
            series cannot be used.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medseg import __version__
    from medseg.io.atomic import atomic_path

    source_dir = Path(source_dir)
    where = label.meta.get("source", "label")
    uid = series_uid or label.meta.get("series_uid")
    info, files, affine_lps = _source_series(source_dir, uid)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    grid = (int(first.Columns), int(first.Rows), len(files))
    if label.spatial_dims != 3 or label.channels != 1:
        raise InputError(where, f"is a {label.spatial_dims}D volume with {label.channels} channels",
                         "a 3D one-channel label map")
    if label.shape != grid or not np.allclose(label.affine, LPS_TO_RAS @ affine_lps, atol=1e-3):
        raise InputError(where, f"is not on the grid of source series {info.uid} (label {label.shape}, source {grid}"
                         f", max affine difference {np.abs(label.affine - LPS_TO_RAS @ affine_lps).max():.3g} mm)",
                         "a label map with the source series' shape and affine (resample it onto the source first)")
    arr = np.asarray(label.array[0])
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        if not np.array_equal(arr, np.round(arr)):
            raise InputError(where, f"holds non-integer values ({arr.dtype})", "an integer label map")
    arr = arr.astype(np.int64)
    values = sorted(int(v) for v in labels if int(v) != 0)
    present = {int(v) for v in np.unique(arr)} - {0}
    unknown = sorted(present - set(values))
    if unknown:
        raise InputError(where, f"holds label values {unknown} that have no name in labels={labels}",
                         "a name for every label value")
    if not values:
        raise InputError(where, "has no labels to write (labels names only the background)",
                         "at least one foreground label, e.g. {1: 'tumour'}")
    lut = np.zeros(max(max(values), int(arr.max(initial=0))) + 1, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    seg_numbers = lut[np.clip(arr, 0, None)]
    dtype = np.uint8 if len(values) < 256 else np.uint16
    pixel_array = np.ascontiguousarray(np.transpose(seg_numbers, (2, 1, 0)).astype(dtype))  # (frames, rows, cols)
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(labels[value])[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for number, value in enumerate(values, start=1)
    ]
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for ds in sources:  # anonymised series often drop type-2 patient/study attributes that the SEG must copy;
        for keyword in _TYPE2_COPIED:  # add them empty to the in-memory copy (the user's files are untouched)
            if keyword not in ds:
                setattr(ds, keyword, "")
        if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet or "").strip():
            del ds.SpecificCharacterSet  # an empty value means the default repertoire; highdicom rejects ''
    with warnings.catch_warnings():
        # highdicom warns about odd person names by quoting the name itself: no patient name may reach a log
        warnings.filterwarnings("ignore", message=".*person name.*")
        try:
            seg = hd.seg.Segmentation(
                source_images=sources, pixel_array=pixel_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
                series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer="medseg", manufacturer_model_name="medseg",
                software_versions=__version__, device_serial_number="none", series_description=series_description,
                omit_empty_frames=False)
        except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks of the source attributes
            detail = str(exc).splitlines()[0][:200] if str(exc) else "no details"
            raise InputError(source_dir, f"cannot be referenced by a DICOM-SEG ({type(exc).__name__}: {detail})",
                             "a DICOM image series with complete patient, study and series modules") from None
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    log.info("wrote a DICOM-SEG with %d segment(s) over %d frames", len(values), len(files))


def read_dicom_seg(path: str | Path, source_dir: str | Path | None = None) -> tuple[Volume, dict[int, str]]:
    """Read a BINARY or LABELMAP DICOM-SEG into a label map.

    Args:
        path: the SEG file.
        source_dir: optional folder with the referenced image series; the label is then placed on that series'
            full grid (the Volume has exactly the affine and shape that reading the series gives).

    Returns:
        ``(label Volume (1, columns, rows, slices) with segment numbers as values, {segment number: label})``.

    Raises:
        InputError: not a SEG, overlapping or fractional segments, frames that do not form a regular volume, or
            frames that do not lie on the source grid.
    """
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # pydicom/highdicom raise many types for a file that is not a SEG
        raise InputError(path, f"cannot be read as a DICOM-SEG ({type(exc).__name__}: {str(exc)[:150]})",
                         "a DICOM Segmentation object") from None
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    try:
        hvol = seg.get_volume(combine_segments=True)
    except (ValueError, RuntimeError) as exc:
        raise InputError(path, f"segments cannot be combined into one label volume ({str(exc)[:150]})",
                         "non-overlapping BINARY segments on parallel, regularly spaced frames") from None
    arr = np.transpose(np.asarray(hvol.array), (2, 1, 0))
    aff = np.asarray(hvol.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    normal = np.cross(aff[:3, 0], aff[:3, 1])
    if aff[:3, 2] @ normal < 0:
        arr = arr[:, :, ::-1]
        aff[:3, 3] += aff[:3, 2] * (arr.shape[2] - 1)
        aff[:3, 2] *= -1
    ref = seg.ReferencedSeriesSequence[0].SeriesInstanceUID if "ReferencedSeriesSequence" in seg else None
    meta = {"source": str(path), "format": "dicom-seg", "segments": {str(k): v for k, v in names.items()},
            "series_uid": str(ref) if ref else None}
    if source_dir is not None:
        info, files, affine_lps = _source_series(Path(source_dir), str(ref) if ref else None)
        import pydicom

        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        full = np.zeros((int(first.Columns), int(first.Rows), len(files)), dtype=arr.dtype)
        idx = np.linalg.solve(affine_lps, aff)  # seg voxel -> source voxel
        offset = np.rint(idx[:3, 3]).astype(int)
        if not (np.allclose(idx[:3, :3], np.eye(3), atol=1e-3) and np.allclose(idx[:3, 3], offset, atol=1e-2)
                and np.all(offset >= 0) and np.all(offset + arr.shape <= full.shape)):
            raise InputError(path, f"frames do not lie on the grid of source series {info.uid}",
                             "a DICOM-SEG made from this source series")
        i, j, k = offset
        full[i:i + arr.shape[0], j:j + arr.shape[1], k:k + arr.shape[2]] = arr
        arr, aff = full, affine_lps
        meta["series_uid"] = info.uid
    return Volume(np.ascontiguousarray(arr)[None], LPS_TO_RAS @ aff, 3, meta), names
