"""Dataset integrity checks behind ``medseg check-dataset``.

Every case is read; a case that fails to read is reported and checking goes on. Each problem is one line:
the file, what is wrong, what would be right. Errors make a data set unusable for training (unreadable or
unpaired files, channels or label off the image grid, undeclared label values, NaN/Inf); warnings are worth a
look but legitimate (a label with no foreground).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.manifest import Case, Manifest
from medseg.errors import InputError

__all__ = ["Problem", "CaseSummary", "CheckReport", "check_case", "check_dataset", "declaration_problems"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One problem with one file.

    Args:
        path: the file (or folder) at fault.
        problem: what is wrong.
        expected: what would be right ("" when nothing useful can be said).
        severity: ``"error"`` or ``"warning"``.
    """

    path: str
    problem: str
    expected: str = ""
    severity: str = "error"

    def __str__(self) -> str:
        text = f"{self.path}: {self.problem}"
        return f"{text}; expected {self.expected}" if self.expected else text

    @classmethod
    def from_line(cls, line: str, severity: str = "error") -> Problem:
        """Parse a ``"path: problem; expected ..."`` line (the form of :attr:`Manifest.problems`)."""
        path, _, rest = line.partition(": ")
        problem, _, expected = rest.partition("; expected ")
        return cls(path, problem or line, expected, severity)


