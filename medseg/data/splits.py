"""Patient-grouped, class-stratified k-fold splits in nnU-Net's ``splits_final.json`` shape.

A split file is a JSON list with one entry per fold: ``{"train": [case ids], "val": [case ids],
"train_patients": [...], "val_patients": [...]}`` (nnU-Net reads the first two keys and ignores the rest).

Folds are built GroupKFold-like: all cases of a patient go to the same fold; patients are stratified by which
foreground classes their cases contain (so that a rare class is spread over the folds), and fold sizes are
balanced by counting cases, not patients. An existing file is reused as it is; asking for a fold it lacks, or a
file that puts one patient in two folds, is an error -- never a silent re-split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np

from medseg.data.manifest import Manifest
from medseg.errors import ConfigError, InputError

__all__ = ["make_splits", "load_or_create_splits", "check_no_leakage", "get_fold", "label_classes", "read_splits"]

log = logging.getLogger(__name__)


def label_classes(manifest: Manifest) -> dict[str, tuple[int, ...]]:
    """The foreground label values each labelled case contains (reads every label map).

    Args:
        manifest: the data set.

    Returns:
        case id -> sorted tuple of non-zero label values (the ignore label is not a class: left out); unlabelled
        cases map to ``()``.

    Raises:
        InputError: a label map cannot be read.
    """
    from medseg.data.dicom_labels import read_label

    out: dict[str, tuple[int, ...]] = {}
    ignore = getattr(manifest, "ignore_label", None)
    for case in manifest.cases:
        if case.label is None:
            out[case.case_id] = ()
            continue
        values = np.unique(read_label(case.label, case.label_names, case.images).array)
        out[case.case_id] = tuple(int(v) for v in values if v != 0 and v != ignore)
    return out


def make_splits(
    manifest: Manifest,
    k: int = 5,
    seed: int = 0,
    *,
    stratify: bool = True,
    strata: Mapping[str, Hashable] | None = None,
) -> list[dict[str, list[str]]]:
    """Split the cases of ``manifest`` into ``k`` folds, never putting one patient in two folds.

    Args:
        manifest: the data set; ``Case.patient_id`` groups cases.
        k: number of folds (>= 2, at most the number of patients).
        seed: the split is a deterministic function of the manifest, ``k`` and ``seed``.
        stratify: stratify patients by the set of foreground classes in their label maps (read from disk when
            ``strata`` is not given).
        strata: case id -> stratum key, instead of reading labels.

    Returns:
        ``k`` dicts with sorted ``train``, ``val``, ``train_patients``, ``val_patients`` lists.

    Raises:
        ConfigError: ``k`` < 2.
        InputError: fewer patients than folds.
    """
    if k < 2:
        raise ConfigError("-k", k, "at least 2 folds")
    groups = manifest.patients()
    if len(groups) < k:
        raise InputError(manifest.root, f"has {len(groups)} patient(s), fewer than the {k} folds asked for",
                         f"at least {k} patients, or a smaller -k")
    if strata is None and stratify:
        strata = label_classes(manifest)
    case_stratum = dict(strata) if strata is not None else {}
    rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
    pids = sorted(groups)
    pids = [pids[i] for i in rng.permutation(len(pids))]

    def group_stratum(pid: str) -> str:
        keys = {case_stratum.get(cid, ()) for cid in groups[pid]}
        if all(isinstance(key, tuple) for key in keys):  # label classes: the union over the patient's cases
            return json.dumps(sorted({v for key in keys for v in key}))
        return json.dumps(sorted(map(str, keys)))

    by_stratum: dict[str, list[str]] = {}
    for pid in pids:
        by_stratum.setdefault(group_stratum(pid), []).append(pid)
    order = sorted(by_stratum, key=lambda s: (-sum(len(groups[p]) for p in by_stratum[s]), s))
    fold_total = np.zeros(k, dtype=np.int64)
    assignment: dict[str, int] = {}
    for stratum in order:
        fold_stratum = np.zeros(k, dtype=np.int64)
        # biggest patients first (stable sort keeps the seeded order among equals)
        for pid in sorted(by_stratum[stratum], key=lambda p: -len(groups[p])):
            tiebreak = rng.random(k)
            fold = min(range(k), key=lambda f: (fold_stratum[f], fold_total[f], tiebreak[f]))
            assignment[pid] = fold
            fold_stratum[fold] += len(groups[pid])
            fold_total[fold] += len(groups[pid])
    splits = []
    for fold in range(k):
        val_p = sorted(p for p, f in assignment.items() if f == fold)
        train_p = sorted(p for p, f in assignment.items() if f != fold)
        splits.append({
            "train": sorted(c for p in train_p for c in groups[p]),
            "val": sorted(c for p in val_p for c in groups[p]),
            "train_patients": train_p,
            "val_patients": val_p,
        })
    check_no_leakage(splits, manifest)
    log.info("made %d patient-grouped folds of %d cases / %d patients (seed %d, %d strata): val sizes %s",
             k, len(manifest.cases), len(groups), seed, len(by_stratum), [len(s["val"]) for s in splits])
    return splits


def check_no_leakage(splits: list[dict], manifest: Manifest, path: str | Path | None = None) -> None:
    """Refuse splits that leak: one patient in two folds, or in train and val of one fold.

    Also refuses splits that do not cover the manifest exactly (a case in no fold or in two, an unknown case).

    Args:
        splits: list of ``{"train": [...], "val": [...]}`` dicts.
        manifest: the data set, whose ``patient_id`` s are the truth.
        path: the split file, for error messages.

    Raises:
        InputError: on the first leak or mismatch found, naming the fold, case and patient.
    """
    where = path if path is not None else "splits"
    patient_of = {c.case_id: c.patient_id for c in manifest.cases}
    val_fold_of_patient: dict[str, int] = {}
    val_fold_of_case: dict[str, int] = {}
    for fold, entry in enumerate(splits):
        for cid in list(entry["train"]) + list(entry["val"]):
            if cid not in patient_of:
                raise InputError(where, f"fold {fold} names case {cid!r}, which is not in the data set",
                                 "a split file made for this data set (delete it to re-split)")
        overlap = set(entry["train"]) & set(entry["val"])
        if overlap:
            raise InputError(where, f"fold {fold} has case {sorted(overlap)[0]!r} in both train and val",
                             "disjoint train and val sets")
        train_patients = {patient_of[c] for c in entry["train"]}
        for cid in entry["val"]:
            pid = patient_of[cid]
            if pid in train_patients:
                raise InputError(where, f"fold {fold} leaks patient {pid!r}: case {cid} is in val while another "
                                 "of the patient's cases is in train", "all cases of a patient on one side")
            if val_fold_of_case.get(cid, fold) != fold:
                raise InputError(where, f"case {cid!r} is in the val set of folds {val_fold_of_case[cid]} and {fold}",
                                 "each case validated in exactly one fold")
            val_fold_of_case[cid] = fold
            first = val_fold_of_patient.setdefault(pid, fold)
            if first != fold:
                raise InputError(where, f"patient {pid!r} is in the val sets of folds {first} and {fold}",
                                 "each patient in exactly one fold (group the split by patient)")
    missing = sorted(set(patient_of) - set(val_fold_of_case))
    if missing:
        raise InputError(where, f"{len(missing)} case(s) of the data set are in no fold's val set, e.g. {missing[0]!r}",
                         "a split file made for this data set (delete it, or give a new -o, to re-split)")


def read_splits(path: str | Path) -> list[dict[str, list[str]]]:
    """Read a ``splits_final.json``-shaped file and check its structure (not its contents).

    Args:
        path: the JSON file.

    Returns:
        The list of fold dicts.

    Raises:
        InputError: unreadable JSON or not a list of ``{"train": [...], "val": [...]}``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot be read as JSON ({exc})", "a splits_final.json-style list of folds") from None
    ok = isinstance(data, list) and data and all(
        isinstance(e, dict) and isinstance(e.get("train"), list) and isinstance(e.get("val"), list)
        and all(isinstance(c, str) for c in e["train"] + e["val"]) for e in data)
    if not ok:
        raise InputError(path, "is not a list of folds", '[{"train": [case ids], "val": [case ids]}, ...]')
    return data


