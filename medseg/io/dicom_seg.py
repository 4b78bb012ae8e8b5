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
from medseg.io.dicom_source import copyable_headers, labelled_source, source_series
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


def write_dicom_seg(label: Volume, source_dir: str | Path, path: str | Path, labels: dict[int, str], *,
                    series_uid: str | None = None, series_description: str = "medseg segmentation",
                    series_number: int = 300, colors: dict | None = None, codes: dict | None = None) -> None:
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
        colors: optional label value -> RGB display colour (RecommendedDisplayCIELabValue); default a palette.
        codes: optional label value -> ``{"type": concept, "category": concept}``
            (:mod:`medseg.io.label_style`); default the generic concept "Tissue".

    Raises:
        InputError: the label is not on the source grid, holds values missing from ``labels``, or the source
            series cannot be used.
        ConfigError: malformed ``colors`` or ``codes``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    from medseg import __version__
    from medseg.io.atomic import atomic_path
    source_dir = Path(source_dir)
    source, arr, styles = labelled_source(label, source_dir, labels, colors, codes, series_uid)
    values = [s.value for s in styles]
    lut = np.zeros(max(max(values), int(arr.max(initial=0))) + 1, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    seg_numbers = lut[np.clip(arr, 0, None)]
    dtype = np.uint8 if len(values) < 256 else np.uint16
    pixel_array = np.ascontiguousarray(np.transpose(seg_numbers, (2, 1, 0)).astype(dtype))  # (frames, rows, cols)
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg", version=__version__,
                                                   family=dcm_codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=style.name[:64],
            segmented_property_category=style.category.as_pydicom(),
            segmented_property_type=style.type.as_pydicom(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*style.color))
        for number, style in enumerate(styles, start=1)
    ]
    sources = copyable_headers(source)
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
    log.info("wrote a DICOM-SEG with %d segment(s) over %d frames", len(values), len(source.files))


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
        src = source_series(Path(source_dir), str(ref) if ref else None)
        full = np.zeros(src.shape, dtype=arr.dtype)
        idx = np.linalg.solve(src.affine_lps, aff)  # seg voxel -> source voxel
        offset = np.rint(idx[:3, 3]).astype(int)
        if not (np.allclose(idx[:3, :3], np.eye(3), atol=1e-3) and np.allclose(idx[:3, 3], offset, atol=1e-2)
                and np.all(offset >= 0) and np.all(offset + arr.shape <= full.shape)):
            raise InputError(path, f"frames do not lie on the grid of source series {src.uid}",
                             "a DICOM-SEG made from this source series")
        i, j, k = offset
        full[i:i + arr.shape[0], j:j + arr.shape[1], k:k + arr.shape[2]] = arr
        arr, aff = full, src.affine_lps
        meta["series_uid"] = src.uid
    return Volume(np.ascontiguousarray(arr)[None], LPS_TO_RAS @ aff, 3, meta), names
