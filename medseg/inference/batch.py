"""Batch prediction of many cases: discovery, sharding, resumable atomic outputs and a per-run report.

What ``medseg predict`` runs. Every case is independent: a failure is caught, recorded in one line and the
batch goes on; outputs are written through :func:`medseg.io.atomic_path`, the label map last, so a case whose
mask exists is complete and is skipped by a rerun (unless ``overwrite``). ``shard=(I, N)`` keeps the cases whose
position in the sorted case list is ``I`` modulo ``N``, so N processes share one folder with no coordination.

Inputs: :mod:`medseg.inference.discovery` (re-exported here) classifies every entry of a possibly mixed folder.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError, InputError, MedsegError
from medseg.inference.dicom_output import DICOM_FORMATS, mask_file_name, write_dicom_mask
from medseg.inference.discovery import (
    CaseInput,
    Discovery,
    InputEntry,
    _rel,
    _walk_files,
    discover_cases,
    discover_inputs,
    parse_shard,
    shard_cases,
)
from medseg.io.atomic import remove_stale_temporaries, temporary_name

__all__ = ["CaseInput", "CaseResult", "InputEntry", "Discovery", "discover_inputs", "discover_cases", "shard_cases",
           "parse_shard", "output_paths", "prepare_output", "predict_cases", "account_inputs", "ReportWriter",
           "write_report", "describe_exception", "REPORT_NAME"]

log = logging.getLogger(__name__)

REPORT_NAME = "predict_report.json"


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


@dataclass
class _Job:
    """One case on its way through the stages of :func:`predict_cases` (the pipeline's unit of work)."""

    case: CaseInput
    paths: dict[str, Path]
    result: CaseResult | None = None
    warnings: list[str] = field(default_factory=list)
    image: Any = None  # the input Volume
    prepared: Any = None  # Predictor.prepare's PreparedCase
    prob: Any = None  # the network's probabilities in plan space
    prediction: Any = None  # a predictor without prepare/finish: predict_full's Prediction
    seconds: float = 0.0  # time spent in the stages (the case's own work, whatever ran beside it)


class _CaseStages:
    """The three stages of one case: read (load, checks, preprocessing), infer (the network), write (restore,
    post-process, atomic writes). A failure at any stage becomes the case's ``failed`` result; later stages pass
    it through."""

    def __init__(self, predictor: Any, out_dir: Path, *, output_format: str, probabilities: bool,
                 uncertainty: bool, overwrite: bool, strict_geometry: bool):
        self.predictor = predictor
        self.out_dir = out_dir
        self.output_format = output_format
        self.probabilities = probabilities
        self.uncertainty = uncertainty
        self.overwrite = overwrite
        self.strict_geometry = strict_geometry
        self.staged = callable(getattr(predictor, "prepare", None)) and callable(getattr(predictor, "finish", None))

    def _fail(self, job: _Job, exc: Exception) -> None:
        log.debug("case %s failed", job.case.case_id, exc_info=True)
        job.result = CaseResult(job.case.case_id, "failed", error=describe_exception(exc), warnings=job.warnings)
        job.image = job.prepared = job.prob = job.prediction = None

    def read(self, case: CaseInput) -> _Job:
        t0 = time.perf_counter()
        paths = output_paths(self.out_dir, case.case_id, output_format=self.output_format,
                             probabilities=self.probabilities, uncertainty=self.uncertainty)
        job = _Job(case, paths)
        if not self.overwrite and all(p.is_file() for p in paths.values()):
            job.result = CaseResult(case.case_id, "skipped", outputs=[p.name for p in paths.values()])
            return job
        try:
            if self.output_format in DICOM_FORMATS and case.kind != "dicom":
                raise InputError(case.images[0], "is not a DICOM series", f"DICOM input for --output-format "
                                                                          f"{self.output_format} (or use nifti)")
            image = _load_image(case, strict_geometry=self.strict_geometry)
            where = image.meta.get("source") or case.images[0]
            job.warnings = list(image.meta.get("warnings") or []) + check_image_values(image, where)
            for w in job.warnings:
                log.warning("%s: warning: %s", case.case_id, w)
            _check_plan_size(self.predictor, image, where)
            job.image = image
            if self.staged:
                job.prepared = self.predictor.prepare(image)
        except Exception as exc:  # one case's failure must not stop the batch; reported, not hidden
            self._fail(job, exc)
        job.seconds += time.perf_counter() - t0
        return job

    def infer(self, job: _Job) -> _Job:
        if job.result is not None:
            return job
        t0 = time.perf_counter()
        try:
            if self.staged:
                job.prob = self.predictor.predict_array(job.prepared.image)
            else:
                job.prediction = self.predictor.predict_full(job.image, probabilities=self.probabilities,
                                                             uncertainty=self.uncertainty)
        except Exception as exc:
            self._fail(job, exc)
        job.seconds += time.perf_counter() - t0
        return job

    def write(self, job: _Job) -> CaseResult:
        from medseg.inference.regions import MULTILABEL_FORMAT, multilabel_volume
        from medseg.io.nifti import write_nifti

        t0 = time.perf_counter()
        if job.result is None:
            paths, image = job.paths, job.image
            try:
                pred = job.prediction
                if pred is None:
                    pred = self.predictor.finish(job.prepared, job.prob, probabilities=self.probabilities,
                                                 uncertainty=self.uncertainty)
                job.prepared = job.prob = None
                if self.probabilities:
                    write_nifti(pred.probabilities, paths["probabilities"], dtype="float32")
                if self.uncertainty:
                    write_nifti(pred.uncertainty, paths["uncertainty"], dtype="float32")
                if self.output_format in DICOM_FORMATS:
                    write_dicom_mask(self.output_format, pred.label, job.case.images[0], paths["mask"],
                                     self.predictor, series_uid=image.meta.get("series_uid"))
                elif self.output_format == MULTILABEL_FORMAT:
                    regions = getattr(getattr(self.predictor, "record", None), "regions", ())
                    write_nifti(multilabel_volume(pred.label, regions, self.predictor.label_values), paths["mask"],
                                dtype="uint8")
                else:
                    write_nifti(pred.label, paths["mask"], dtype=pred.label.array.dtype)
                job.result = CaseResult(job.case.case_id, "written", outputs=[p.name for p in paths.values()],
                                        warnings=job.warnings, source_files=image.meta.get("source_files"))
            except Exception as exc:
                self._fail(job, exc)
        res = job.result
        job.image = job.prepared = job.prob = job.prediction = None
        res.seconds = round(job.seconds + time.perf_counter() - t0, 3)
        return res


def predict_cases(predictor: Any, cases: Sequence[CaseInput], out_dir: str | Path, *,
                  output_format: str = "nifti", probabilities: bool = False, uncertainty: bool = False,
                  overwrite: bool = False, on_case: Callable[[CaseResult], None] | None = None,
                  strict_geometry: bool = False, workers: int = 1) -> list[CaseResult]:
    """Predict every case, writing its outputs atomically; never raises for a single case's failure.

    Each image is checked before it is predicted: values (:func:`check_image_values`) and its grid at the plan's
    spacing against the voxel limit. Temporaries that a killed run left for any of these cases' outputs are removed
    first, whether or not the case is predicted again.

    With ``workers`` > 1 the cases go through a pipeline (:func:`medseg.inference.pipeline.run_pipeline`): reader
    threads load, check and preprocess the next cases and writer threads restore and write the previous ones while
    the network works on the current case on the calling thread. The masks are those of ``workers=1`` (the same
    code runs in each stage), results keep the order of ``cases``, and a few cases at most are held in memory.

    Args:
        predictor: a :class:`medseg.inference.Predictor` (anything with ``predict_full``; ``prepare``,
            ``predict_array`` and ``finish`` when present split the work into the pipeline's stages).
        cases: from :func:`discover_inputs` / :func:`shard_cases`.
        out_dir: output folder (created).
        output_format: ``"nifti"``, ``"nifti-multilabel"`` (4D, one channel per region or foreground class:
            :func:`medseg.inference.regions.multilabel_volume`), ``"dicom-seg"`` or ``"rtstruct"`` (the last two
            for DICOM inputs only).
        probabilities: also write ``CASE_probabilities.nii.gz`` (K channels, float32).
        uncertainty: also write ``CASE_uncertainty.nii.gz`` (predictive entropy, nats).
        overwrite: predict cases whose outputs already exist (default: skip them).
        on_case: called with each :class:`CaseResult`, in order, as soon as it is known (progress, printing).
        strict_geometry: fail tilted or unevenly spaced DICOM series instead of resampling them.
        workers: 1: one case after the other; N > 1: N helper threads around the network
            (:func:`medseg.inference.pipeline.split_workers`).

    Returns:
        One result per case, in order.

    Raises:
        ConfigError: an unknown output format, ``workers`` < 1.
        InputError: ``out_dir`` is an existing file or cannot be created.
    """
    from medseg.inference.pipeline import run_pipeline
    from medseg.inference.regions import MULTILABEL_FORMAT

    if output_format not in ("nifti", MULTILABEL_FORMAT) and output_format not in DICOM_FORMATS:
        raise ConfigError("--output-format", output_format, "'nifti', 'nifti-multilabel', 'dicom-seg' or 'rtstruct'")
    if workers < 1:
        raise ConfigError("--workers", workers, "1 (one case after the other) or more (pipelined)")
    out_dir = prepare_output(out_dir)
    remove_stale_temporaries(out_dir, _owned_names(cases))
    stages = _CaseStages(predictor, out_dir, output_format=output_format, probabilities=probabilities,
                         uncertainty=uncertainty, overwrite=overwrite, strict_geometry=strict_geometry)
    return run_pipeline(cases, stages.read, stages.infer, stages.write, workers=workers, on_done=on_case)


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
