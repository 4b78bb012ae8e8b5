"""Training labels stored as DICOM-SEG or RTSTRUCT: segment / ROI names mapped to the data set's label values.

Sites name the same structure differently ("Liver", "LIVER", "liver_auto", "Leber"). A case whose label is a
DICOM-SEG or RTSTRUCT file is read by name, not by segment number: every segment label / ROI name is matched,
case-insensitively and ignoring surrounding blanks, to a declared label name (``labels`` of dataset.json, value ->
name) or to one of its aliases (``label_aliases`` of the pipeline YAML, name -> [other names]). Names that match
nothing (a "Body" or "Couch" ROI) are left out of the label map; a declared label that the file does not contain
under any of its names is reported by ``medseg check-dataset`` (it usually means a missing alias, and a label map
without it would teach the network that the structure is background).

The label is rasterised onto the case's DICOM image series (the case's image folder; else the label's own
folder), so it lies exactly on the image grid.

Layouts. A CSV manifest may name a ``.dcm`` SEG/RTSTRUCT in its ``label`` column next to a DICOM series folder as
image; and a folder of case folders, each holding one DICOM image series and one SEG or RTSTRUCT file, is a data
set by itself (:func:`dicom_folder_cases`), with label names from a ``dataset.json`` beside the case folders.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError, InputError
from medseg.io.volume import Volume

__all__ = ["LabelNames", "is_dicom_label", "names_in", "read_label", "read_dicom_label", "parse_label_aliases",
           "attach_label_names", "name_problems", "dicom_folder_cases", "source_of"]

log = logging.getLogger(__name__)


def _norm(name: str) -> str:
    return " ".join(str(name).split()).casefold()


@dataclass(frozen=True)
class LabelNames:
    """Which segment / ROI names stand for which label value.

    Attributes:
        labels: label value -> declared name (value 0, the background, is never matched).
        aliases: declared name -> other names it goes by.
    """

    labels: dict[int, str]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def table(self) -> dict[str, int]:
        """Normalised name -> label value, over declared names and aliases."""
        out: dict[str, int] = {}
        by_name = {_norm(n): v for v, n in self.labels.items() if int(v) != 0}
        out.update(by_name)
        for name, others in self.aliases.items():
            value = by_name[_norm(name)]
            for other in others:
                out[_norm(other)] = value
        return out

    def value_of(self, name: str) -> int | None:
        """The label value a segment / ROI name maps to, or None."""
        return self.table().get(_norm(name))

    def check(self, names: list[str]) -> tuple[list[str], list[str]]:
        """``(declared labels absent from names, names that map to no label)`` for one file's names."""
        table = self.table()
        found = {table[_norm(n)] for n in names if _norm(n) in table}
        missing = [self.labels[v] for v in sorted(self.labels) if int(v) != 0 and v not in found]
        unmapped = [n for n in names if _norm(n) not in table]
        return missing, unmapped


def parse_label_aliases(data: Any, labels: Mapping[int, str] | None = None, where: str = "label_aliases"
                        ) -> dict[str, tuple[str, ...]]:
    """Validate a ``label_aliases`` mapping: declared name -> list of other names (a single string allowed).

    Args:
        data: the YAML value (None for none).
        labels: the declared labels; when given, every key must be one of their names (case-insensitive) and no
            alias may stand for two labels.
        where: key name for messages.

    Returns:
        Name -> tuple of aliases.

    Raises:
        ConfigError: not a mapping of names to lists of names, an unknown label name, or an ambiguous alias.
    """
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(where, data, "a mapping of label name -> list of other names, e.g. {liver: [Leber]}")
    out: dict[str, tuple[str, ...]] = {}
    for key, value in data.items():
        others = [value] if isinstance(value, str) else value
        if not isinstance(others, (list, tuple)) or not all(isinstance(o, str) and o.strip() for o in others):
            raise ConfigError(f"{where}.{key}", value, "a list of names, e.g. [Leber, LIVER_auto]")
        out[str(key)] = tuple(others)
    if labels is not None:
        declared = {_norm(n): n for v, n in labels.items() if int(v) != 0}
        seen: dict[str, str] = {}
        for key, others in out.items():
            if _norm(key) not in declared:
                raise ConfigError(f"{where}.{key}", list(others), "aliases of a declared label name: one of "
                                  + ", ".join(declared.values()))
            for o in (key, *others):
                if seen.setdefault(_norm(o), _norm(key)) != _norm(key):
                    raise ConfigError(f"{where}.{key}", o, f"a name that stands for one label (it also names "
                                      f"{seen[_norm(o)]!r})")
        out = {declared[_norm(k)]: v for k, v in out.items()}
    return out


