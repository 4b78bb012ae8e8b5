"""DICOM image series: listing the series in a folder and reading one into a :class:`Volume`.

pydicom reads the headers (series grouping, slice geometry checks); SimpleITK's GDCM series reader decodes the
pixels (all transfer syntaxes GDCM supports, rescale slope/intercept applied).

Geometry. DICOM patient coordinates are LPS+ (+x towards the patient's Left, +y Posterior, +z Superior). For a
series of single-frame images with ImageOrientationPatient ``(r, c)`` (row and column direction cosines),
PixelSpacing ``(dr, dc)`` (distance between rows, then between columns) and ImagePositionPatient ``p_k`` of the
slices sorted along the normal ``n = r x c``, the LPS voxel-to-world affine of medseg's voxel order
``(i = column index, j = row index, k = slice index)`` is::

    [ r * dc | c * dr | n * dz | p_0 ]      with dz = (n . p_last - n . p_0) / (K - 1)

and medseg's RAS affine is ``diag(-1, -1, 1, 1) @ affine_lps`` (:data:`medseg.io.volume.LPS_TO_RAS`): only the
signs of the first two world rows change; voxel order and array are untouched. SimpleITK's ``(z, y, x)`` array is
transposed to ``(x, y, z)``.

Refused explicitly (each an :class:`~medseg.errors.InputError`): slices with different orientation, size or pixel
spacing, several images at one position (echoes, phases). Gantry tilt (slice positions not along the normal) and
irregular spacing (missing slices) are resampled onto a regular grid with a warning (:mod:`medseg.io.dicom_geometry`),
or refused with ``strict_geometry=True``. An enhanced multi-frame object (one file) is read by
:mod:`medseg.io.dicom_multiframe`. Accepted: slice gaps (the spacing is the distance between slice centres, not
SliceThickness), one-slice series, oblique orientations.

Volume.meta of a DICOM volume holds ``series_uid``, ``modality``, ``series_description``, ``source_files`` and
``sop_instance_uids`` (both in slice order), which is what a DICOM-SEG needs to reference the series. It never
holds patient identifiers, and nothing here logs UIDs or patient attributes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import TMP_MARKER
from medseg.io.dicom_geometry import IrregularSlices, SliceStack, resample_irregular
from medseg.io.volume import LPS_TO_RAS, Volume

__all__ = ["SeriesInfo", "list_dicom_series", "read_dicom_series", "series_geometry", "headers_geometry",
           "NON_IMAGE_MODALITIES"]

log = logging.getLogger(__name__)

#: Modalities of DICOM objects that are not images of the patient (listed, never read as a volume).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "RWV", "DOC",
                                  "FID", "PLAN", "AU", "ECG", "HD"})

_ORIENT_TOL = 1e-4  # direction cosines that differ by more than this are a different orientation
_POS_TOL = 1e-3  # mm


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder.

    Attributes:
        uid: SeriesInstanceUID.
        description: SeriesDescription ("" when absent).
        modality: Modality, e.g. ``"CT"``, ``"MR"``, ``"SEG"``.
        num_slices: number of images (frames) in the series.
        files: the series' files, sorted by name (slice order is decided when reading).
        is_image: False for non-image objects (SEG, RTSTRUCT, SR, ...), which are listed but never read as images.
        kind: ``"image"`` or the SOP class name of a non-image object (e.g. ``"Segmentation Storage"``).
        number: SeriesNumber, or None.
    """

    uid: str
    description: str
    modality: str
    num_slices: int
    files: tuple[Path, ...]
    is_image: bool
    kind: str
    number: int | None = None

    def summary(self) -> str:
        """One line: ``UID 'description' MODALITY, N slices`` (or the object kind for non-images)."""
        what = f"{self.num_slices} slice{'s' if self.num_slices != 1 else ''}" if self.is_image else \
            f"{self.kind}, {len(self.files)} file{'s' if len(self.files) != 1 else ''} (not an image)"
        return f"{self.uid} '{self.description}' {self.modality}, {what}"


def _candidate_files(folder: Path) -> list[Path]:
    files = []
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name.startswith(".") or TMP_MARKER in f.name or f.name.upper() == "DICOMDIR":
            continue
        files.append(f)
    return files


