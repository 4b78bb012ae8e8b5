"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Cases are matched by file name without suffix (``case_001.nii.gz`` <-> ``case_001.nii.gz``, or ``.nrrd`` etc.).
Each pair must share its voxel grid (shape and affine); a mismatch is an :class:`~medseg.errors.InputError`
naming both files, never a silent resample.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import TMP_MARKER, atomic_path
from medseg.io.registry import IMAGE_SUFFIXES, split_suffix
from medseg.metrics import DEFAULT_NSD_TOLERANCE_MM, binary_metrics, compute_metrics, compute_region_metrics

__all__ = [
    "Evaluation",
    "case_id_of",
    "list_cases",
    "match_cases",
    "check_same_geometry",
    "read_label_names",
    "evaluate_pair",
    "evaluate_folder",
    "write_evaluation",
]

log = logging.getLogger(__name__)

#: File endings treated as images/label maps: the format table's (:data:`medseg.io.IMAGE_SUFFIXES`), longest first.
SUFFIXES = IMAGE_SUFFIXES


@dataclass
class Evaluation:
    """Result of :func:`evaluate_folder`.

    Attributes:
        per_case: ``{case_id: {label: {metric: value}}}``.
        label_names: ``{label: name}`` of the scored classes.
        summary: :func:`medseg.evaluation.summarize_metrics` output plus the settings used.
        pairs: ``{case_id: (pred_path, ref_path)}``.
        missing: reference cases without a prediction (only when ``allow_missing``).
    """

    per_case: dict[str, dict[int, dict[str, float]]]
    label_names: dict[int, str]
    summary: dict[str, Any]
    pairs: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def case_id_of(path: str | Path) -> str | None:
    """The case id of an image file (its name without a known suffix), or None for other files."""
    name = Path(path).name
    if name.startswith(".") or TMP_MARKER in name:
        return None
    stem, suffix = split_suffix(name)
    return stem if suffix else None


def list_cases(folder: str | Path) -> dict[str, Path]:
    """``{case_id: path}`` of the image files directly inside ``folder``.

    Raises:
        InputError: the folder does not exist, or two files share a case id (``a.nii.gz`` and ``a.nrrd``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder", "a folder of label maps (.nii.gz, .nrrd, .mha, .png, ...)")
    cases: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        cid = case_id_of(p) if p.is_file() else None
        if cid is None:
            continue
        if cid in cases:
            raise InputError(p, f"has the same case id {cid!r} as {cases[cid].name}", "one file per case")
        cases[cid] = p
    return cases


def match_cases(
    pred_dir: str | Path, ref_dir: str | Path, *, allow_missing: bool = False
) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Pair predictions with references by case id.

    Args:
        pred_dir: folder of predictions.
        ref_dir: folder of references.
        allow_missing: evaluate only the predicted cases when some references have no prediction (e.g. one
            cross-validation fold) instead of failing.

    Returns:
        ``({case_id: (pred_path, ref_path)}, [reference case ids without a prediction])``.

    Raises:
        InputError: no predictions, a prediction without a reference, or (unless ``allow_missing``) a reference
            without a prediction.
    """
    preds, refs = list_cases(pred_dir), list_cases(ref_dir)
    if not preds:
        raise InputError(pred_dir, "holds no label maps", "files such as case_001.nii.gz")
    orphans = sorted(set(preds) - set(refs))
    if orphans:
        more = f" and {len(orphans) - 3} more" if len(orphans) > 3 else ""
        raise InputError(preds[orphans[0]], f"has no reference in {ref_dir} (unmatched: "
                         f"{', '.join(orphans[:3])}{more})", "a reference file with the same name for every prediction")
    missing = sorted(set(refs) - set(preds))
    if missing and not allow_missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(pred_dir, f"has no prediction for {len(missing)} reference case(s) "
                         f"({', '.join(missing[:3])}{more})",
                         "a prediction for every reference (or --allow-missing to score only the predicted cases)")
    return {c: (preds[c], refs[c]) for c in sorted(preds)}, missing


