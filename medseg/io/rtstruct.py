"""RT Structure Sets (RTSTRUCT): ROI contours read onto the referenced series' grid, and label maps written as
contours that reference their source series.

Library. pydicom builds and reads the object (the RTSTRUCT modules are a handful of sequences), scikit-image
rasterises polygons (:func:`skimage.draw.polygon`) and traces contours (:func:`skimage.measure.find_contours`); both
are dependencies already. rt-utils, the maintained RTSTRUCT library, needs OpenCV and assumes slices matched by
index, and highdicom has no RTSTRUCT support.

Reading (:func:`read_rtstruct`). Each CLOSED_PLANAR contour's points (LPS mm) are mapped into the source grid's
voxel indices ``(column i, row j, slice k)``; the contour is assigned to the slice whose plane it lies in, found
from its position along the slice normal, never from its order in the file or from ContourImageSequence. On each
slice the contours of one ROI are combined by the even-odd rule (a pixel is inside when its centre lies inside an
odd number of that ROI's contours), so an inner contour cuts a hole and an island in the hole is inside again. A
pixel centre belongs to a polygon as :func:`skimage.draw.polygon` decides. ROI ``n``-th in StructureSetROISequence
becomes label value ``n``; where ROIs overlap the later one wins (a warning gives the voxel count); per-ROI masks are
available from :func:`read_rtstruct_masks`.

Writing (:func:`write_rtstruct`). For each label value and slice, the iso-contours at 0.5 of the binary slice
(padded by one pixel, so every contour closes) are the polygons; their vertices lie halfway between pixel centres,
so rasterising them again by the even-odd rule gives back exactly the slice's pixels. Collinear vertices are
dropped. ROI names, colours and codes come from :func:`medseg.io.label_style.label_styles`.

Tilted or unevenly spaced series. Contours lie on the planes of the series' own slices, which are not the planes of
the regular grid such a series is read onto (:mod:`medseg.io.dicom_geometry`). Reading rasterises each contour on
its own slice and resamples the per-slice masks like the image (linear, kept where >= 0.5); writing samples the
label map at each slice's pixel centres (nearest voxel) and traces that. Both may then differ from the label map
at boundary voxels (the tested round trip on a 17-degree tilted series keeps Dice >= 0.98); for a regular series
they are exact.

Identifiers. The patient and study attributes an RTSTRUCT must carry are copied from the source headers into the new
file; none of them, and no UID, is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.dicom_source import (
    TYPE2_COPIED,
    SourceSeries,
    copyable_headers,
    labelled_source,
    source_series,
)
from medseg.io.volume import LPS_TO_RAS, Volume

__all__ = ["Roi", "is_rtstruct", "read_rois", "read_rtstruct", "read_rtstruct_masks", "write_rtstruct",
           "RTSTRUCT_SOP_CLASS"]

log = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_PLANAR_TOL = 0.1  # a contour whose points spread over more than this fraction of a slice step is not planar


@dataclass
class Roi:
    """One ROI of a structure set.

    Attributes:
        number: ROINumber.
        name: ROIName.
        color: ROIDisplayColor (RGB) or None.
        contours: ``(N, 3)`` LPS point arrays of its CLOSED_PLANAR contours.
        skipped: count of contours of other geometric types (POINT, OPEN_PLANAR, ...), which have no area.
    """

    number: int
    name: str
    color: tuple[int, int, int] | None = None
    contours: list[np.ndarray] = field(default_factory=list)
    skipped: int = 0


def is_rtstruct(path: str | Path) -> bool:
    """True when ``path`` is a DICOM file whose Modality is ``RTSTRUCT``.

    Args:
        path: any file.

    Returns:
        Whether it is an RT Structure Set.
    """
    from medseg.io.dicom import _read_header

    p = Path(path)
    if not p.is_file():
        return False
    ds = _read_header(p)
    return ds is not None and str(ds.get("Modality", "")).upper() == "RTSTRUCT"


def _dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"cannot be read as DICOM ({type(exc).__name__})", "an RTSTRUCT file") from None
    if str(ds.get("Modality", "")).upper() != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise InputError(path, f"is not an RT Structure Set (Modality {ds.get('Modality', 'absent')})",
                         "an RTSTRUCT file")
    return ds


def _referenced_series(ds) -> str | None:
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in fr.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in series:
                    return str(series.SeriesInstanceUID)
    return None


def read_rois(path: str | Path) -> tuple[list[Roi], str | None]:
    """The ROIs of an RTSTRUCT with their contour points, and the SeriesInstanceUID it references.

    Args:
        path: the RTSTRUCT file.

    Returns:
        ``(ROIs in StructureSetROISequence order, referenced series UID or None)``.

    Raises:
        InputError: not an RTSTRUCT, or contour data that is not a list of 3D points.
    """
    path = Path(path)
    ds = _dataset(path)
    rois = {int(item.ROINumber): Roi(int(item.ROINumber), str(item.get("ROIName", "") or f"ROI {item.ROINumber}"))
            for item in ds.StructureSetROISequence}
    for rc in ds.get("ROIContourSequence", []):
        roi = rois.get(int(rc.get("ReferencedROINumber", -1)))
        if roi is None:
            log.warning("%s: contours of ROI number %s, which StructureSetROISequence does not list, are ignored",
                        path.name, rc.get("ReferencedROINumber"))
            continue
        if "ROIDisplayColor" in rc and len(rc.ROIDisplayColor) == 3:
            roi.color = tuple(int(v) for v in rc.ROIDisplayColor)  # type: ignore[assignment]
        for c in rc.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "")).upper() not in ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR"):
                roi.skipped += 1
                continue
            data = np.asarray([float(v) for v in c.get("ContourData", [])], dtype=np.float64)
            if data.size % 3 or data.size < 9:
                raise InputError(path, f"ROI {roi.name!r} has a contour of {data.size} coordinates",
                                 "closed planar contours of at least 3 (x, y, z) points")
            roi.contours.append(data.reshape(-1, 3))
    return list(rois.values()), _referenced_series(ds)


def _plane_frames(source: SourceSeries) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per slice file: the inverse of its ``(column, row, mm along the normal)`` affine; the unit normal; the
    slices' distances along it."""
    planes = source.slice_planes()
    normal = np.cross(planes[0][:3, 0], planes[0][:3, 1])
    normal /= np.linalg.norm(normal)
    inverses = []
    for plane in planes:
        a = plane.copy()
        a[:3, 2] = normal
        inverses.append(np.linalg.inv(a))
    return inverses, normal, np.array([plane[:3, 3] @ normal for plane in planes])