def is_dicom_label(path: str | Path | None) -> bool:
    """True when ``path`` is a DICOM-SEG or RTSTRUCT file."""
    from medseg.io.dicom import _read_header

    if path is None or not Path(path).is_file():
        return False
    ds = _read_header(Path(path))
    return ds is not None and str(ds.get("Modality", "")).upper() in ("SEG", "RTSTRUCT")


def names_in(path: str | Path) -> list[str]:
    """The segment labels (SEG) or ROI names (RTSTRUCT) of a file, from its header alone.

    Raises:
        InputError: not a SEG or RTSTRUCT.
    """
    from medseg.io.dicom import _read_header

    ds = _read_header(Path(path))
    modality = str(ds.get("Modality", "")).upper() if ds is not None else ""
    if modality == "SEG":
        return [str(s.get("SegmentLabel", "")) for s in ds.get("SegmentSequence", [])]
    if modality == "RTSTRUCT":
        return [str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])]
    raise InputError(path, "is neither a DICOM-SEG nor an RTSTRUCT", "a DICOM label file")


def source_of(label: Path, images: list[Path] | None) -> Path:
    """The folder holding the image series a DICOM label lies on: the case's DICOM image folder, else its own."""
    if images and Path(images[0]).is_dir():
        return Path(images[0])
    return Path(label).parent


def read_dicom_label(path: str | Path, names: LabelNames, source_dir: str | Path) -> Volume:
    """A DICOM-SEG or RTSTRUCT as a label map with the data set's values, on the source series' grid.

    Args:
        path: the SEG or RTSTRUCT file.
        names: the name -> value mapping.
        source_dir: folder holding the referenced image series.

    Returns:
        ``(1, columns, rows, slices)`` uint8/uint16 Volume; ``meta["unmapped"]`` lists names left out.

    Raises:
        InputError: unreadable file, referenced series absent, or two mapped segments overlap with different
            values.
    """
    from medseg.io.dicom_seg import is_dicom_seg, read_dicom_seg
    from medseg.io.rtstruct import read_rtstruct_masks

    path = Path(path)
    table = names.table()
    dtype = np.uint8 if max(names.labels, default=0) < 256 else np.uint16
    if is_dicom_seg(path):
        seg, seg_names = read_dicom_seg(path, source_dir)
        lut = np.zeros(max(seg_names, default=0) + 1, dtype=dtype)
        for number, name in seg_names.items():
            lut[number] = table.get(_norm(name), 0)
        out = lut[np.asarray(seg.array[0], dtype=np.int64)]
        affine, meta = seg.affine, dict(seg.meta)
        file_names = list(seg_names.values())
    else:
        from medseg.io.volume import LPS_TO_RAS

        masks, source = read_rtstruct_masks(path, source_dir)
        out = np.zeros(source.shape, dtype=dtype)
        for name, mask in masks.items():
            value = table.get(_norm(name))
            if value is None:
                continue
            clash = out[mask]
            if np.any((clash != 0) & (clash != value)):
                raise InputError(path, f"ROI {name!r} overlaps another mapped ROI with a different label",
                                 "non-overlapping ROIs for the mapped labels")
            out[mask] = value
        affine, meta = LPS_TO_RAS @ source.affine_lps, {"source": str(path), "format": "rtstruct",
                                                        "series_uid": source.uid}
        file_names = list(masks)
    meta["unmapped"] = [n for n in file_names if _norm(n) not in table]
    if meta["unmapped"]:
        log.debug("%s: names without a label left out: %s", path.name, meta["unmapped"])
    return Volume(out[None], affine, 3, meta)