def check_same_geometry(pred, ref, pred_path: str | Path, ref_path: str | Path) -> None:
    """Raise a one-line InputError naming both files when two Volumes do not share a voxel grid.

    Args:
        pred: predicted :class:`~medseg.io.Volume`.
        ref: reference :class:`~medseg.io.Volume`.
        pred_path: file ``pred`` came from; ref_path: file ``ref`` came from.

    Raises:
        InputError: shapes, spacings, origins or directions differ (tolerance 1e-4 mm), or a file is not a
            single-channel label map.
    """
    for vol, path in ((pred, pred_path), (ref, ref_path)):
        if vol.channels != 1:
            raise InputError(path, f"has {vol.channels} channels", "a single-channel integer label map")
    if pred.same_geometry(ref):
        return
    diffs = []
    if pred.shape != ref.shape:
        diffs.append(f"shape {pred.shape} vs {ref.shape}")
    if len(pred.spacing) != len(ref.spacing) or not np.allclose(pred.spacing, ref.spacing, atol=1e-4):
        diffs.append("spacing ({}) vs ({})".format(", ".join(f"{s:.4g}" for s in pred.spacing),
                                                   ", ".join(f"{s:.4g}" for s in ref.spacing)))
    if not np.allclose(pred.affine[:3, 3], ref.affine[:3, 3], atol=1e-4):
        diffs.append("origin ({}) vs ({})".format(", ".join(f"{s:.4g}" for s in pred.origin),
                                                  ", ".join(f"{s:.4g}" for s in ref.origin)))
    if not np.allclose(pred.direction, ref.direction, atol=1e-4):
        diffs.append(f"orientation {pred.orientation()} vs {ref.orientation()} (direction cosines differ)")
    raise InputError(pred_path, f"geometry differs from its reference {ref_path}: {'; '.join(diffs)}",
                     "a prediction on the reference's voxel grid (same shape and affine)")


def _dataset_json(ref_dir: str | Path) -> tuple[Path, dict] | None:
    """``(path, content)`` of the ``dataset.json`` in ``ref_dir`` or its parent; None when there is none, or
    (with a warning) when it is not a readable JSON object."""
    for folder in (Path(ref_dir), Path(ref_dir).parent):
        path = folder / "dataset.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict):
            log.warning("%s: not readable JSON; labels will be taken from the reference files", path)
            return None
        return path, data
    return None


def read_label_names(ref_dir: str | Path) -> dict[int, str] | None:
    """Class names from a ``dataset.json`` in ``ref_dir`` or its parent (MSD or nnU-Net v2 layout), else None."""
    found = _dataset_json(ref_dir)
    labels = found[1].get("labels") if found else None
    if not isinstance(labels, Mapping):
        return None
    try:
        if all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: {"0": "background", ...}
            return {int(k): str(v) for k, v in labels.items()}
        return {int(v): str(k) for k, v in labels.items()}  # nnU-Net v2: {"background": 0, ...}
    except (TypeError, ValueError):  # nnU-Net regions ({"name": [1, 2]}): read_dataset_regions
        return None


def read_dataset_regions(ref_dir: str | Path) -> list | None:
    """The regions of a ``dataset.json`` beside the references whose labels are regions
    (:func:`medseg.data.regions.parse_regions`), else None."""
    from medseg.data.regions import parse_regions

    found = _dataset_json(ref_dir)
    return parse_regions(found[1], found[0]) if found else None


def read_ignore_label(ref_dir: str | Path) -> int | None:
    """The ignore label of a ``dataset.json`` beside the references (``"ignore": N`` or a label named
    ``ignore``), else None."""
    found = _dataset_json(ref_dir)
    top = found[1].get("ignore") if found else None
    if isinstance(top, int) and not isinstance(top, bool):
        return int(top)
    named = [v for v, n in (read_label_names(ref_dir) or {}).items() if n.strip().lower() == "ignore"]
    return named[0] if named else None