def _rasterise(rois: list[Roi], source: SourceSeries, where: Path) -> dict[int, np.ndarray]:
    from skimage.draw import polygon

    from medseg.io.dicom_geometry import resample_irregular

    inverses, normal, dists = _plane_frames(source)
    step = float(np.min(np.diff(dists))) if len(dists) > 1 else float(np.linalg.norm(source.affine_lps[:3, 2]))
    plane_shape = source.shape[:2]
    masks = {}
    for roi in rois:
        mask = np.zeros((*plane_shape, len(dists)), dtype=bool)
        off_grid = not_planar = 0
        for pts in roi.contours:
            d = pts @ normal
            if d.max() - d.min() > 2 * _PLANAR_TOL * step:
                not_planar += 1
                continue
            kk = int(np.argmin(np.abs(dists - d.mean())))
            if abs(d.mean() - dists[kk]) > (0.5 - _PLANAR_TOL) * step:
                off_grid += 1
                continue
            ij = (inverses[kk][:2, :3] @ pts.T).T + inverses[kk][:2, 3]
            ii, jj = polygon(ij[:, 0], ij[:, 1], shape=plane_shape)
            fill = np.zeros(plane_shape, dtype=bool)
            fill[ii, jj] = True
            mask[:, :, kk] ^= fill  # even-odd rule: each further contour around a pixel flips it
        if off_grid or not_planar or roi.skipped:
            log.warning("%s: ROI %r: %d contour(s) between or outside the slices of the source series, %d not "
                        "planar, %d not closed planar: ignored", where.name, roi.name, off_grid, not_planar,
                        roi.skipped)
        if source.irregular is not None:  # onto the regular grid the image is resampled onto
            mask = resample_irregular(mask[None].astype(np.float32), source.irregular, fill=0.0)[0][0] >= 0.5
        masks[roi.number] = mask
    return masks


