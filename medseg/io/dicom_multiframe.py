"""Enhanced (and legacy-converted enhanced) multi-frame DICOM images: one file, per-frame functional groups.

Each frame's geometry comes from its functional groups, the per-frame item overriding the shared one:
PlanePositionSequence (ImagePositionPatient), PlaneOrientationSequence (ImageOrientationPatient), PixelMeasuresSequence
(PixelSpacing, SliceThickness) and PixelValueTransformationSequence (rescale slope/intercept). The frames of one
stack then go through exactly the checks and the ordering of a classic series
(:func:`medseg.io.dicom.headers_geometry`, including the resampling of tilted or unevenly spaced stacks), so an
enhanced file converted from a classic series reads to the same volume and geometry as the series.

Stacks and dimensions. A file may hold several stacks (StackID), time points (TemporalPositionIndex), echoes
(MREchoSequence EffectiveEchoTime) or other dimensions of its DimensionIndexSequence. Frames are grouped by every
such attribute that varies across the file but repeats (positions within a stack, and dimensions with a distinct
value on every frame, which order frames, never split a group); each group is a
:class:`FrameStack`, listed by :func:`list_stacks` and chosen with ``stack=`` (its number ``"1"``, ``"2"``, ...
or its full description) as a series is chosen by UID. A file with several groups and no choice is refused with
the list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import LPS_TO_RAS, Volume

__all__ = ["FrameStack", "list_stacks", "read_multiframe"]

log = logging.getLogger(__name__)

_POSITION_POINTERS = {0x00200032, 0x00209057, 0x00209056}  # ImagePositionPatient, InStackPositionNumber, StackID


@dataclass(frozen=True)
class FrameStack:
    """One stack of frames in a multi-frame file.

    Attributes:
        id: ``"1"``, ``"2"``, ... in the order of the grouping attributes.
        description: what the group shares, e.g. ``"StackID 1, EffectiveEchoTime 12.5"`` (``""`` when the file
            holds a single stack).
        frames: its frame indices in the file (0-based, file order).
    """

    id: str
    description: str
    frames: tuple[int, ...]

    def summary(self) -> str:
        """One line: ``stack ID (description): N frames``."""
        what = f" ({self.description})" if self.description else ""
        return f"stack {self.id}{what}: {len(self.frames)} frames"


def _item(seq_owner, keyword: str):
    seq = seq_owner.get(keyword) if seq_owner is not None else None
    return seq[0] if seq else None


def _frame_value(shared, per_frame, group: str, keyword: str):
    for owner in (per_frame, shared):
        item = _item(owner, group)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _frame_keys(ds) -> list[tuple[tuple[str, str], ...]]:
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    dims = list(ds.get("DimensionIndexSequence", []))
    keys = []
    for f in per:
        parts: list[tuple[str, str]] = []
        stack_id = _frame_value(shared, f, "FrameContentSequence", "StackID")
        if stack_id is not None:
            parts.append(("StackID", str(stack_id)))
        tpi = _frame_value(shared, f, "FrameContentSequence", "TemporalPositionIndex")
        if tpi is not None:
            parts.append(("TemporalPositionIndex", str(tpi)))
        echo = _frame_value(shared, f, "MREchoSequence", "EffectiveEchoTime")
        if echo is not None:
            parts.append(("EffectiveEchoTime", f"{float(echo):g}"))
        div = _frame_value(shared, f, "FrameContentSequence", "DimensionIndexValues")
        if div is not None and dims:
            values = list(div) if hasattr(div, "__len__") else [div]
            for d, v in zip(dims, values):
                pointer = int(d.DimensionIndexPointer)
                if pointer in _POSITION_POINTERS:
                    continue
                label = str(d.get("DimensionDescriptionLabel", "") or f"dimension {pointer:08x}")
                parts.append((label, str(v)))
        keys.append(tuple(parts))
    return keys


def _read(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"cannot be read as DICOM ({type(exc).__name__})", "a multi-frame image") from None


def _stacks_of(ds, path: Path) -> list[FrameStack]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds or len(ds.PerFrameFunctionalGroupsSequence) != n:
        raise InputError(path, f"is a multi-frame object with {n} frames but without per-frame functional groups",
                         "an enhanced multi-frame image (per-frame plane position and orientation)")
    keys = [dict(k) for k in _frame_keys(ds)]
    names = list(dict.fromkeys(name for k in keys for name in k))
    # a dimension with a value of its own on every frame orders frames (positions, legacy instance numbers), it
    # does not group them; one that varies with repeats is a stack, time point, echo, ...
    varying = [name for name in names if 1 < len({k.get(name) for k in keys}) < len(keys)]
    groups: dict[tuple, list[int]] = {}
    for frame, key in enumerate(keys):
        groups.setdefault(tuple((name, key.get(name, "")) for name in varying), []).append(frame)

    def order(key: tuple) -> tuple:
        return tuple((name, float(v)) if _is_number(v) else (name, 0.0, v) for name, v in key)

    out = []
    for number, key in enumerate(sorted(groups, key=order), start=1):
        out.append(FrameStack(str(number), ", ".join(f"{name} {value}" for name, value in key), tuple(groups[key])))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def list_stacks(path: str | Path) -> list[FrameStack]:
    """The stacks (groups of frames along space) of a multi-frame file.

    Args:
        path: an enhanced multi-frame DICOM image.

    Returns:
        One :class:`FrameStack` per combination of stack, time point, echo or other non-spatial dimension.

    Raises:
        InputError: not readable, or no per-frame functional groups.
    """
    path = Path(path)
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for a file that is not DICOM
        raise InputError(path, f"cannot be read as DICOM ({type(exc).__name__})", "a multi-frame image") from None
    return _stacks_of(ds, path)


def _select(stacks: list[FrameStack], stack: str | None, path: Path) -> FrameStack:
    listing = "; ".join(s.summary() for s in stacks)
    if stack is None:
        if len(stacks) == 1:
            return stacks[0]
        raise InputError(path, f"holds {len(stacks)} stacks or dimensions: {listing}",
                         "one of them: pass --stack ID (stack= in Python)")
    for s in stacks:
        if str(stack) in (s.id, s.description):
            return s
    raise InputError(path, f"has no stack {stack!r}", f"one of: {listing}")


def _frame_headers(ds, frames: tuple[int, ...], path: Path) -> list:
    from pydicom.dataset import Dataset

    shared = _item(ds, "SharedFunctionalGroupsSequence")
    out = []
    for i in frames:
        f = ds.PerFrameFunctionalGroupsSequence[i]
        h = Dataset()
        h.Rows, h.Columns = ds.Rows, ds.Columns
        for group, keyword in (("PlanePositionSequence", "ImagePositionPatient"),
                               ("PlaneOrientationSequence", "ImageOrientationPatient"),
                               ("PixelMeasuresSequence", "PixelSpacing"),
                               ("PixelMeasuresSequence", "SliceThickness"),
                               ("PixelMeasuresSequence", "SpacingBetweenSlices")):
            value = _frame_value(shared, f, group, keyword)
            if value is not None:
                setattr(h, keyword, value)
        in_stack = _frame_value(shared, f, "FrameContentSequence", "InStackPositionNumber")
        h.InstanceNumber = int(in_stack) if in_stack is not None else i + 1
        h.SOPInstanceUID = ""
        out.append((Path(f"{path.name} frame {i + 1}"), h))
    return out


def _rescale(ds, frames: tuple[int, ...], pixels: np.ndarray) -> np.ndarray:
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    slopes, intercepts = [], []
    for i in frames:
        f = ds.PerFrameFunctionalGroupsSequence[i]
        s = _frame_value(shared, f, "PixelValueTransformationSequence", "RescaleSlope")
        b = _frame_value(shared, f, "PixelValueTransformationSequence", "RescaleIntercept")
        slopes.append(float(s) if s not in (None, "") else float(ds.get("RescaleSlope", 1) or 1))
        intercepts.append(float(b) if b not in (None, "") else float(ds.get("RescaleIntercept", 0) or 0))
    if all(s == 1 for s in slopes) and all(b == 0 for b in intercepts):
        return pixels
    s = np.asarray(slopes, dtype=np.float32)[:, None, None]
    b = np.asarray(intercepts, dtype=np.float32)[:, None, None]
    return pixels.astype(np.float32) * s + b


def read_multiframe(path: str | Path, stack: str | None = None, *, strict_geometry: bool = False) -> Volume:
    """Read one stack of an enhanced multi-frame DICOM image into a 3D :class:`Volume`.

    Args:
        path: the multi-frame file.
        stack: the stack to read (see :func:`list_stacks`); required when the file holds several.
        strict_geometry: refuse a tilted or unevenly spaced stack instead of resampling it.

    Returns:
        A ``(1, columns, rows, frames)`` Volume (RAS affine), ``meta`` as for a series plus ``stack``.

    Raises:
        InputError: several stacks and no choice, an unknown stack, frames without plane geometry, refused
            geometry, or pixel data that cannot be decoded.
    """
    from medseg.io.dicom import headers_geometry
    from medseg.io.dicom_geometry import IrregularSlices, resample_irregular

    path = Path(path)
    ds = _read(path)
    chosen = _select(_stacks_of(ds, path), stack, path)
    headers = _frame_headers(ds, chosen.frames, path)
    frame_of = {name: i for (name, _), i in zip(headers, chosen.frames)}
    irregular = None
    try:
        names, affine_lps, _ = headers_geometry(headers, path)
    except IrregularSlices as exc:
        if strict_geometry:
            raise
        irregular = exc.geometry
        names, affine_lps = irregular.files, np.eye(4)
    order = tuple(frame_of[n] for n in names)
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom's decoders raise many types for data they cannot decode
        raise InputError(path, f"pixel data cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})",
                         "an uncompressed or pydicom-decodable multi-frame image") from None
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3:
        raise InputError(path, f"has pixel data of shape {pixels.shape}", "one-sample (grey) frames")
    pixels = _rescale(ds, order, pixels[list(order)])
    array = np.transpose(pixels, (2, 1, 0))[None]  # (frame, row, col) -> (1, col, row, frame)
    meta = {"source": str(path), "format": "dicom", "series_uid": str(ds.get("SeriesInstanceUID", "")),
            "modality": str(ds.get("Modality", "") or ""),
            "series_description": str(ds.get("SeriesDescription", "") or ""), "source_files": [str(path)],
            "sop_instance_uids": [], "stack": chosen.id, "frames": [i + 1 for i in order]}
    if irregular is not None:
        array, affine_lps, note = resample_irregular(array, irregular)
        log.warning("%s: %s", path, note)
        meta["geometry_note"] = note
    log.debug("read a multi-frame %s image: %d frames of stack %s", meta["modality"], len(order), chosen.id)
    return Volume(np.ascontiguousarray(array), LPS_TO_RAS @ affine_lps, 3, meta)