def evaluate_pair(
    pred_path: str | Path,
    ref_path: str | Path,
    labels: Sequence[int] | None,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    ignore: int | None = None,
    regions: Sequence[Any] | None = None,
) -> tuple[dict[int, dict[str, float]], int]:
    """Read one prediction/reference pair, check its geometry and compute the metrics.

    Args:
        pred_path: prediction file; ref_path: reference file.
        labels: classes to score; None: every nonzero value present in either file.
        nsd_tolerance_mm: NSD tolerance.
        ignore: the reference value of unlabelled voxels, left out of every metric (never a class), or None.
        regions: score these regions (:class:`~medseg.data.regions.Region`; the union of each one's values)
            instead of ``labels``; the keys are then region numbers from 1.

    Returns:
        ``({label: {metric: value}}, spatial_dims)``.

    Raises:
        InputError: unreadable file, geometry mismatch, or a non-integer label map.
    """
    from medseg.io import read_volume

    pred, ref = read_volume(pred_path), read_volume(ref_path)
    check_same_geometry(pred, ref, pred_path, ref_path)
    arrays = []
    for vol, path in ((pred, pred_path), (ref, ref_path)):
        a = np.asarray(vol.array[0])
        if np.issubdtype(a.dtype, np.floating):
            if not np.all(np.isfinite(a)) or not np.array_equal(a, np.rint(a)):
                raise InputError(path, "holds non-integer values", "an integer label map (not probabilities)")
            a = a.astype(np.int64)
        arrays.append(a)
    if regions:
        return compute_region_metrics(arrays[0], arrays[1], ref.spacing, regions, nsd_tolerance_mm=nsd_tolerance_mm,
                                      ignore=ignore), pred.spatial_dims
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(arrays[0]), np.unique(arrays[1]))
                        if v != 0 and v != ignore)
    if not labels:
        return {}, pred.spatial_dims
    return compute_metrics(arrays[0], arrays[1], ref.spacing, list(labels),
                           nsd_tolerance_mm=nsd_tolerance_mm, ignore=ignore), pred.spatial_dims


def _evaluate_job(args: tuple) -> tuple[str, dict[int, dict[str, float]], int]:
    case, pred_path, ref_path, labels, tol, ignore, regions = args
    res, dims = evaluate_pair(pred_path, ref_path, labels, tol, ignore, regions)
    return case, res, dims


