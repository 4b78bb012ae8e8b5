"""Batch prediction of many cases: discovery, sharding, resumable atomic outputs and a per-run report.

What ``medseg predict`` runs. Every case is independent: a failure is caught, recorded in one line and the
batch goes on; outputs are written through :func:`medseg.io.atomic_path`, the label map last, so a case whose
mask exists is complete and is skipped by a rerun (unless ``overwrite``). ``shard=(I, N)`` keeps the cases whose
position in the sorted case list is ``I`` modulo ``N``, so N processes share one folder with no coordination.

Inputs (:func:`discover_cases`):

* a NIfTI (or NRRD/MHA) file -> one case named after the file;
* a folder of such files -> one case per file, or nnU-Net channel naming ``CASE_0000.nii.gz``, ``CASE_0001...``
  when every file follows it and each case has exactly the model's channels 0..C-1;
* a folder holding DICOM files directly -> one case (the series), named after the folder;
* a folder of DICOM series folders -> one case per sub-folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, InputError
from medseg.io.atomic import TMP_MARKER, atomic_path

__all__ = ["CaseInput", "CaseResult", "discover_cases", "shard_cases", "parse_shard", "output_paths",
           "predict_cases", "write_report", "REPORT_NAME"]

log = logging.getLogger(__name__)

REPORT_NAME = "predict_report.json"
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class CaseInput:
    """One case to predict.

    Args:
        case_id: output name stem.
        images: one file per channel, or one DICOM series folder.
        kind: ``"file"`` or ``"dicom"``.
    """

    case_id: str
    images: list[Path]
    kind: str = "file"


@dataclass
class CaseResult:
    """What happened to one case: ``status`` is ``"written"``, ``"skipped"`` or ``"failed"``."""

    case_id: str
    status: str
    error: str | None = None
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


def _stem(path: Path) -> str | None:
    name = path.name
    for suf in _IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return None


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _has_dicom(folder: Path, recursive: bool) -> bool:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return any(p.is_file() and not p.name.startswith(".") and _is_dicom_file(p) for p in files)


def discover_cases(path: str | Path, in_channels: int = 1) -> list[CaseInput]:
    """Find the cases under an input path (see the module docstring for the layouts).

    Args:
        path: a file, a folder of files, a DICOM series folder or a folder of DICOM series folders.
        in_channels: the model's input channels (decides whether ``_0000`` names are channels).

    Returns:
        Cases sorted by ``case_id``.

    Raises:
        InputError: the path does not exist, holds no cases, or two cases would share an output name.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(root, "does not exist", "a NIfTI file, a folder of cases or a DICOM series folder")
    if root.is_file():
        stem = _stem(root)
        if stem is None:
            if _is_dicom_file(root):
                raise InputError(root, "is a single DICOM file", "the folder holding its DICOM series")
            raise InputError(root, "has an unknown image type", "a .nii/.nii.gz/.nrrd/.mha file or a folder")
        m = _CHANNEL.match(stem)
        case_id = m.group("case") if m and in_channels == 1 and m.group("ch") == "0000" else stem
        return [CaseInput(case_id, [root])]
    entries = sorted(p for p in root.iterdir() if not p.name.startswith((".", TMP_MARKER)))
    files = [p for p in entries if p.is_file() and _stem(p) is not None]
    if any(p.is_file() and _is_dicom_file(p) for p in entries):
        return [CaseInput(root.name, [root], "dicom")]
    cases = _group_channels(files, in_channels)
    for sub in (p for p in entries if p.is_dir()):
        if _has_dicom(sub, recursive=True):
            cases.append(CaseInput(sub.name, [sub], "dicom"))
    if not cases:
        raise InputError(root, "holds no images", "NIfTI/NRRD/MHA files, CASE_0000.nii.gz channel files or "
                                                  "DICOM series folders")
    seen: dict[str, CaseInput] = {}
    for c in cases:
        if c.case_id in seen:
            raise InputError(root, f"has two inputs for case {c.case_id!r} ({seen[c.case_id].images[0].name}, "
                                   f"{c.images[0].name})", "one input per case name")
        seen[c.case_id] = c
    return sorted(cases, key=lambda c: c.case_id)


def _group_channels(files: list[Path], in_channels: int) -> list[CaseInput]:
    """nnU-Net channel naming when every file has it and every case has exactly channels 0..C-1."""
    groups: dict[str, dict[int, Path]] = {}
    for f in files:
        m = _CHANNEL.match(_stem(f) or "")
        if not m:
            groups = {}
            break
        groups.setdefault(m.group("case"), {})[int(m.group("ch"))] = f
    if groups and all(sorted(g) == list(range(in_channels)) for g in groups.values()):
        return [CaseInput(cid, [g[i] for i in range(in_channels)]) for cid, g in groups.items()]
    return [CaseInput(_stem(f) or f.name, [f]) for f in files]


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
    out = {"mask": out_dir / (f"{case_id}.dcm" if output_format == "dicom-seg" else f"{case_id}.nii.gz")}
    if probabilities:
        out["probabilities"] = out_dir / f"{case_id}_probabilities.nii.gz"
    if uncertainty:
        out["uncertainty"] = out_dir / f"{case_id}_uncertainty.nii.gz"
    return out