def load_or_create_splits(
    path: str | Path,
    manifest: Manifest,
    k: int | None = 5,
    seed: int = 0,
    *,
    stratify: bool = True,
) -> list[dict[str, list[str]]]:
    """Reuse the split file at ``path`` if it exists (after checking it), else make one and write it.

    Args:
        path: ``splits.json`` location.
        manifest: the data set.
        k: folds wanted; an existing file with another number of folds is an error. None accepts any.
        seed: seed for a new split.
        stratify: see :func:`make_splits`.

    Returns:
        The folds.

    Raises:
        InputError: an existing file is malformed, has another number of folds, or leaks patients.
    """
    path = Path(path)
    if path.exists():
        splits = read_splits(path)
        if k is not None and len(splits) != k:
            raise InputError(path, f"has {len(splits)} folds but {k} were asked for",
                             f"-k {len(splits)} to reuse it, or another output file for a new {k}-fold split")
        check_no_leakage(splits, manifest, path)
        log.info("reusing %s (%d folds)", path, len(splits))
        return splits
    if k is None:
        raise ConfigError("-k", k, "a number of folds when no split file exists yet")
    splits = make_splits(manifest, k, seed, stratify=stratify)
    from medseg.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=1) + "\n")
    log.info("wrote %s", path)
    return splits


def get_fold(splits: list[dict], fold: int, path: str | Path | None = None) -> dict:
    """The entry of fold ``fold``; a fold the splits lack is an error (never a silent re-split).

    Args:
        splits: the folds.
        fold: index, 0-based.
        path: the split file, for the error message.

    Returns:
        ``{"train": [...], "val": [...], ...}``.

    Raises:
        InputError: ``fold`` outside ``0 .. len(splits) - 1``.
    """
    if not 0 <= fold < len(splits):
        raise InputError(path if path is not None else "splits", f"has folds 0..{len(splits) - 1}, fold {fold} asked for",
                         f"a fold between 0 and {len(splits) - 1}, or a new split file with more folds")
    return splits[fold]