def read_rtstruct_masks(path: str | Path, source_dir: str | Path, *, strict_geometry: bool = False
                        ) -> tuple[dict[str, np.ndarray], SourceSeries]:
    """Rasterise every ROI of an RTSTRUCT onto the referenced series' grid, one boolean mask per ROI.

    Args:
        path: the RTSTRUCT file.
        source_dir: folder holding the referenced image series (it may hold the RTSTRUCT too).
        strict_geometry: refuse a tilted or unevenly spaced series; by default each contour is rasterised on its
            own slice and the masks resampled (linear, >= 0.5) onto the regular grid the image reads to.

    Returns:
        ``({ROI name: (columns, rows, slices) bool mask}, the source series)``; ROIs in file order.

    Raises:
        InputError: not an RTSTRUCT, the referenced series is not in ``source_dir``, two ROIs share a name, or
            (strict) the series has no regular grid.
    """
    path = Path(path)
    rois, ref = read_rois(path)
    source = source_series(Path(source_dir), ref, allow_irregular=not strict_geometry)
    if source.irregular is not None:
        log.warning("%s: %s: ROIs rasterised on each slice, then resampled onto the regular grid the image reads "
                    "to", path.name, source.irregular.what)
    names = [r.name for r in rois]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(path, f"has several ROIs named {dupes}", "one ROI per name")
    masks = _rasterise(rois, source, path)
    return {r.name: masks[r.number] for r in rois}, source


def read_rtstruct(path: str | Path, source_dir: str | Path | None = None, *, strict_geometry: bool = False
                  ) -> tuple[Volume, dict[int, str]]:
    """Read an RTSTRUCT as a label map on the referenced series' grid.

    Args:
        path: the RTSTRUCT file.
        source_dir: folder holding the referenced image series (it may hold the RTSTRUCT itself); default the
            RTSTRUCT's own folder.
        strict_geometry: refuse a tilted or unevenly spaced series (see :func:`read_rtstruct_masks`).

    Returns:
        ``(label Volume (1, columns, rows, slices), {label value: ROI name})``: the n-th ROI has value n; the Volume
        has exactly the shape and affine that reading the source series gives.

    Raises:
        InputError: see :func:`read_rtstruct_masks`.
    """
    path = Path(path)
    masks, source = read_rtstruct_masks(path, source_dir if source_dir is not None else path.parent,
                                        strict_geometry=strict_geometry)
    names = {value: name for value, name in enumerate(masks, start=1)}
    dtype = np.uint8 if len(names) < 256 else np.uint16
    label = np.zeros(source.shape, dtype=dtype)
    overlap = 0
    for value, mask in zip(names, masks.values()):
        overlap += int(np.count_nonzero(label[mask]))
        label[mask] = value
    if overlap:
        log.warning("%s: ROIs overlap in %d voxels; the label map keeps the later ROI there (per-ROI masks: "
                    "read_rtstruct_masks)", path.name, overlap)
    meta = {"source": str(path), "format": "rtstruct", "rois": {str(k): v for k, v in names.items()},
            "series_uid": source.uid}
    return Volume(label[None], LPS_TO_RAS @ source.affine_lps, 3, meta), names


# --------------------------------------------------------------------------------------------------- writing
def mask_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (``(N, 2)`` in ``(i, j)`` pixel indices) whose even-odd filling is exactly ``mask2d``.

    Args:
        mask2d: boolean slice.

    Returns:
        One vertex array per contour, the closing vertex not repeated.
    """
    from skimage.measure import find_contours

    if not mask2d.any():
        return []
    padded = np.pad(mask2d.astype(np.float32), 1)
    out = []
    for c in find_contours(padded, 0.5):
        c = c - 1.0
        if len(c) > 1 and np.allclose(c[0], c[-1]):
            c = c[:-1]
        ahead, behind = np.roll(c, -1, axis=0) - c, c - np.roll(c, 1, axis=0)
        turn = ahead[:, 0] * behind[:, 1] - ahead[:, 1] * behind[:, 0]
        c = c[np.abs(turn) > 1e-9]  # drop vertices in the middle of straight runs (the shape is unchanged)
        if len(c) >= 3:
            out.append(c)
    return out


def _label_slices(arr: np.ndarray, source: SourceSeries, planes: list[np.ndarray]) -> list[np.ndarray]:
    """The label map on each source slice's own pixels: the grid's slices, or (irregular series) the grid sampled
    at each slice's pixel centres (nearest voxel)."""
    if source.irregular is None:
        return [arr[:, :, k] for k in range(arr.shape[2])]
    from scipy.ndimage import map_coordinates

    inv = np.linalg.inv(source.affine_lps)
    ii, jj = np.meshgrid(np.arange(arr.shape[0]), np.arange(arr.shape[1]), indexing="ij")
    pix = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)])
    out = []
    for plane in planes:
        ijk = (inv @ plane @ pix)[:3]
        out.append(map_coordinates(arr, ijk, order=0, mode="constant", cval=0).reshape(arr.shape[:2]))
    return out


def _ds_values(points: np.ndarray) -> list[str]:
    return [f"{v:.4f}" for v in points.ravel()]  # DS: at most 16 characters