def _remove_stale_temporaries(out_dir: Path, paths: dict[str, Path]) -> None:
    """Remove temporaries left by a killed run for this case's outputs (names carry the marker and the stem)."""
    for p in paths.values():
        stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
        suffix = p.name[len(stem):]
        for tmp in out_dir.glob(f"{TMP_MARKER}????????-{stem}{suffix}"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                log.info("removed %s left by an interrupted run", tmp.name)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


def predict_cases(predictor: Any, cases: Sequence[CaseInput], out_dir: str | Path, *,
                  output_format: str = "nifti", probabilities: bool = False, uncertainty: bool = False,
                  overwrite: bool = False, on_case: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Predict every case, writing its outputs atomically; never raises for a single case's failure.

    Args:
        predictor: a :class:`medseg.inference.Predictor` (anything with ``predict_full``).
        cases: from :func:`discover_cases` / :func:`shard_cases`.
        out_dir: output folder (created).
        output_format: ``"nifti"`` or ``"dicom-seg"`` (DICOM inputs only).
        probabilities: also write ``CASE_probabilities.nii.gz`` (K channels, float32).
        uncertainty: also write ``CASE_uncertainty.nii.gz`` (predictive entropy, nats).
        overwrite: predict cases whose outputs already exist (default: skip them).
        on_case: called with each :class:`CaseResult` as soon as it is known (progress, printing).

    Returns:
        One result per case, in order.

    Raises:
        ConfigError: an unknown output format.
    """
    from medseg.io.nifti import write_nifti
    from medseg.transforms.case import load_case

    if output_format not in ("nifti", "dicom-seg"):
        raise ConfigError("--output-format", output_format, "'nifti' or 'dicom-seg'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for case in cases:
        t0 = time.perf_counter()
        paths = output_paths(out_dir, case.case_id, output_format=output_format, probabilities=probabilities,
                             uncertainty=uncertainty)
        if not overwrite and all(p.exists() for p in paths.values()):
            res = CaseResult(case.case_id, "skipped", outputs=[p.name for p in paths.values()])
        else:
            _remove_stale_temporaries(out_dir, paths)
            try:
                if output_format == "dicom-seg" and case.kind != "dicom":
                    raise InputError(case.images[0], "is not a DICOM series", "DICOM input for --output-format "
                                                                              "dicom-seg (or use nifti)")
                image, _ = load_case(case.images)
                pred = predictor.predict_full(image, probabilities=probabilities, uncertainty=uncertainty)
                if probabilities:
                    write_nifti(pred.probabilities, paths["probabilities"], dtype="float32")
                if uncertainty:
                    write_nifti(pred.uncertainty, paths["uncertainty"], dtype="float32")
                if output_format == "dicom-seg":
                    from medseg.io.dicom_seg import write_dicom_seg

                    labels = {v: n for v, n in predictor.output_labels.items() if v != predictor.label_values[0]}
                    write_dicom_seg(pred.label, case.images[0], paths["mask"], labels,
                                    series_uid=image.meta.get("series_uid"))
                else:
                    write_nifti(pred.label, paths["mask"], dtype=pred.label.array.dtype)
                res = CaseResult(case.case_id, "written", outputs=[p.name for p in paths.values()])
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # one case's failure must not stop the batch; reported, not hidden
                log.debug("case %s failed", case.case_id, exc_info=True)
                res = CaseResult(case.case_id, "failed", error=_one_line(exc))
        res.seconds = round(time.perf_counter() - t0, 3)
        results.append(res)
        if on_case is not None:
            on_case(res)
    return results


def write_report(out_dir: str | Path, results: Sequence[CaseResult], info: dict[str, Any],
                 shard: tuple[int, int] | None = None) -> Path:
    """Write ``OUT/predict_report.json`` (``predict_report.shard-I-of-N.json`` for a shard) atomically.

    Args:
        out_dir: output folder.
        results: from :func:`predict_cases`.
        info: run facts (model folder, folds, options); no patient identifiers.
        shard: the shard, which names the file so that concurrent shards never overwrite each other.

    Returns:
        The report path.
    """
    name = REPORT_NAME if shard is None else f"predict_report.shard-{shard[0]}-of-{shard[1]}.json"
    path = Path(out_dir) / name
    counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
    data = {"version": 1, **info, "counts": counts, "cases": [asdict(r) for r in results]}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path
