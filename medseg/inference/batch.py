"""Batch prediction of many cases: discovery, sharding, resumable atomic outputs and a per-run report.

What ``medseg predict`` runs. Every case is independent: a failure is caught, recorded in one line and the
batch goes on; outputs are written through :func:`medseg.io.atomic_path`, the label map last, so a case whose
mask exists is complete and is skipped by a rerun (unless ``overwrite``). ``shard=(I, N)`` keeps the cases whose
position in the sorted case list is ``I`` modulo ``N``, so N processes share one folder with no coordination.

Inputs (:func:`discover_inputs`). The input may mix kinds; each entry of the folder is classified on its own:

* an image file (any suffix of :data:`medseg.io.IMAGE_SUFFIXES`) -> one case named after the file, or nnU-Net
  channel naming ``CASE_0000.nii.gz``, ``CASE_0001...`` when every image file follows it and each case has exactly
  the model's channels 0..C-1;
* DICOM files directly in the folder -> one case per image series among them (named after the folder; with
  several series ``FOLDER_sN``, N the SeriesNumber); DICOM objects that are not images (SEG, RTSTRUCT, SR) are
  skipped;
* a sub-folder holding DICOM files -> one case (its series), named after the sub-folder;
* anything else (other files, folders without DICOM files, dangling links, link loops, FIFOs, hidden files,
  medseg temporaries) is skipped, with the reason.

The report (:func:`write_report`) accounts for every entry of the input: ``predicted``, ``skipped`` (why) or
``failed`` (why), next to one result per case. Its own write reserves its disk space before the first case is
predicted, so that a disk that fills up during the run still gets its report (or one line saying why not).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError, InputError, MedsegError
from medseg.inference.dicom_output import DICOM_FORMATS, mask_file_name, write_dicom_mask
from medseg.io.atomic import TMP_MARKER, remove_stale_temporaries, temporary_name
from medseg.io.registry import split_suffix

__all__ = ["CaseInput", "CaseResult", "InputEntry", "Discovery", "discover_inputs", "discover_cases", "shard_cases",
           "parse_shard", "output_paths", "prepare_output", "predict_cases", "account_inputs", "ReportWriter",
           "write_report", "describe_exception", "REPORT_NAME"]

log = logging.getLogger(__name__)

REPORT_NAME = "predict_report.json"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class CaseInput:
    """One case to predict.

    Args:
        case_id: output name stem.
        images: one file per channel, or one DICOM series folder.
        kind: ``"file"`` or ``"dicom"``.
        series_uid: the series to read from ``images[0]`` (DICOM files lying directly in a folder that holds more).
        entries: the input entries (paths relative to the input) this case is made of.
    """

    case_id: str
    images: list[Path]
    kind: str = "file"
    series_uid: str | None = None
    entries: list[str] = field(default_factory=list)


@dataclass
class CaseResult:
    """What happened to one case: ``status`` is ``"written"``, ``"skipped"`` or ``"failed"``.

    ``warnings`` holds what was accepted but is worth knowing (e.g. NaN voxels replaced).
    """

    case_id: str
    status: str
    error: str | None = None
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source_files: list[str] | None = field(default=None, repr=False)  # files read (not in the report)


@dataclass
class InputEntry:
    """One entry of the input (a file or folder directly in it, or a file inside a DICOM case folder).

    ``status`` is ``"predicted"``, ``"skipped"`` or ``"failed"`` (``"pending"`` until :func:`account_inputs`).
    """

    path: str
    kind: str
    status: str = "pending"
    case_id: str | None = None
    reason: str | None = None
    files: int | None = None


@dataclass
class Discovery:
    """The cases found under an input path and every entry of it."""

    root: Path
    cases: list[CaseInput]
    entries: list[InputEntry]

    def skipped(self) -> list[InputEntry]:
        """Entries that are no part of any case."""
        return [e for e in self.entries if e.case_id is None]


def _stem(path: Path) -> str | None:
    stem, suffix = split_suffix(path.name)
    return stem if suffix else None


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_dicom_file(path: Path) -> bool:
    """A regular file that is DICOM by suffix or by the ``DICM`` preamble (never opens a FIFO or device)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    return path.suffix.lower() == ".dcm" or _has_dicom_magic(path)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or path.name
    except ValueError:
        return str(path)