def read_label(path: str | Path, names: LabelNames | None = None, images: list[Path] | None = None) -> Volume:
    """Read a case's label: a DICOM-SEG / RTSTRUCT by name (:func:`read_dicom_label`), anything else as a file.

    Args:
        path: the label file.
        names: the name mapping, required for DICOM labels.
        images: the case's image paths (a DICOM folder among them is the label's source series).

    Returns:
        The label Volume.

    Raises:
        InputError: a DICOM label without declared label names, or any read error.
    """
    from medseg.io import read_volume

    if not is_dicom_label(path):
        return read_volume(path)
    if names is None or not [v for v in names.labels if int(v) != 0]:
        raise InputError(path, "is a DICOM-SEG/RTSTRUCT label but the data set declares no label names",
                         "labels in dataset.json (value -> name) to map its segment/ROI names to values")
    return read_dicom_label(path, names, source_of(Path(path), images))


def name_problems(case: Any) -> list[tuple[str, str, str, str]]:
    """``(path, problem, expected, severity)`` for a case's DICOM label whose names do not fit the mapping.

    A declared label that the file does not name (under its name or an alias) is an error; names in the file
    that map to no label are a warning (they are left out of the label map).

    Args:
        case: a manifest case (with ``label`` and ``label_names``).

    Returns:
        One tuple per problem; empty for non-DICOM labels.

    Raises:
        InputError: the label file is not a SEG / RTSTRUCT.
    """
    names: LabelNames | None = getattr(case, "label_names", None)
    if names is None or case.label is None:
        return []
    in_file = names_in(case.label)
    missing, unmapped = names.check(in_file)
    listed = ", ".join(repr(n) for n in in_file) or "none"
    out = []
    for name in missing:
        also = names.aliases.get(name, ())
        out.append((str(case.label), f"case {case.case_id}: no segment/ROI named {name!r}"
                    + (f" or {', '.join(repr(a) for a in also)}" if also else "") + f" (names in the file: {listed})",
                    f"a segment/ROI for label {name!r}, or its name at this site added to label_aliases.{name} in the "
                    "pipeline YAML", "error"))
    if unmapped:
        out.append((str(case.label), f"case {case.case_id}: names {', '.join(repr(n) for n in unmapped)} map to no "
                    "label and are left out", "an alias in label_aliases if one of them is a declared label",
                    "warning"))
    return out


def attach_label_names(manifest: Any, aliases: Mapping | None = None) -> None:
    """Give every case whose label is a DICOM-SEG / RTSTRUCT the data set's name mapping (``case.label_names``).

    Args:
        manifest: a :class:`medseg.data.manifest.Manifest`.
        aliases: ``label_aliases`` of the pipeline YAML.

    Raises:
        ConfigError: aliases of undeclared names, or ambiguous aliases.
    """
    mapping = LabelNames(dict(manifest.labels), parse_label_aliases(aliases, manifest.labels))
    from medseg.data.manifest import IMAGE_ENDINGS

    for case in manifest.cases:
        if case.label is None or str(case.label).lower().endswith(IMAGE_ENDINGS):
            continue
        if is_dicom_label(case.label):
            case.label_names = mapping


def dicom_folder_cases(root: Path) -> list[tuple[str, Path, Path]] | None:
    """The DICOM-folder layout: ``root/CASE/`` each with one image series and one SEG or RTSTRUCT file.

    Args:
        root: the data set folder.

    Returns:
        ``[(case id, image folder, label file), ...]`` sorted by case id, or None when ``root`` is not this
        layout (no sub-folder holds a SEG/RTSTRUCT).

    Raises:
        InputError: a case folder with several label files.
    """
    from medseg.io.dicom import _candidate_files

    if not root.is_dir():
        return None
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        labels = [f for f in _candidate_files(sub) if is_dicom_label(f)]
        if len(labels) > 1:
            raise InputError(sub, f"holds {len(labels)} DICOM-SEG/RTSTRUCT files ({', '.join(f.name for f in labels)})",
                             "one label file per case folder")
        if labels:
            out.append((sub.name, sub, labels[0]))
    return out or None