@dataclass
class CaseSummary:
    """What was learnt about one readable case (for the summary table)."""

    case_id: str
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    channels: int = 0
    label_values: tuple[int, ...] = ()


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`."""

    manifest: Manifest
    problems: list[Problem] = field(default_factory=list)
    cases: list[CaseSummary] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        """Problems of severity ``"error"``."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """Problems of severity ``"warning"``."""
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors

    def label_presence(self) -> dict[int, int]:
        """Label value -> number of read cases whose label map contains it."""
        out: dict[int, int] = {}
        for c in self.cases:
            for v in c.label_values:
                out[v] = out.get(v, 0) + 1
        return dict(sorted(out.items()))

    def summary_lines(self) -> list[str]:
        """A short human-readable summary (counts, shapes, spacings, label presence)."""
        m = self.manifest
        read = [c for c in self.cases if c.shape is not None]
        lines = [f"data set {m.name!r}: {len(m.cases)} cases of {len(m.patients())} patients, "
                 f"{len(read)} read, channels {m.channel_names or '?'}, labels {m.labels or 'undeclared'}"]
        if read:
            shapes = np.array([c.shape for c in read])
            spacings = np.array([c.spacing for c in read])
            lines.append("shape   min " + "x".join(map(str, shapes.min(0))) + "  max " + "x".join(map(str, shapes.max(0))))
            lines.append("spacing min " + " x ".join(f"{v:.3g}" for v in spacings.min(0))
                         + "  max " + " x ".join(f"{v:.3g}" for v in spacings.max(0)) + " mm")
            presence = self.label_presence()
            if presence:
                names = m.labels
                lines.append("label present in: " + ", ".join(
                    f"{v} {names.get(v, '?')} {n}/{sum(1 for c in read if c.label_values)}" for v, n in presence.items()))
        lines.append(f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return lines


def check_dataset(
    manifest: Manifest,
    *,
    atol: float = 1e-3,
    workers: int = 1,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> CheckReport:
    """Check every case of ``manifest``.

    Args:
        manifest: the data set (its discovery problems, e.g. unpaired files, are included in the report).
        atol: tolerance in mm for comparing affines (origin, direction times spacing) and spacings.
        workers: threads reading cases in parallel.
        progress: optional wrapper around the iterator of results (e.g. ``tqdm``).

    Returns:
        The report: one :class:`Problem` per problem found, and per-case summaries.
    """
    report = CheckReport(manifest, [Problem.from_line(line) for line in manifest.problems])
    report.problems.extend(declaration_problems(manifest))
    ids = [c.case_id for c in manifest.cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        report.problems.append(Problem(str(manifest.root), f"case ids {dup[:5]} occur more than once", "unique case ids"))

    def one(case: Case) -> tuple[list[Problem], CaseSummary]:
        return check_case(case, manifest, atol=atol)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results: Iterable = pool.map(one, manifest.cases)
            results = list(progress(results) if progress else results)
    else:
        results = (one(c) for c in manifest.cases)
        results = list(progress(results) if progress else results)
    for problems, summary in results:
        report.problems.extend(problems)
        report.cases.append(summary)
    log.info("checked %d cases: %d errors, %d warnings", len(manifest.cases), len(report.errors), len(report.warnings))
    return report


def declaration_problems(manifest: Manifest) -> list[Problem]:
    """What the data set declares against what it holds: labels declared at all, ``numTraining`` equal to the cases
    found.

    A dataset.json without ``labels`` is an error (training would have to guess the classes from the label maps);
    a layout with no dataset.json at all gets a warning for the same reason.
    """
    out: list[Problem] = []
    where = str(manifest.dataset_json or manifest.root)
    declared = manifest.declared or {}
    if not manifest.labels:
        if manifest.dataset_json is not None:
            out.append(Problem(where, "declares no 'labels'",
                               '"labels" naming every label value, e.g. {"0": "background", "1": "tumour"} (MSD) or '
                               '{"background": 0, "tumour": 1} (nnU-Net v2)'))
        elif manifest.layout:
            out.append(Problem(where, "declares no labels (no dataset.json beside the data)",
                               "a dataset.json with \"labels\" so that the classes are named, not guessed",
                               severity="warning"))
    n_declared = declared.get("numTraining")
    if isinstance(n_declared, int) and not isinstance(n_declared, bool) and n_declared != len(manifest.cases):
        n_labelled = sum(c.label is not None for c in manifest.cases)
        out.append(Problem(where, f"numTraining is {n_declared} but {len(manifest.cases)} case(s) were found "
                           f"({n_labelled} with a label)", "numTraining equal to the number of training cases"))
    return out


def check_case(case: Case, manifest: Manifest, *, atol: float = 1e-3) -> tuple[list[Problem], CaseSummary]:
    """Check one case: readable files, one grid for channels and label, finite values, declared labels.

    Args:
        case: the case.
        manifest: its data set (declared labels, channel names, spatial dims).
        atol: tolerance in mm for affines and spacings.

    Returns:
        ``(problems, summary)``.
    """
    from medseg.io import read_volume

    problems: list[Problem] = []
    summary = CaseSummary(case.case_id)
    volumes = []
    for path in case.images:
        try:
            volumes.append((path, read_volume(path)))
        except InputError as exc:
            problems.append(_from_error(path, exc))
        except Exception as exc:  # a reader bug must not stop the check of the other cases
            problems.append(Problem(str(path), f"cannot be read ({type(exc).__name__}: {exc})", "a readable image"))
    if len(volumes) != len(case.images):
        volumes = []
    ref_path, ref = volumes[0] if volumes else (None, None)
    if ref is not None:
        summary.shape, summary.spacing = ref.shape, tuple(round(s, 4) for s in ref.spacing)
        summary.channels = sum(v.channels for _, v in volumes)
        if manifest.spatial_dims and ref.spatial_dims != manifest.spatial_dims:
            problems.append(Problem(str(ref_path), f"is {ref.spatial_dims}D",
                                    f"{manifest.spatial_dims}D images like the rest of the data set"))
        n_declared = len(manifest.channel_names)
        if n_declared and summary.channels != n_declared:
            problems.append(Problem(str(ref_path), f"case {case.case_id} has {summary.channels} channel(s) "
                                    f"(image shape {_fmt_shape(ref.array.shape)})",
                                    f"{n_declared} channel(s) as declared ({manifest.channel_names})"))
        for path, vol in volumes:
            if path is not ref_path:
                problems.extend(_grid_problems(path, vol, ref_path, ref, "channel", atol))
            problems.extend(_finite_problems(path, vol.array))
    if case.label is None:
        return problems, summary
    from medseg.data.dicom_labels import name_problems, read_label

    try:
        problems.extend(Problem(*p) for p in name_problems(case))
        lab = read_label(case.label, case.label_names, case.images)
    except InputError as exc:
        problems.append(_from_error(case.label, exc))
        return problems, summary
    except Exception as exc:  # see above
        problems.append(Problem(str(case.label), f"cannot be read ({type(exc).__name__}: {exc})", "a readable label map"))
        return problems, summary
    if lab.channels != 1:
        problems.append(Problem(str(case.label), f"label has {lab.channels} channels (shape {_fmt_shape(lab.array.shape)})",
                                "a single-channel label map"))
        return problems, summary
    if ref is not None:
        problems.extend(_grid_problems(case.label, lab, ref_path, ref, "label", atol))
    problems.extend(_finite_problems(case.label, lab.array))
    values = np.unique(lab.array[np.isfinite(lab.array)]) if lab.array.dtype.kind == "f" else np.unique(lab.array)
    non_int = values[values != np.round(values)] if values.dtype.kind == "f" else values[:0]
    if non_int.size:
        problems.append(Problem(str(case.label), f"label holds non-integer values {_fmt_values(non_int)}",
                                "integer label values"))
        return problems, summary
    ints = tuple(int(v) for v in values)
    summary.label_values = ints
    if manifest.labels:
        undeclared = [v for v in ints if v not in manifest.labels and v != getattr(manifest, "ignore_label", None)]
        if undeclared:
            problems.append(Problem(str(case.label), f"label values {_fmt_values(undeclared)} are not declared labels",
                                    f"values in {sorted(manifest.labels)} ({_fmt_names(manifest.labels)})"))
    if not [v for v in ints if v != 0]:
        problems.append(Problem(str(case.label), "label is empty (background only)",
                                "at least one foreground voxel, unless the case truly has none", severity="warning"))
    return problems, summary


# ------------------------------------------------------------------------------------------------- helpers
def _grid_problems(path: Path, vol, ref_path: Path, ref, what: str, atol: float) -> list[Problem]:
    if vol.shape != ref.shape:
        return [Problem(str(path), f"{what} shape {_fmt_shape(vol.shape)} differs from image {ref_path.name} "
                        f"{_fmt_shape(ref.shape)}", f"the {what} on the image's voxel grid")]
    sp, rsp = np.array(vol.spacing), np.array(ref.spacing)
    if not np.allclose(sp, rsp, atol=atol, rtol=0):
        return [Problem(str(path), f"{what} spacing {_fmt_floats(sp)} mm differs from image {ref_path.name} "
                        f"{_fmt_floats(rsp)} mm", f"the image's spacing (within {atol} mm)")]
    diff = np.abs(vol.affine - ref.affine)
    if not np.allclose(vol.affine, ref.affine, atol=atol, rtol=0):
        origin = float(np.max(diff[:3, 3]))
        direction = float(np.max(diff[:3, :3]))
        return [Problem(str(path), f"{what} affine differs from image {ref_path.name} (origin by up to {origin:.4g} mm, "
                        f"direction/spacing columns by up to {direction:.4g} mm)",
                        f"the image's affine (within {atol} mm)")]
    return []


def _finite_problems(path: Path, array: np.ndarray) -> list[Problem]:
    if array.dtype.kind not in "fc":
        return []
    n_nan = int(np.isnan(array).sum())
    n_inf = int(np.isinf(array).sum())
    if not (n_nan or n_inf):
        return []
    parts = [f"{n} {what} voxel(s)" for n, what in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
    return [Problem(str(path), "has " + " and ".join(parts) + f" of {array.size}", "finite values only")]


def _from_error(path: Path, exc: InputError) -> Problem:
    problem = exc.problem if exc.path is not None else str(exc)
    return Problem(str(exc.path or path), problem, exc.expected or "a readable image")


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _fmt_floats(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _fmt_values(values, limit: int = 8) -> str:
    vals = [int(v) if float(v).is_integer() else float(v) for v in list(values)[:limit]]
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return str(vals) + more


def _fmt_names(labels: dict[int, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in labels.items())