def write_rtstruct(label: Volume, source_dir: str | Path, path: str | Path, labels: dict[int, str], *,
                   colors: dict | None = None, codes: dict | None = None, series_uid: str | None = None,
                   series_description: str = "medseg contours", series_number: int = 301) -> None:
    """Write a label map as an RTSTRUCT of closed planar contours that references the source series, atomically.

    Args:
        label: ``(1, columns, rows, slices)`` integer label map on the source series' grid (for a tilted or
            unevenly spaced series: the regular grid it reads to; contours then go on the series' own slices).
        source_dir: folder holding the source DICOM series.
        path: output ``.dcm`` file.
        labels: label value -> ROI name (value 0 is ignored); every value in the map needs a name.
        colors: optional label value -> RGB ROIDisplayColor (default a palette).
        codes: optional label value -> ``{"type": concept}`` for RTROIIdentificationCodeSequence (default the
            generic concept "Tissue"); see :mod:`medseg.io.label_style`.
        series_uid: the source series; default ``label.meta["series_uid"]``, else the folder's only image series.
        series_description: SeriesDescription of the new RTSTRUCT series.
        series_number: its SeriesNumber.

    Raises:
        InputError: the label is not on the source grid, holds unnamed values, or the source has no
            FrameOfReferenceUID.
        ConfigError: malformed ``colors`` or ``codes``.
    """
    import datetime

    import pydicom
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medseg import __version__
    from medseg.io.atomic import atomic_path
    source_dir = Path(source_dir)
    source, arr, styles = labelled_source(label, source_dir, labels, colors, codes, series_uid,
                                          allow_irregular=True)
    headers = copyable_headers(source)
    first = headers[0]
    if "FrameOfReferenceUID" not in first:
        raise InputError(source_dir, "has no FrameOfReferenceUID", "an image series with a frame of reference "
                         "(an RTSTRUCT's contours are positions in it)")
    for_uid = str(first.FrameOfReferenceUID)
    sop_class = str(first.SOPClassUID)

    meta = FileMetaDataset()
    sop_uid = generate_uid()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTSTRUCT_SOP_CLASS, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.datetime.now()
    for keyword in ("SpecificCharacterSet", *TYPE2_COPIED, "StudyInstanceUID", "StudyDescription"):
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, sop_uid
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), series_number
    ds.SeriesDescription, ds.InstanceNumber = series_description, 1
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "medseg", "medseg", __version__
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = for_uid
    ds.StructureSetLabel = "medseg"
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.StructureSetDate, ds.StructureSetTime
    ds.SeriesDate, ds.SeriesTime = ds.StructureSetDate, ds.StructureSetTime

    def image_ref(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, source.sop_instance_uids[k]
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = source.uid
    series_ref.ContourImageSequence = Sequence([image_ref(k) for k in range(source.shape[2])])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, customary)
    study_ref.ReferencedSOPInstanceUID = str(first.get("StudyInstanceUID", ""))
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = for_uid
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])

    planes = source.slice_planes()
    slices = _label_slices(arr, source, planes)
    rois, contours_seq, observations = [], [], []
    n_contours = 0
    for number, style in enumerate(styles, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, for_uid
        roi.ROIName, roi.ROIGenerationAlgorithm = style.name[:64], "AUTOMATIC"
        rois.append(roi)
        rc = Dataset()
        rc.ROIDisplayColor = list(style.color)
        rc.ReferencedROINumber = number
        items = []
        for k, plane_labels in enumerate(slices):
            for poly in mask_contours(plane_labels == style.value):
                world = (planes[k][:3, :2] @ poly.T).T + planes[k][:3, 3]
                c = Dataset()
                c.ContourImageSequence = Sequence([image_ref(int(k))])
                c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(world)
                c.ContourNumber = len(items) + 1
                c.ContourData = _ds_values(world)
                items.append(c)
        n_contours += len(items)
        rc.ContourSequence = Sequence(items)
        contours_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = number, number
        obs.RTROIInterpretedType, obs.ROIInterpreter = "", ""
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = style.type.value, style.type.scheme
        code.CodeMeaning = style.type.meaning
        obs.RTROIIdentificationCodeSequence = Sequence([code])
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours_seq)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    with atomic_path(path) as tmp:
        pydicom.dcmwrite(str(tmp), ds, enforce_file_format=True)
    log.info("wrote an RTSTRUCT with %d ROI(s), %d contours over %d slices", len(styles), n_contours,
             source.shape[2])