def _read_header(path: Path):
    """pydicom dataset without pixel data, or None when ``path`` is not a DICOM file (or not a regular file: a
    named pipe or device would block the read)."""
    import pydicom

    if not Path(path).is_file():
        return None
    try:
        from medseg.io.guard import raw_dicom_element

        size = Path(path).stat().st_size
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=1 << 20)  # large values: not read yet
        for tag in list(ds.keys()):  # a damaged length field claims more bytes than the file has (found by fuzzing)
            elem = raw_dicom_element(ds, tag)
            length = getattr(elem, "length", 0)
            if getattr(elem, "value", b"") is None and length != 0xFFFFFFFF and length > size:
                raise ValueError(f"element {tag} claims {length} bytes in a file of {size}")
        for _ in ds.iterall():  # convert every value now: a damaged one fails here, not deep in the geometry code
            pass
        return ds
    except Exception as exc:  # InvalidDicomError, EOFError, OSError, and on damaged headers struct.error,
        # BytesLengthException, ... (found by fuzzing): the file is not usable DICOM, whatever the type
        log.debug("skipping %s: not readable as DICOM (%s)", path.name, type(exc).__name__)
        return None


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _is_image(ds) -> tuple[bool, str]:
    modality = str(ds.get("Modality", "")).upper()
    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", str(sop)) if sop is not None else "unknown SOP class"
    if modality in NON_IMAGE_MODALITIES or "Rows" not in ds or "Columns" not in ds:
        return False, sop_name
    return True, "image"


def list_dicom_series(folder: str | Path) -> list[SeriesInfo]:
    """List the DICOM series in ``folder`` (searched recursively), image series first, then non-image objects.

    Args:
        folder: a folder; files that are not DICOM (NRRD, text, DICOMDIR) are ignored.

    Returns:
        One :class:`SeriesInfo` per SeriesInstanceUID, images first, each group sorted by series number and UID.

    Raises:
        InputError: ``folder`` is not a folder, or holds no DICOM files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder", "a folder holding a DICOM series")
    groups: dict[str, list] = defaultdict(list)
    for f in _candidate_files(folder):
        ds = _read_header(f)
        if ds is None and _has_preamble(f):  # a damaged DICOM file is refused, not left out of its series
            raise InputError(f, "is a damaged DICOM file (its header cannot be parsed)",
                             "complete DICOM files (copy the series again)")
        if ds is None or "SeriesInstanceUID" not in ds:
            continue
        groups[str(ds.SeriesInstanceUID)].append((f, ds))
    if not groups:
        raise InputError(folder, "contains no DICOM files", "a folder holding one DICOM image series")
    out = []
    for uid, items in groups.items():
        first = items[0][1]
        is_img, kind = _is_image(first)
        n = sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in items)
        number = first.get("SeriesNumber")
        out.append(SeriesInfo(uid=uid, description=str(first.get("SeriesDescription", "") or ""),
                              modality=str(first.get("Modality", "") or ""), num_slices=n,
                              files=tuple(sorted(f for f, _ in items)), is_image=is_img, kind=kind,
                              number=None if number in (None, "") else int(number)))
    out.sort(key=lambda s: (not s.is_image, s.number if s.number is not None else 1 << 30, s.uid))
    return out


def _select_series(folder: Path, series: list[SeriesInfo], series_uid: str | None) -> SeriesInfo:
    images = [s for s in series if s.is_image]
    if series_uid is not None:
        for s in series:
            if s.uid == series_uid:
                if not s.is_image:
                    raise InputError(folder, f"series {series_uid} is a {s.kind} object, not an image series",
                                     "the UID of an image series: " + "; ".join(i.summary() for i in images))
                return s
        raise InputError(folder, f"has no series with UID {series_uid}",
                         "one of: " + ("; ".join(i.summary() for i in images) or "(no image series)"))
    if not images:
        others = "; ".join(s.summary() for s in series)
        raise InputError(folder, f"contains no DICOM image series (only {others})", "a folder with an image series")
    if len(images) > 1:
        listing = "; ".join(s.summary() for s in images)
        raise InputError(folder, f"contains {len(images)} image series: {listing}",
                         "one series: pass --series UID (series_uid= in Python) to choose one")
    return images[0]


def _floats(ds, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n else None


def series_geometry(files: list[Path] | tuple[Path, ...], where: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Validate a single-frame image series' geometry and order its slices.

    Args:
        files: the series' files (any order).
        where: the folder, for error messages.

    Returns:
        ``(files in slice order, 4x4 LPS affine of (column, row, slice) indices, SOPInstanceUIDs in slice order)``.

    Raises:
        InputError: multi-frame images, slices with different size/orientation/pixel spacing, several images at one
            position, gantry tilt, or irregular slice spacing (missing slices).
    """
    headers = []
    for f in files:
        ds = _read_header(Path(f))
        if ds is None:
            raise InputError(f, "cannot be read as DICOM", "a readable DICOM image file")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(f, f"is a multi-frame (enhanced) DICOM object with {int(ds.NumberOfFrames)} frames",
                             "a classic series of single-frame images (enhanced multi-frame is not supported)")
        headers.append((Path(f), ds))
    return headers_geometry(headers, where)


