"""Case manifests: which images and label belong to which case and which patient.

:func:`load_manifest` discovers the cases of a data set from any of these layouts (first match wins):

1. a CSV file (or a folder holding ``manifest.csv``): columns ``case_id, patient_id, image[, image_1, ...],
   label`` with paths relative to the CSV; label names and channel names come from a ``dataset.json`` beside it
   when there is one;
2. an nnU-Net v2 raw folder: ``dataset.json`` with ``channel_names``, ``labels`` (name -> value) and
   ``file_ending``; images ``imagesTr/CASE_0000<ending>`` (one file per channel), labels ``labelsTr/CASE<ending>``;
3. a Medical Segmentation Decathlon folder: ``dataset.json`` with a ``training`` list of ``{image, label}``;
4. a plain ``images/`` + ``labels/`` folder (or ``imagesTr/`` + ``labelsTr/``), matched by file name.

The patient of a case (used only to keep a patient's scans in one fold) comes from the CSV, from a regular
expression on the image file name (``patient_regex``; its first group, or the whole match), or from the DICOM
PatientID of a DICOM image (kept only as a SHA-256 digest, never as the identifier itself); by
default it is the case id, which is logged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.data.dataset_json import check_declared_types, labels_and_channels, read_dataset_json
from medseg.data.regions import Region, parse_regions
from medseg.errors import InputError
from medseg.io.registry import IMAGE_SUFFIXES, PLANAR_SUFFIXES, split_suffix

__all__ = ["Case", "Manifest", "load_manifest", "write_manifest_csv", "IMAGE_ENDINGS", "split_ending"]

log = logging.getLogger(__name__)

#: File endings medseg reads as images: the format table's (:data:`medseg.io.IMAGE_SUFFIXES`), longest first.
IMAGE_ENDINGS = IMAGE_SUFFIXES
_ENDINGS_2D = PLANAR_SUFFIXES
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    """One training or test case.

    Args:
        case_id: unique name of the case within the data set.
        patient_id: the patient (subject) the case belongs to; cases of one patient never straddle folds.
        images: one path per channel, or one multi-channel file, or one DICOM folder.
        label: label map path, or None for unlabelled cases.
        label_names: for a DICOM-SEG / RTSTRUCT label, how its segment / ROI names map to label values
            (:class:`medseg.data.dicom_labels.LabelNames`); None otherwise.
    """

    case_id: str
    patient_id: str
    images: list[Path]
    label: Path | None
    label_names: Any = None


@dataclass
class Manifest:
    """The cases of a data set and what their labels and channels mean.

    Args:
        root: the data set folder (or the CSV's folder).
        name: data set name.
        cases: the cases, sorted by case id.
        labels: label value -> name, e.g. ``{0: "background", 1: "anterior"}``; empty when undeclared.
        channel_names: channel index -> modality, e.g. ``{0: "MRI"}``.
        spatial_dims: 2 for PNG/TIFF data sets, 3 for volumes, None when unknown until read.
        problems: one line per problem found while discovering (unpaired files, missing files).
        layout: the layout it was read as (``"CSV"``, ``"nnU-Net"``, ``"MSD"``, ``"images/labels"``; "" if built
            by hand).
        dataset_json: the dataset.json that describes it, if any.
        declared: the dataset.json's content (what it declares: ``labels``, ``numTraining``, ...), ``{}`` without one.
        ignore_label: the label value that marks unlabelled voxels (dataset.json's ``"ignore": N`` or a label named
            ``ignore``; nnU-Net v2's convention: the highest label value), or None. It is not a class: ``labels``
            does not list it, the network has no output for it, and those voxels take no part in the loss, the
            patch sampling, the planner's statistics or the metrics.
        regions: the regions dataset.json declares (labels whose value is a list, with ``regions_class_order``;
            :mod:`medseg.data.regions`), in order; empty for plain labels. ``labels`` then names the values the
            regions use.
    """

    root: Path
    name: str
    cases: list[Case]
    labels: dict[int, str] = field(default_factory=dict)
    channel_names: dict[int, str] = field(default_factory=dict)
    spatial_dims: int | None = None
    problems: list[str] = field(default_factory=list)
    layout: str = ""
    dataset_json: Path | None = None
    declared: dict = field(default_factory=dict)
    ignore_label: int | None = None
    regions: list[Region] = field(default_factory=list)

    def hash(self) -> str:
        """Stable SHA-256 of the case ids, patient ids and paths relative to ``root``.

        Returns:
            64 hex digits; equal for equal manifests wherever the data set folder lies.
        """
        h = hashlib.sha256()
        for case in sorted(self.cases, key=lambda c: c.case_id):
            paths = [_rel(p, self.root) for p in case.images] + [_rel(case.label, self.root) if case.label else ""]
            h.update(json.dumps([case.case_id, case.patient_id, paths]).encode())
        return h.hexdigest()

    def case(self, case_id: str) -> Case:
        """The case named ``case_id``.

        Raises:
            KeyError: no such case.
        """
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)

    def patients(self) -> dict[str, list[str]]:
        """Patient id -> sorted case ids of that patient."""
        out: dict[str, list[str]] = {}
        for c in self.cases:
            out.setdefault(c.patient_id, []).append(c.case_id)
        return {p: sorted(v) for p, v in sorted(out.items())}


def split_ending(name: str) -> tuple[str, str]:
    """Split a file name into stem and image ending: ``"a_0000.nii.gz"`` -> ``("a_0000", ".nii.gz")``.

    Args:
        name: a file name.

    Returns:
        ``(stem, ending)``; ending is ``""`` for a name without a known image ending.
    """
    return split_suffix(name)


def load_manifest(
    path: str | Path, *, patient_regex: str | None = None, file_ending: str | None = None,
    label_aliases: dict | None = None,
) -> Manifest:
    """Discover the cases of a data set (see the module docstring for the layouts).

    Args:
        path: data set folder, or a CSV manifest.
        patient_regex: regular expression searched in each case's first image file name; its first group (or
            the whole match) is the patient id. Ignored for CSV manifests, which name the patient.
        file_ending: image ending for nnU-Net / plain layouts (e.g. ``".png"``); default: from dataset.json or
            detected from the files.
        label_aliases: other names of the declared labels, for DICOM-SEG / RTSTRUCT labels
            (:mod:`medseg.data.dicom_labels`; the pipeline YAML's ``label_aliases``).

    Returns:
        The manifest, cases sorted by case id.

    Raises:
        InputError: the path is missing, not a known layout, or its dataset.json / CSV is malformed.
    """
    from medseg.data.dicom_labels import attach_label_names

    manifest = _load(Path(path), patient_regex, file_ending)
    attach_label_names(manifest, label_aliases)
    return manifest


def _load(path: Path, patient_regex: str | None, file_ending: str | None) -> Manifest:
    if not path.exists():
        raise InputError(path, "does not exist", "a data set folder or a CSV manifest")
    regex = _compile_regex(patient_regex)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(path, "is a file but not a CSV manifest",
                             "a data set folder (dataset.json, images/+labels/) or a .csv manifest")
        return _finish(_from_csv(path), regex, "CSV")
    if (path / "manifest.csv").is_file():
        log.info("%s: reading cases from manifest.csv", path)
        return _finish(_from_csv(path / "manifest.csv"), regex, "CSV")
    ds_json = path / "dataset.json"
    if ds_json.is_file():
        meta = read_dataset_json(ds_json)
        check_declared_types(meta, ds_json)
        lists_cases = isinstance(meta.get("training"), list) and bool(meta["training"])
        if not lists_cases and ("channel_names" in meta or "file_ending" in meta):
            return _finish(_from_nnunet(path, meta, file_ending), regex, "nnU-Net")
        if "training" in meta:  # a file that lists its cases is taken at its word (even with nnU-Net keys)
            return _finish(_from_msd(path, meta), regex, "MSD")
        if (dicom := _from_dicom_folders(path)) is not None:
            return _finish(dicom, regex, "DICOM folders")
        raise InputError(ds_json, "has neither a 'training' list (MSD) nor 'channel_names'/'file_ending' (nnU-Net v2)",
                         "an MSD or nnU-Net v2 dataset.json")
    for img_dir, lab_dir in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (path / img_dir).is_dir():
            return _finish(_from_folders(path, path / img_dir, path / lab_dir, file_ending), regex, "images/labels")
    if (dicom := _from_dicom_folders(path)) is not None:
        return _finish(dicom, regex, "DICOM folders")
    raise InputError(path, "is not a known data set layout",
                     "a folder with dataset.json (MSD or nnU-Net v2), manifest.csv, or images/ and labels/ sub-folders")


def write_manifest_csv(manifest: Manifest, path: str | Path) -> None:
    """Write ``manifest`` as a CSV manifest (paths relative to the CSV's folder), atomically.

    Args:
        manifest: the manifest to write.
        path: target ``.csv`` file.
    """
    from medseg.io.atomic import atomic_path

    path = Path(path)
    n_img = max((len(c.images) for c in manifest.cases), default=1)
    header = ["case_id", "patient_id", "image"] + [f"image_{i}" for i in range(1, n_img)] + ["label"]
    base = path.parent.resolve()
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for c in manifest.cases:
            imgs = [_rel(p, base) for p in c.images] + [""] * (n_img - len(c.images))
            writer.writerow([c.case_id, c.patient_id, *imgs, _rel(c.label, base) if c.label else ""])


# ------------------------------------------------------------------------------------------------- layouts
def _from_csv(csv_path: Path) -> tuple[Manifest, bool]:
    root = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            rows = list(csv.DictReader(fh))
            columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(csv_path, f"cannot be read as CSV ({exc})", "a UTF-8 CSV file") from None
    required = {"case_id", "image"}
    if not rows or not required <= set(columns):
        raise InputError(csv_path, f"has columns {columns or 'none'}",
                         "a header 'case_id, patient_id, image[, image_1, ...], label' and one row per case")
    img_cols = ["image"] + sorted((c for c in columns if re.fullmatch(r"image_\d+", c)), key=lambda c: int(c[6:]))
    cases, problems, seen = [], [], set()
    for line_no, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        cid = row["case_id"]
        if not cid:
            raise InputError(csv_path, f"line {line_no} has an empty case_id", "a unique case_id on every row")
        if cid in seen:
            raise InputError(csv_path, f"line {line_no} repeats case_id {cid!r}", "unique case ids")
        seen.add(cid)
        images = [root / row[c] for c in img_cols if row.get(c)]
        if not images:
            raise InputError(csv_path, f"line {line_no} (case {cid}) names no image", "an image path")
        label = root / row["label"] if row.get("label") else None
        for p in images + ([label] if label else []):
            if not p.exists():
                problems.append(f"{p}: listed for case {cid} in {csv_path.name} but missing; expected the file to exist")
        cases.append(Case(cid, row.get("patient_id", ""), images, label))
    meta = read_dataset_json(root / "dataset.json") if (root / "dataset.json").is_file() else {}
    labels, channels = labels_and_channels(meta, root / "dataset.json")
    name = str(meta.get("name", root.name))
    has_patients = "patient_id" in columns
    man = Manifest(root, name, cases, labels, channels, _dims_from(meta, cases), problems)
    if meta:
        man.dataset_json, man.declared = root / "dataset.json", meta
    return man, has_patients


def _from_msd(root: Path, meta: dict) -> tuple[Manifest, bool]:
    ds_json = root / "dataset.json"
    entries = meta.get("training")
    if not isinstance(entries, list):
        raise InputError(ds_json, "'training' is not a list", "a list of {\"image\": ..., \"label\": ...} entries")
    cases, problems, listed = [], [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(ds_json, f"training entry {i} is {entry!r}", "{\"image\": path, \"label\": path}")
        for key in ("image", "label"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise InputError(ds_json, f"training[{i}].{key} is {entry[key]!r} ({type(entry[key]).__name__})",
                                 "a path string relative to dataset.json")
        img = Path(os.path.normpath(root / entry["image"]))
        lab = Path(os.path.normpath(root / entry["label"])) if entry.get("label") else None
        cid = split_ending(img.name)[0]
        for p in [img] + ([lab] if lab else []):
            if not p.exists():
                problems.append(f"{p}: listed for case {cid} in dataset.json but missing; expected the file to exist")
            listed.add(p.resolve())
        cases.append(Case(cid, "", [img], lab))
    for sub, what in (("imagesTr", "image"), ("labelsTr", "label")):
        for p in _image_files(root / sub):
            if p.resolve() not in listed:
                problems.append(f"{p}: {what} not listed in dataset.json 'training' (unpaired {what}); "
                                f"expected an entry pairing it with its {'label' if what == 'image' else 'image'}")
    if not cases:
        raise InputError(ds_json, "lists no cases in 'training' (an empty list)",
                         "one {\"image\": ..., \"label\": ...} entry per training case")
    labels, channels = labels_and_channels(meta, ds_json)
    man = Manifest(root, str(meta.get("name", root.name)), cases, labels, channels, _dims_from(meta, cases), problems)
    man.dataset_json, man.declared = ds_json, meta
    return man, False


def _from_nnunet(root: Path, meta: dict, file_ending: str | None) -> tuple[Manifest, bool]:
    ds_json = root / "dataset.json"
    ending = file_ending or meta.get("file_ending")
    if not ending:
        raise InputError(ds_json, "has no 'file_ending'", "e.g. \"file_ending\": \".nii.gz\"")
    labels, channels = labels_and_channels(meta, ds_json)
    n_ch = max(len(channels), 1)
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    if not img_dir.is_dir():
        raise InputError(root, "has no imagesTr/ folder", "an nnU-Net v2 raw folder with imagesTr/ and labelsTr/")
    by_case: dict[str, dict[int, Path]] = {}
    problems: list[str] = []
    for p in sorted(img_dir.iterdir()):
        if not p.name.endswith(ending) or p.name.startswith("."):
            continue
        m = _CHANNEL_SUFFIX.match(p.name[: -len(ending)])
        if not m:
            problems.append(f"{p}: image name lacks the _XXXX channel suffix; expected CASE_0000{ending}")
            continue
        by_case.setdefault(m["case"], {})[int(m["channel"])] = p
    labels_found = {p.name[: -len(ending)]: p for p in sorted(lab_dir.glob(f"*{ending}"))} if lab_dir.is_dir() else {}
    cases = []
    for cid, chans in sorted(by_case.items()):
        missing = [i for i in range(n_ch) if i not in chans]
        if missing:
            problems.append(f"{img_dir / cid}: case {cid} lacks channel(s) {missing}; expected "
                            + ", ".join(f"{cid}_{i:04d}{ending}" for i in range(n_ch)))
            continue
        extra = sorted(set(chans) - set(range(n_ch)))
        if extra:
            problems.append(f"{chans[extra[0]]}: channel {extra[0]} beyond the {n_ch} declared in channel_names; "
                            "expected channels 0.." + str(n_ch - 1))
        label = labels_found.pop(cid, None)
        if label is None:
            problems.append(f"{chans[0]}: image of case {cid} has no label (unpaired image); "
                            f"expected {lab_dir / (cid + ending)}")
        cases.append(Case(cid, "", [chans[i] for i in range(n_ch)], label))
    for cid, p in labels_found.items():
        problems.append(f"{p}: label of case {cid} has no image (unpaired label); expected {img_dir / (cid + '_0000' + ending)}")
    if not cases:
        files = [p.name for p in sorted(img_dir.iterdir()) if not p.name.startswith(".")]
        found = (f"found {len(files)} entr{'y' if len(files) == 1 else 'ies'}: " + ", ".join(files[:5])
                 + (f" and {len(files) - 5} more" if len(files) > 5 else "")) if files else "it is empty"
        raise InputError(img_dir, f"holds no nnU-Net cases: looked for CASE_0000{ending}"
                         + (f" .. CASE_{n_ch - 1:04d}{ending}" if n_ch > 1 else "")
                         + f" (file_ending {ending!r} from {'--file-ending' if file_ending else 'dataset.json'}); "
                         + found, "image files named CASE_XXXX" + ending + " (or a dataset.json 'training' list)")
    dims = 2 if ending.lower() in _ENDINGS_2D else 3
    man = Manifest(root, str(meta.get("name", root.name)), cases, labels, channels, dims, problems)
    man.dataset_json, man.declared = ds_json, meta
    return man, False


def _from_folders(root: Path, img_dir: Path, lab_dir: Path, file_ending: str | None) -> tuple[Manifest, bool]:
    images = _image_files(img_dir, file_ending)
    labels = {split_ending(p.name)[0]: p for p in _image_files(lab_dir, file_ending)} if lab_dir.is_dir() else {}
    if not images:
        raise InputError(img_dir, "holds no image files", "images ending in " + ", ".join(IMAGE_ENDINGS))
    stems = [split_ending(p.name)[0] for p in images]
    # nnU-Net-style channel suffixes (_0000, _0001) when every image carries one and labels lack it
    multi = all(_CHANNEL_SUFFIX.match(s) for s in stems) and not any(_CHANNEL_SUFFIX.match(s) for s in labels)
    by_case: dict[str, list[Path]] = {}
    for p, s in zip(images, stems):
        cid = _CHANNEL_SUFFIX.match(s)["case"] if multi else s
        by_case.setdefault(cid, []).append(p)
    cases, problems = [], []
    for cid, paths in sorted(by_case.items()):
        label = labels.pop(cid, None)
        if label is None and lab_dir.is_dir():
            problems.append(f"{paths[0]}: image of case {cid} has no label (unpaired image); "
                            f"expected {lab_dir / (cid + split_ending(paths[0].name)[1])}")
        cases.append(Case(cid, "", sorted(paths), label))
    for cid, p in sorted(labels.items()):
        problems.append(f"{p}: label of case {cid} has no image (unpaired label); "
                        f"expected {img_dir / (cid + split_ending(p.name)[1])}")
    meta = read_dataset_json(root / "dataset.json") if (root / "dataset.json").is_file() else {}
    lab_names, channels = labels_and_channels(meta, root / "dataset.json")
    if not channels:
        n_ch = max(len(c.images) for c in cases)
        channels = {i: f"channel_{i}" for i in range(n_ch)}
    man = Manifest(root, str(meta.get("name", root.name)), cases, lab_names, channels, _dims_from(meta, cases), problems)
    if meta:
        man.dataset_json, man.declared = root / "dataset.json", meta
    return man, False


# ------------------------------------------------------------------------------------------------- helpers
def _from_dicom_folders(root: Path) -> tuple[Manifest, bool] | None:
    """Case folders each holding a DICOM series and its SEG/RTSTRUCT (:func:`medseg.data.dicom_labels.dicom_folder_cases`)."""
    from medseg.data.dicom_labels import dicom_folder_cases

    found = dicom_folder_cases(root)
    if found is None:
        return None
    meta = read_dataset_json(root / "dataset.json") if (root / "dataset.json").is_file() else {}
    cases = [Case(cid, "", [image], label) for cid, image, label in found]
    labels, channels = labels_and_channels(meta, root / "dataset.json")
    return Manifest(root, str(meta.get("name", root.name)), cases, labels, channels, 3, []), False


def _finish(built: tuple[Manifest, bool], regex: re.Pattern | None, layout: str) -> Manifest:
    man, has_patients = built
    man.layout = layout
    man.regions = parse_regions(man.declared, man.dataset_json) or []
    _take_ignore_label(man)
    man.cases.sort(key=lambda c: c.case_id)
    if has_patients and all(c.patient_id for c in man.cases):
        source = "the CSV's patient_id column"
        if regex is not None:
            log.info("--patient-regex ignored: the CSV manifest names each case's patient")
    elif regex is not None:
        for c in man.cases:
            c.patient_id = _patient_from_regex(regex, c)
        source = f"--patient-regex {regex.pattern!r} on image file names"
    elif any(_is_dicom(c.images[0]) for c in man.cases):
        for c in man.cases:
            c.patient_id = c.patient_id or _patient_from_dicom(c.images[0]) or c.case_id
        source = "DICOM PatientID (stored as a digest)"
    else:
        missing = [c for c in man.cases if not c.patient_id]
        for c in missing:
            c.patient_id = c.case_id
        source = "the case id (one patient per case; give --patient-regex or a CSV with patient_id to group scans)"
    n_pat = len({c.patient_id for c in man.cases})
    log.info("%s: %s layout, %d cases of %d patients; patient id from %s",
             man.root, layout, len(man.cases), n_pat, source)
    return man


def _compile_regex(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    from medseg.errors import ConfigError

    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError("--patient-regex", pattern, f"a valid regular expression ({exc})") from None


def _patient_from_regex(regex: re.Pattern, case: Case) -> str:
    name = case.images[0].name
    m = regex.search(name)
    if not m:
        raise InputError(case.images[0], f"file name does not match --patient-regex {regex.pattern!r}",
                         "a pattern that matches every image name, e.g. '^(\\d+)_' for NNN_2HC.png")
    pid = m.group(1) if m.groups() else m.group(0)
    if not pid:
        raise InputError(case.images[0], f"--patient-regex {regex.pattern!r} matched an empty patient id",
                         "a pattern whose first group captures a non-empty patient id")
    return pid


def _is_dicom(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() == ".dcm"


def _patient_from_dicom(path: Path) -> str | None:
    """SHA-256 digest of the DICOM PatientID (the identifier itself is never kept, logged or printed)."""
    import pydicom

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files[:20]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID"])
        except Exception:  # not a DICOM file: try the next one
            continue
        pid = str(ds.get("PatientID", "") or "")
        if pid:
            return "dicom-" + hashlib.sha256(pid.encode()).hexdigest()[:16]
    return None


def _image_files(folder: Path, file_ending: str | None = None) -> list[Path]:
    if not folder.is_dir():
        return []
    from medseg.io.atomic import TMP_MARKER

    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or TMP_MARKER in p.name:
            continue
        if file_ending is not None:
            if p.name.endswith(file_ending):
                out.append(p)
        elif split_ending(p.name)[1]:
            out.append(p)
    return out


def _take_ignore_label(man: Manifest) -> None:
    """Move the ignore label (``"ignore": N`` or a label named ``ignore``) out of ``man.labels`` into
    ``man.ignore_label``; it must be the highest label value (nnU-Net v2's rule)."""
    where = man.dataset_json or man.root / "dataset.json"
    named = [v for v, n in man.labels.items() if n.strip().lower() == "ignore"]
    top = man.declared.get("ignore")
    if top is not None and top < 0:
        raise InputError(where, f"'ignore' is {top}", "a non-negative label value (the highest one)")
    if named and top is not None and top != named[0]:
        raise InputError(where, f"'ignore' is {top} but the label named 'ignore' has the value {named[0]}",
                         "one ignore value: either 'ignore': N or a label named 'ignore'")
    value = named[0] if named else top
    if value is None:
        return
    others = [v for v in man.labels if v != value]
    if value == 0 or (others and value < max(others)):
        raise InputError(where, f"the ignore label {value} is not the highest label value (labels "
                                f"{sorted(man.labels)})", "the ignore label above every class value, as nnU-Net v2 "
                                                          f"requires (e.g. {max(others + [0]) + 1})")
    man.labels.pop(value, None)
    man.ignore_label = int(value)


def _dims_from(meta: dict, cases: list[Case]) -> int | None:
    if cases and all(split_ending(c.images[0].name)[1].lower() in _ENDINGS_2D for c in cases):
        return 2
    tis = str(meta.get("tensorImageSize", "")).upper()
    if tis in ("3D", "4D"):
        return 3
    if tis == "2D":
        return 2
    if cases and not any(split_ending(c.images[0].name)[1].lower() in _ENDINGS_2D for c in cases):
        return 3
    return None


def _rel(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()