def evaluate_folder(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: Sequence[int] | Mapping[int, str] | None = None,
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    allow_missing: bool = False,
    workers: int = 1,
    n_boot: int = 2000,
    seed: int = 0,
    ignore: int | None = None,
    regions: Sequence[Any] | None = None,
) -> Evaluation:
    """Score every prediction in ``pred_dir`` against its reference in ``ref_dir``.

    Args:
        pred_dir: folder of predicted label maps.
        ref_dir: folder of reference label maps with the same file names.
        labels: classes to score (sequence or ``{value: name}``); None: the nonzero classes of a
            ``dataset.json`` beside the references, else every nonzero value found in the files.
        nsd_tolerance_mm: NSD tolerance in mm.
        allow_missing: score only the predicted cases when some references have no prediction.
        workers: parallel processes (1: in this process).
        n_boot: bootstrap resamples for the CIs; seed: their seed.
        ignore: the reference value of unlabelled voxels, left out of every metric; None: the ignore label of a
            ``dataset.json`` beside the references, if it declares one.
        regions: score regions (:class:`~medseg.data.regions.Region`, e.g. from
            :func:`medseg.data.regions.read_regions`): region ``i`` is the union of its label values in both maps,
            reported as class ``i`` (from 1) under its name. None with ``labels`` None: the regions of a
            dataset.json beside the references whose labels are regions, if any.

    Returns:
        An :class:`Evaluation` (nothing is written; see :func:`write_evaluation`).

    Raises:
        InputError: unmatched cases, unreadable files, geometry mismatch.
    """
    from medseg.evaluation.summary import summarize_metrics

    pairs, missing = match_cases(pred_dir, ref_dir, allow_missing=allow_missing)
    if missing:
        log.warning("%d reference case(s) have no prediction and are not scored: %s", len(missing),
                    ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if ignore is None and (ignore := read_ignore_label(ref_dir)) is not None:
        log.info("ignore label %d from dataset.json: reference voxels holding it are not scored", ignore)
    names: dict[int, str] = {}
    if regions is None and labels is None and (regions := read_dataset_regions(ref_dir)):
        log.info("regions from dataset.json: %s", ", ".join(f"{r.name}={list(r.values)}" for r in regions))
    if regions:
        if labels is not None:
            raise InputError(ref_dir, "was given both labels and regions to score", "--labels or --regions")
        names = {i + 1: r.name for i, r in enumerate(regions)}
        label_list: list[int] | None = sorted(names)
    elif isinstance(labels, Mapping):
        names = {int(k): str(v) for k, v in labels.items()}
        label_list = sorted(names)
    elif labels is not None:
        label_list = sorted(int(v) for v in labels)
    else:
        found = read_label_names(ref_dir)
        label_list = sorted(k for k in found if k != 0 and k != ignore) if found else None
        names = found or {}
        if label_list is not None:
            log.info("classes from dataset.json: %s", ", ".join(f"{k}={names[k]}" for k in label_list))
    if label_list is not None and ignore in label_list and not regions:
        raise InputError(ref_dir, f"the ignore label {ignore} is among the classes to score", "classes other than "
                         "the ignore label (it marks unlabelled voxels)")
    jobs = [(c, p, r, label_list, nsd_tolerance_mm, ignore, list(regions or [])) for c, (p, r) in pairs.items()]
    per_case: dict[str, dict[int, dict[str, float]]] = {}
    dims = 3
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_evaluate_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        results = [_evaluate_job(j) for j in jobs]
    for case, res, d in results:
        per_case[case] = res
        dims = d
    if label_list is None:  # classes found per case: a class absent from both files has fixed values
        label_list = sorted({k for res in per_case.values() for k in res})
        absent = binary_metrics(np.zeros((1,) * dims, bool), np.zeros((1,) * dims, bool), (1.0,) * dims,
                                nsd_tolerance_mm=nsd_tolerance_mm)
        for res in per_case.values():
            for k in label_list:
                res.setdefault(k, dict(absent))
        per_case = {c: dict(sorted(r.items())) for c, r in per_case.items()}
    if not label_list:
        raise InputError(ref_dir, "has only background (0) in every reference and prediction",
                         "label maps with at least one foreground class, or --labels")
    label_names = {k: names.get(k, str(k)) for k in label_list}
    summary = summarize_metrics(per_case, label_names=label_names, n_boot=n_boot, seed=seed)
    summary.update(version=1, pred_dir=str(pred_dir), ref_dir=str(ref_dir), nsd_tolerance_mm=nsd_tolerance_mm,
                   missing_predictions=missing, spatial_dims=dims, ignore_label=ignore,
                   **({"regions": [r.to_dict() for r in regions]} if regions else {}),
                   edge_cases="see medseg.metrics: NaN = undefined (left out, n_nan), inf = one mask empty (n_inf)")
    return Evaluation(per_case, label_names, summary, pairs, missing)


def write_evaluation(evaluation: Evaluation, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``per_case.csv`` and ``summary.json`` into ``out_dir`` (atomically).

    Args:
        evaluation: result of :func:`evaluate_folder`.
        out_dir: output folder (created if needed).

    Returns:
        ``(per_case_csv, summary_json)`` paths.
    """
    from medseg.evaluation.summary import json_safe
    from medseg.evaluation.table import write_per_case_csv

    out = Path(out_dir)
    csv_path = write_per_case_csv(evaluation.per_case, out / "per_case.csv", label_names=evaluation.label_names)
    json_path = out / "summary.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(json_safe(evaluation.summary), indent=2, allow_nan=False) + "\n")
    return csv_path, json_path