def headers_geometry(headers: list, where: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """:func:`series_geometry` of already read ``(name, header)`` pairs (also a multi-frame object's frames).

    Args:
        headers: ``(path or frame name, dataset with Rows, Columns, PixelSpacing, ImageOrientationPatient,
            ImagePositionPatient)`` pairs, any order.
        where: the folder or file, for error messages.

    Returns:
        As :func:`series_geometry`.

    Raises:
        InputError: as :func:`series_geometry`; :class:`~medseg.io.dicom_geometry.IrregularSlices` for gantry tilt
            and uneven spacing.
    """
    first_path, first = headers[0]
    size = (first.get("Rows"), first.get("Columns"))
    for f, ds in headers[1:]:
        if (ds.get("Rows"), ds.get("Columns")) != size:
            raise InputError(where, f"has inconsistent slice geometry: {f.name} is {ds.get('Rows')}x{ds.get('Columns')}"
                             f" pixels but {first_path.name} is {size[0]}x{size[1]}", "slices of one size")
    spacings = [_floats(ds, "PixelSpacing", 2) for _, ds in headers]
    if spacings[0] is None:
        spacings = [_floats(ds, "ImagerPixelSpacing", 2) for _, ds in headers]
    ps = spacings[0] if spacings[0] is not None else np.ones(2)
    for (f, _), s in zip(headers, spacings):
        if s is not None and not np.allclose(s, ps, atol=1e-4):
            raise InputError(where, f"has inconsistent slice geometry: PixelSpacing of {f.name} is {list(s)} but "
                             f"{first_path.name} has {list(ps)}", "one pixel spacing for all slices")
    iops = [_floats(ds, "ImageOrientationPatient", 6) for _, ds in headers]
    ipps = [_floats(ds, "ImagePositionPatient", 3) for _, ds in headers]
    if any(v is None for v in iops) or any(v is None for v in ipps):
        if len(headers) > 1:
            raise InputError(where, "has slices without ImagePositionPatient/ImageOrientationPatient",
                             "a cross-sectional image series (CT, MR, PET) with patient geometry")
        log.warning("%s has no patient geometry tags; using an identity orientation and origin 0", first_path.name)
        iops, ipps = [np.array([1.0, 0, 0, 0, 1, 0])], [np.zeros(3)]
    iop0 = iops[0]
    for (f, _), iop in zip(headers, iops):
        if not np.allclose(iop, iop0, atol=_ORIENT_TOL):
            raise InputError(where, f"has inconsistent in-plane geometry: ImageOrientationPatient of {f.name} "
                             f"differs from {first_path.name} (localizer or radial slices?)",
                             "slices that share one orientation")
    row, col = iop0[:3] / np.linalg.norm(iop0[:3]), iop0[3:] / np.linalg.norm(iop0[3:])
    normal = np.cross(row, col)
    dist = np.array([p @ normal for p in ipps])
    inst = [int(ds.get("InstanceNumber", 0) or 0) for _, ds in headers]
    order = sorted(range(len(headers)), key=lambda i: (dist[i], inst[i]))
    dist = dist[order]
    positions = [ipps[i] for i in order]
    ordered = [headers[i] for i in order]
    n = len(ordered)
    if n > 1:
        steps = np.diff(dist)
        dup = int(np.sum(steps < _POS_TOL))
        if dup:
            raise InputError(where, f"has {dup + 1} or more images at the same slice position (several echoes, phases "
                             "or time points in one series?)", "one image per slice position")
        stack = SliceStack([f for f, _ in ordered], np.array(positions), row, col, ps,
                           [str(ds.get("SOPInstanceUID", "")) for _, ds in ordered])
        tilt = float(ordered[0][1].get("GantryDetectorTilt", 0) or 0)
        for p, d in zip(positions, dist):
            off = p - positions[0]
            inplane = np.linalg.norm(off - (off @ normal) * normal)
            if inplane > _POS_TOL + 2e-3 * abs(d - dist[0]) or abs(tilt) > 1e-3:
                angle = np.degrees(np.arctan2(inplane, abs(d - dist[0]))) if inplane else tilt
                stack.what = f"gantry tilt of {angle:.2f} degrees"
                raise IrregularSlices(where, f"has gantry tilt (slice positions lie {angle:.2f} degrees off the "
                                      "slice normal)", "an untilted series (or read without --strict-geometry to "
                                      "resample it onto a regular grid)", stack)
        dz = (dist[-1] - dist[0]) / (n - 1)
        if np.max(np.abs(steps - dz)) > max(_POS_TOL, 0.01 * dz):
            k = int(np.argmax(np.abs(steps - dz)))
            stack.what = f"uneven slice spacing ({steps.min():.4g} to {steps.max():.4g} mm)"
            raise IrregularSlices(where, f"has irregular slice spacing ({steps.min():.4g} to {steps.max():.4g} mm; "
                                  f"the step after slice {k} is {steps[k]:.4g} mm, the mean {dz:.4g} mm): missing "
                                  "slices?", "a complete series with evenly spaced slices (or read without "
                                  "--strict-geometry to resample it onto a regular grid)", stack)
    else:
        ds = ordered[0][1]
        dz = float(ds.get("SpacingBetweenSlices", 0) or 0) or float(ds.get("SliceThickness", 0) or 0) or 1.0
    affine = np.eye(4)
    affine[:3, 0] = row * ps[1]
    affine[:3, 1] = col * ps[0]
    affine[:3, 2] = normal * dz
    affine[:3, 3] = positions[0]
    sops = [str(ds.get("SOPInstanceUID", "")) for _, ds in ordered]
    return [f for f, _ in ordered], affine, sops


def read_dicom_series(path: str | Path, series_uid: str | None = None, *, strict_geometry: bool = False,
                      stack: str | None = None) -> Volume:
    """Read one DICOM image series into a 3D :class:`Volume` (RAS affine; see the module docstring).

    Args:
        path: a folder (searched recursively) or a single DICOM file (read as a one-slice series).
        series_uid: SeriesInstanceUID to read; required when the folder holds several image series.
        strict_geometry: refuse gantry-tilted and unevenly spaced series (default: resample them onto a regular
            grid with a warning, :mod:`medseg.io.dicom_geometry`).
        stack: for an enhanced multi-frame object holding several stacks or dimensions (echoes, time points), the
            one to read (:mod:`medseg.io.dicom_multiframe`).

    Returns:
        A ``(C, columns, rows, slices)`` Volume (C = 1, or 3 for RGB), with DICOM references in ``meta``.

    Raises:
        InputError: no series, several series and no ``series_uid``, refused geometry (see the module docstring),
            or pixel data that cannot be decoded.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.is_file():
        ds = _read_header(path)
        if ds is None or "SeriesInstanceUID" not in ds:
            raise InputError(path, "is not a DICOM file", "a DICOM image file or a folder holding a DICOM series")
        is_img, kind = _is_image(ds)
        if not is_img:
            raise InputError(path, f"is a {kind} object, not an image", "a DICOM image")
        info = SeriesInfo(str(ds.SeriesInstanceUID), str(ds.get("SeriesDescription", "") or ""),
                          str(ds.get("Modality", "") or ""), int(ds.get("NumberOfFrames", 1) or 1), (path,), True,
                          "image")
    else:
        info = _select_series(path, list_dicom_series(path), series_uid)
    if len(info.files) == 1 and info.num_slices > 1:
        from medseg.io.dicom_multiframe import read_multiframe

        return read_multiframe(info.files[0], stack=stack, strict_geometry=strict_geometry)
    if stack is not None:
        raise InputError(path, f"is a classic series of {len(info.files)} single-frame images",
                         "no --stack (it chooses a stack of an enhanced multi-frame file)")
    irregular = None
    try:
        files, affine_lps, sops = series_geometry(info.files, path)
    except IrregularSlices as exc:
        if strict_geometry:
            raise
        irregular = exc.geometry
        files, affine_lps, sops = irregular.files, np.eye(4), []
    from medseg.io.guard import check_dicom_pixel_data

    check_dicom_pixel_data(files, path)  # size limit and truncated pixel data, before anything is decoded
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(path, f"pixel data of series {info.uid} cannot be decoded ({_first_line(exc)})",
                         "DICOM images in a transfer syntax GDCM supports") from None
    arr = sitk.GetArrayFromImage(img)  # (k, j, i[, c])
    if arr.ndim == 2:
        arr = arr[None]
    if img.GetNumberOfComponentsPerPixel() > 1:
        array = np.transpose(arr, (3, 2, 1, 0))
    else:
        array = np.transpose(arr, (2, 1, 0))[None]
    note = None
    if irregular is not None:
        array, affine_lps, note = resample_irregular(array, irregular)
        log.warning("%s: %s", path, note)
    elif len(files) > 1:
        itk_origin = np.array(img.GetOrigin())
        if not np.allclose(itk_origin, affine_lps[:3, 3], atol=1e-3):
            log.debug("SimpleITK origin %s differs from the IPP-derived origin %s", itk_origin, affine_lps[:3, 3])
    meta = {
        "source": str(path),
        "format": "dicom",
        "series_uid": info.uid,
        "modality": info.modality,
        "series_description": info.description,
        "source_files": [str(f) for f in files],
        "sop_instance_uids": sops,
    }
    if note is not None:
        meta["geometry_note"] = note  # resampled: voxels no longer are the slices' pixels (no SOP references)
    log.debug("read DICOM series: %d slices of %s", len(files), info.modality)
    return Volume(np.ascontiguousarray(array), LPS_TO_RAS @ affine_lps, 3, meta)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(exc).__name__