def _link_problem(p: Path, root: Path) -> str | None:
    """Why a symbolic link cannot be followed (dangling, loop, or a folder that contains the input), else None."""
    if not p.is_symlink():
        return None
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"dangling symbolic link (its target {os.readlink(p)!r} does not exist)"
    target = p.resolve()
    if target.is_dir():
        here = root.resolve()
        if target == here or target in here.parents:
            return "symbolic link to a folder that contains the input (a loop)"
    return None


def _walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(regular files, other entries) below ``folder``; links to folders are not followed."""
    files, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        for d in dirnames:
            if (base / d).is_symlink():
                others.append(base / d)
        for name in filenames:
            p = base / name
            try:
                regular = stat.S_ISREG(os.stat(p).st_mode)
            except OSError:
                regular = False
            (files if regular else others).append(p)
    return sorted(files), sorted(others)


def _classify(p: Path, root: Path, exclude: set[Path]) -> tuple[str, str | None]:
    """``("image"|"dicom"|"folder"|"skip", reason)`` for a top-level entry."""
    problem = _link_problem(p, root)
    if problem:
        return "skip", problem
    if p.name.startswith(TMP_MARKER):
        return "skip", "temporary file of an interrupted medseg run"
    if p.name.startswith("."):
        return "skip", "hidden entry"
    try:
        mode = os.stat(p).st_mode
    except OSError as exc:
        return "skip", f"cannot be inspected ({exc.strerror})"
    if stat.S_ISDIR(mode):
        if p.resolve() in exclude:
            return "skip", "this run's output folder"
        return "folder", None
    if not stat.S_ISREG(mode):
        return "skip", "not a regular file (FIFO, socket or device)"
    if _stem(p) is not None:
        return "image", None
    if p.name.upper() == "DICOMDIR":
        return "skip", "DICOMDIR index (the series' files are read instead)"
    if _is_dicom_file(p):
        return "dicom", None
    suffix = "".join(p.suffixes[-2:]) if p.suffixes else ""
    return "skip", f"not an image (unsupported file type {suffix or 'without suffix'!r})"


def _dicom_groups(files: list[Path], root: Path, entries: dict[str, InputEntry]) -> dict[str, list[tuple[Path, Any]]]:
    """Image series among DICOM files lying directly in the input; other objects are marked skipped."""
    from medseg.io.dicom import _is_image, _read_header

    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for f in files:
        entry = entries[_rel(f, root)]
        ds = _read_header(f)
        if ds is None:
            entry.status, entry.reason = "skipped", "not readable as DICOM"
            continue
        if "SeriesInstanceUID" not in ds:
            entry.status, entry.reason = "skipped", "DICOM file without SeriesInstanceUID"
            continue
        is_img, kind = _is_image(ds)
        if not is_img:
            modality = str(ds.get("Modality", "") or "?")
            entry.status, entry.reason = "skipped", f"DICOM {modality} object ({kind}), not an image"
            continue
        groups[str(ds.SeriesInstanceUID)].append((f, ds))
    return groups


def discover_inputs(path: str | Path, in_channels: int = 1, *, exclude: Sequence[str | Path] = ()) -> Discovery:
    """Find the cases under an input path and classify every entry of it (see the module docstring).

    Args:
        path: a file, or a folder mixing image files, DICOM files and DICOM series folders.
        in_channels: the model's input channels (decides whether ``_0000`` names are channels).
        exclude: folders never read as input (the run's output folder when it lies inside the input).

    Returns:
        The :class:`Discovery`: cases sorted by ``case_id``, entries sorted by path.

    Raises:
        InputError: the path does not exist, holds no cases (the message says what it holds), or two cases would
            share an output name.
    """
    root = Path(path)
    if not root.exists():
        problem = _link_problem(root, root.parent) if root.is_symlink() else None
        raise InputError(root, problem or "does not exist", "a NIfTI file, a folder of cases or a DICOM series folder")
    if root.is_file():
        stem = _stem(root)
        if stem is None:
            if _is_dicom_file(root):
                raise InputError(root, "is a single DICOM file", "the folder holding its DICOM series")
            raise InputError(root, "has an unknown image type", "a .nii/.nii.gz/.nrrd/.mha file or a folder")
        m = _CHANNEL.match(stem)
        case_id = m.group("case") if m and in_channels == 1 and m.group("ch") == "0000" else stem
        entry = InputEntry(root.name, "file", case_id=case_id)
        return Discovery(root, [CaseInput(case_id, [root], entries=[root.name])], [entry])
    if not root.is_dir():
        raise InputError(root, "is not a regular file or folder", "a NIfTI file, a folder of cases or a DICOM folder")
    excluded = {Path(p).resolve() for p in exclude}
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        raise InputError(root, f"cannot be listed ({exc.strerror})", "a readable folder") from None
    entries: dict[str, InputEntry] = {}
    images, dicoms, folders = [], [], []
    for p in children:
        what, reason = _classify(p, root, excluded)
        kind = "symlink" if p.is_symlink() and what == "skip" else ("folder" if what == "folder" else "file")
        entry = entries[_rel(p, root)] = InputEntry(_rel(p, root), kind)
        if what == "skip":
            entry.status, entry.reason = "skipped", reason
        elif what == "image":
            images.append(p)
        elif what == "dicom":
            dicoms.append(p)
        else:
            folders.append(p)
    cases = _group_channels(images, in_channels, root)
    groups = _dicom_groups(dicoms, root, entries)
    numbers = [str(items[0][1].get("SeriesNumber", "") or "") for items in groups.values()]
    for i, (uid, items) in enumerate(sorted(groups.items(), key=lambda kv: sorted(kv[1])[0][0].name)):
        if len(groups) == 1:
            cid = root.name
        else:
            num = str(items[0][1].get("SeriesNumber", "") or "")
            cid = f"{root.name}_s{num}" if num and numbers.count(num) == 1 else f"{root.name}_{i + 1}"
        cases.append(CaseInput(cid, [root], "dicom", series_uid=uid, entries=[_rel(f, root) for f, _ in items]))
    for sub in folders:
        entry = entries[_rel(sub, root)]
        files, others = _walk_files(sub)
        entry.files = len(files) + len(others)
        if any(_is_dicom_file(f) for f in files):
            cases.append(CaseInput(sub.name, [sub], "dicom", entries=[entry.path]))
            continue
        n_img = sum(_stem(f) is not None for f in files)
        what = f"{len(files)} file(s)" + (f", {n_img} of them image files" if n_img else "")
        entry.status = "skipped"
        entry.reason = (f"folder without DICOM files ({what}); sub-folders are read as DICOM series only"
                        + (" (put image files directly in the input folder)" if n_img else ""))
    by_entry = {e: c.case_id for c in cases for e in c.entries}
    for path_, cid in by_entry.items():
        entries[path_].case_id = cid
    if not cases:
        listing = "; ".join(f"{e.path} ({e.reason})" for e in list(entries.values())[:5])
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        found = f"found {len(entries)} entries: {listing}{more}" if entries else "it is empty"
        raise InputError(root, f"holds no images ({found})",
                         "image files (.nii.gz, .nrrd, .mha, ...), CASE_0000.nii.gz channel files, DICOM files or "
                         "DICOM series folders")
    seen: dict[str, CaseInput] = {}
    for c in cases:
        if c.case_id in seen:
            raise InputError(root, f"has two inputs for case {c.case_id!r} ({seen[c.case_id].entries[0]}, "
                                   f"{c.entries[0]})", "one input per case name")
        seen[c.case_id] = c
    return Discovery(root, sorted(cases, key=lambda c: c.case_id), sorted(entries.values(), key=lambda e: e.path))


def discover_cases(path: str | Path, in_channels: int = 1) -> list[CaseInput]:
    """The cases under an input path (:func:`discover_inputs` without the entry accounting).

    Raises:
        InputError: the path does not exist, holds no cases, or two cases would share an output name.
    """
    return discover_inputs(path, in_channels).cases


def _group_channels(files: list[Path], in_channels: int, root: Path | None = None) -> list[CaseInput]:
    """nnU-Net channel naming when every file has it and every case has exactly channels 0..C-1."""
    def rel(p: Path) -> str:
        return _rel(p, root) if root is not None else p.name

    groups: dict[str, dict[int, Path]] = {}
    for f in files:
        m = _CHANNEL.match(_stem(f) or "")
        if not m:
            groups = {}
            break
        groups.setdefault(m.group("case"), {})[int(m.group("ch"))] = f
    if groups and all(sorted(g) == list(range(in_channels)) for g in groups.values()):
        return [CaseInput(cid, [g[i] for i in range(in_channels)], entries=[rel(g[i]) for i in range(in_channels)])
                for cid, g in groups.items()]
    return [CaseInput(_stem(f) or f.name, [f], entries=[rel(f)]) for f in files]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (0 <= I < N) -> ``(I, N)``; None -> None.

    Raises:
        ConfigError: malformed text.
    """
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError("--shard", text, "I/N with 0 <= I < N, e.g. 0/4 (SLURM: $SLURM_ARRAY_TASK_ID/N)")
    return int(m.group(1)), int(m.group(2))


def shard_cases(cases: Sequence[CaseInput], shard: tuple[int, int] | None) -> list[CaseInput]:
    """The cases of shard ``(I, N)``: positions ``I, I + N, ...`` of the sorted list (all when None)."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    if shard is None:
        return ordered
    i, n = shard
    return ordered[i::n]


def output_paths(out_dir: Path, case_id: str, *, output_format: str = "nifti", probabilities: bool = False,
                 uncertainty: bool = False) -> dict[str, Path]:
    """Output files of a case: ``mask`` (always, written last), ``probabilities`` and ``uncertainty`` if asked."""
    out = {"mask": out_dir / mask_file_name(case_id, output_format)}
    if probabilities:
        out["probabilities"] = out_dir / f"{case_id}_probabilities.nii.gz"
    if uncertainty:
        out["uncertainty"] = out_dir / f"{case_id}_uncertainty.nii.gz"
    return out


def _report_name(shard: tuple[int, int] | None) -> str:
    return REPORT_NAME if shard is None else f"predict_report.shard-{shard[0]}-of-{shard[1]}.json"


def _owned_names(cases: Sequence[CaseInput]) -> set[str]:
    """Every output name a case of this run may have had, whatever the options of the run that was killed."""
    names = set()
    for c in cases:
        names |= {f"{c.case_id}.nii.gz", f"{c.case_id}.dcm", f"{c.case_id}_probabilities.nii.gz",
                  f"{c.case_id}_uncertainty.nii.gz"}
    return names


def prepare_output(out_dir: str | Path, input_path: str | Path | None = None) -> Path:
    """Check and create the output folder.

    Raises:
        InputError: ``out_dir`` is an existing file, the input folder itself, or cannot be created.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder", "an output folder (new or existing) for the masks")
    if input_path is not None and Path(input_path).is_dir() and out.resolve() == Path(input_path).resolve():
        raise InputError(out, "is the input folder: masks named like the inputs would replace them",
                         "a separate output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot be created ({exc.strerror})", "a writable output folder") from None
    return out


def describe_exception(exc: BaseException) -> str:
    """One line for any exception (an OSError names its file; an empty message names the type)."""
    if isinstance(exc, MemoryError):
        return "ran out of memory (MemoryError); a smaller --batch-size or --max-voxels below the free memory helps"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror} ({type(exc).__name__})"
    text = " ".join(str(exc).split())
    if isinstance(exc, MedsegError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_image(case: CaseInput, *, strict_geometry: bool = False):
    """The case's image as one float32 Volume; refuses values float32 cannot hold."""
    from medseg.io import Volume, read_volume
    from medseg.transforms.case import load_case

    try:
        with np.errstate(over="raise"):
            if case.series_uid is not None:
                vol = read_volume(case.images[0], series_uid=case.series_uid, strict_geometry=strict_geometry)
                return Volume(np.asarray(vol.array, dtype=np.float32), vol.affine, vol.spatial_dims, dict(vol.meta))
            return load_case(case.images, strict_geometry=strict_geometry)[0]
    except FloatingPointError:
        raise InputError(case.images[0], "holds values beyond the float32 range (|v| > 3.4e38)",
                         "intensities that a float32 image can hold") from None


def check_image_values(image, where: str | Path | None) -> list[str]:
    """Refuse an image no prediction can be trusted on; repair and report what can be repaired.

    Refused: any Inf, a channel that is all NaN. Repaired with a warning: some NaN voxels (set to the channel's
    finite minimum, i.e. background). Warned: a channel of one constant value.

    Returns:
        The warnings (one line each).

    Raises:
        InputError: Inf voxels or an all-NaN channel.
    """
    arr = image.array
    out = []
    if arr.dtype.kind != "f":
        return out
    for c in range(arr.shape[0]):
        ch = arr[c]
        n_inf = int(np.isinf(ch).sum())
        if n_inf:
            raise InputError(where, f"holds {n_inf} Inf voxel(s) of {ch.size}" + (f" in channel {c}" if arr.shape[0] > 1
                                                                               else ""), "finite intensities")
        nan = np.isnan(ch)
        n_nan = int(nan.sum())
        if n_nan == ch.size:
            raise InputError(where, "holds only NaN values" + (f" in channel {c}" if arr.shape[0] > 1 else ""),
                             "an image with finite intensities")
        if n_nan:
            fill = float(ch[~nan].min())
            ch[nan] = fill
            out.append(f"{where}: {n_nan} NaN voxel(s) of {ch.size} set to the channel minimum {fill:g}")
        if float(ch.min()) == float(ch.max()):
            out.append(f"{where}: every voxel{f' of channel {c}' if arr.shape[0] > 1 else ''} is {float(ch.min()):g} "
                       "(a blank image?)")
    return out


def _check_plan_size(predictor: Any, image, where: str | Path | None) -> None:
    """Refuse an image whose grid at the trained spacing would exceed the voxel limit (before resampling)."""
    from medseg.io.guard import check_resampled

    record = predictor.record
    target = list(record.config.spacing)
    if len(target) != image.spatial_dims:
        return  # preprocessing reports the mismatch
    from medseg.transforms.case import ras_ornt

    ornt = np.asarray(ras_ornt(image.affine, image.spatial_dims))
    shape, spacing = [0] * image.spatial_dims, [0.0] * image.spatial_dims
    for i, (n, sp) in enumerate(zip(image.shape, image.spacing)):
        axis = int(ornt[i, 0])
        shape[axis], spacing[axis] = n, sp
    if record.config.frame == "acquisition":  # the case's own coarse axis goes last, as preprocessing does
        from medseg.planning.plan import acquisition_permutation

        perm = acquisition_permutation(spacing)
        shape, spacing = [shape[p] for p in perm], [spacing[p] for p in perm]
    channels = record.in_channels + record.num_classes
    check_resampled(where, shape, spacing, target, channels, purpose=f"for configuration {record.configuration}")


def predict_cases(predictor: Any, cases: Sequence[CaseInput], out_dir: str | Path, *,
                  output_format: str = "nifti", probabilities: bool = False, uncertainty: bool = False,
                  overwrite: bool = False, on_case: Callable[[CaseResult], None] | None = None,
                  strict_geometry: bool = False) -> list[CaseResult]:
    """Predict every case, writing its outputs atomically; never raises for a single case's failure.

    Each image is checked before it is predicted: values (:func:`check_image_values`) and its grid at the plan's
    spacing against the voxel limit. Temporaries that a killed run left for any of these cases' outputs are removed
    first, whether or not the case is predicted again.

    Args:
        predictor: a :class:`medseg.inference.Predictor` (anything with ``predict_full``).
        cases: from :func:`discover_inputs` / :func:`shard_cases`.
        out_dir: output folder (created).
        output_format: ``"nifti"``, ``"dicom-seg"`` or ``"rtstruct"`` (the last two for DICOM inputs only).
        probabilities: also write ``CASE_probabilities.nii.gz`` (K channels, float32).
        uncertainty: also write ``CASE_uncertainty.nii.gz`` (predictive entropy, nats).
        overwrite: predict cases whose outputs already exist (default: skip them).
        on_case: called with each :class:`CaseResult` as soon as it is known (progress, printing).
        strict_geometry: fail tilted or unevenly spaced DICOM series instead of resampling them.

    Returns:
        One result per case, in order.

    Raises:
        ConfigError: an unknown output format.
        InputError: ``out_dir`` is an existing file or cannot be created.
    """
    from medseg.io.nifti import write_nifti

    if output_format != "nifti" and output_format not in DICOM_FORMATS:
        raise ConfigError("--output-format", output_format, "'nifti', 'dicom-seg' or 'rtstruct'")
    out_dir = prepare_output(out_dir)
    remove_stale_temporaries(out_dir, _owned_names(cases))
    results = []
    for case in cases:
        t0 = time.perf_counter()
        paths = output_paths(out_dir, case.case_id, output_format=output_format, probabilities=probabilities,
                             uncertainty=uncertainty)
        if not overwrite and all(p.is_file() for p in paths.values()):
            res = CaseResult(case.case_id, "skipped", outputs=[p.name for p in paths.values()])
        else:
            warnings: list[str] = []
            try:
                if output_format in DICOM_FORMATS and case.kind != "dicom":
                    raise InputError(case.images[0], "is not a DICOM series", f"DICOM input for --output-format "
                                                                              f"{output_format} (or use nifti)")
                image = _load_image(case, strict_geometry=strict_geometry)
                where = image.meta.get("source") or case.images[0]
                warnings = list(image.meta.get("warnings") or []) + check_image_values(image, where)
                for w in warnings:
                    log.warning("%s: warning: %s", case.case_id, w)
                _check_plan_size(predictor, image, where)
                pred = predictor.predict_full(image, probabilities=probabilities, uncertainty=uncertainty)
                if probabilities:
                    write_nifti(pred.probabilities, paths["probabilities"], dtype="float32")
                if uncertainty:
                    write_nifti(pred.uncertainty, paths["uncertainty"], dtype="float32")
                if output_format in DICOM_FORMATS:
                    write_dicom_mask(output_format, pred.label, case.images[0], paths["mask"], predictor,
                                     series_uid=image.meta.get("series_uid"))
                else:
                    write_nifti(pred.label, paths["mask"], dtype=pred.label.array.dtype)
                res = CaseResult(case.case_id, "written", outputs=[p.name for p in paths.values()],
                                 warnings=warnings, source_files=image.meta.get("source_files"))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # one case's failure must not stop the batch; reported, not hidden
                log.debug("case %s failed", case.case_id, exc_info=True)
                res = CaseResult(case.case_id, "failed", error=describe_exception(exc), warnings=warnings)
        res.seconds = round(time.perf_counter() - t0, 3)
        results.append(res)
        if on_case is not None:
            on_case(res)
    return results


def account_inputs(discovery: Discovery, results: Sequence[CaseResult],
                   shard: tuple[int, int] | None = None) -> list[InputEntry]:
    """Give every input entry its final status from its case's result (a DICOM case folder also lists the files
    inside it that were not part of the series read).

    Args:
        discovery: from :func:`discover_inputs`.
        results: from :func:`predict_cases` (the cases of this shard).
        shard: this run's shard; entries of other shards' cases are ``skipped`` with the shard that owns them.

    Returns:
        The entries (also updated in ``discovery``), sorted by path.
    """
    by_case = {r.case_id: r for r in results}
    order = {c.case_id: i for i, c in enumerate(sorted(discovery.cases, key=lambda c: c.case_id))}
    cases = {c.case_id: c for c in discovery.cases}
    extra: list[InputEntry] = []
    for e in discovery.entries:
        if e.case_id is None:
            continue
        res = by_case.get(e.case_id)
        if res is None:
            owner = f"{order[e.case_id] % shard[1]}/{shard[1]}" if shard else "another run"
            e.status, e.reason = "skipped", f"case {e.case_id} belongs to shard {owner}"
        elif res.status == "written":
            e.status, e.reason = "predicted", None
        elif res.status == "skipped":
            e.status, e.reason = "skipped", "already predicted: its outputs exist (--overwrite predicts it again)"
        else:
            e.status, e.reason = "failed", res.error
        case = cases[e.case_id]
        if e.kind == "folder" and case.kind == "dicom" and res is not None and res.source_files:
            used = {str(Path(f).resolve()) for f in res.source_files}
            files, others = _walk_files(discovery.root / e.path)
            for f in files + others:
                if str(f.resolve()) not in used:
                    extra.append(InputEntry(_rel(f, discovery.root), "file", "skipped", None,
                                            f"not a slice of the image series read for case {e.case_id}"))
    discovery.entries = sorted(discovery.entries + extra, key=lambda x: x.path)
    return discovery.entries


class ReportWriter:
    """Writes the report atomically into disk space reserved when it is created.

    The reservation (a medseg temporary of about ``reserve`` bytes) is made before the first case is predicted;
    the final JSON overwrites it in place and is renamed over the report, so a disk that filled up during the run
    still gets its report. When the reservation was not possible or is too small, the write is tried as usual and,
    failing that, raises one :class:`~medseg.errors.InputError` line.
    """

    def __init__(self, out_dir: str | Path, shard: tuple[int, int] | None = None, reserve: int = 1 << 16):
        self.path = Path(out_dir) / _report_name(shard)
        remove_stale_temporaries(self.path.parent, {self.path.name})
        self.tmp: Path | None = temporary_name(self.path)
        self.reserved = 0
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                try:
                    os.posix_fallocate(fd, 0, reserve)
                except (AttributeError, OSError) as exc:
                    if getattr(exc, "errno", None) == errno.ENOSPC:
                        raise
                    os.write(fd, b" " * reserve)
            finally:
                os.close(fd)
            self.reserved = reserve
        except OSError as exc:
            log.warning("%s: cannot reserve %d bytes for the report (%s); it is written at the end", self.path,
                        reserve, exc.strerror)
            self.discard()

    def write(self, data: dict[str, Any]) -> Path:
        """Write ``data`` as the report.

        Raises:
            InputError: the report cannot be written (one line: which file, why).
        """
        last: OSError | None = None
        for text in (json.dumps(data, indent=2) + "\n", json.dumps(data, separators=(",", ":")) + "\n"):
            blob = text.encode()
            try:
                if self.tmp is not None and self.tmp.exists():
                    with open(self.tmp, "r+b") as fh:
                        fh.write(blob)
                        fh.truncate(len(blob))
                        fh.flush()
                        os.fsync(fh.fileno())
                else:
                    self.tmp = temporary_name(self.path)
                    with open(self.tmp, "wb") as fh:
                        fh.write(blob)
                os.replace(self.tmp, self.path)
                self.tmp = None
                return self.path
            except OSError as exc:
                last = exc
                log.debug("writing %s failed: %s", self.path, exc)
        self.discard()
        raise InputError(self.path, f"cannot be written ({last.strerror if last else 'unknown error'})",
                         "space on the output disk (the masks written above are complete)")

    def discard(self) -> None:
        """Remove the reservation (nothing is written)."""
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
            self.tmp = None


def _report_size(n_cases: int, n_entries: int) -> int:
    return 16384 + 1536 * n_cases + 768 * n_entries


def write_report(out_dir: str | Path, results: Sequence[CaseResult], info: dict[str, Any],
                 shard: tuple[int, int] | None = None, *, inputs: Sequence[InputEntry] | None = None,
                 writer: ReportWriter | None = None) -> Path:
    """Write ``OUT/predict_report.json`` (``predict_report.shard-I-of-N.json`` for a shard) atomically.

    Args:
        out_dir: output folder.
        results: from :func:`predict_cases`.
        info: run facts (model folder, folds, options); no patient identifiers.
        shard: the shard, which names the file so that concurrent shards never overwrite each other.
        inputs: every input entry with its status (:func:`account_inputs`).
        writer: a :class:`ReportWriter` made before the run (its reserved space is used).

    Returns:
        The report path.

    Raises:
        InputError: the report cannot be written.
    """
    counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
    cases = []
    for r in results:
        d = asdict(r)
        d.pop("source_files", None)
        cases.append(d)
    data: dict[str, Any] = {"version": 1, **info, "counts": counts, "cases": cases}
    if inputs is not None:
        data["input_counts"] = {s: sum(e.status == s for e in inputs) for s in ("predicted", "skipped", "failed")}
        data["inputs"] = [{k: v for k, v in asdict(e).items() if v is not None} for e in inputs]
    writer = writer or ReportWriter(out_dir, shard, reserve=_report_size(len(results), len(inputs or ())))
    return writer.write(data)
