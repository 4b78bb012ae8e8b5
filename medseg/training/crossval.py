"""k-fold cross-validation: train the folds, predict each fold's validation cases (out-of-fold, OOF), score them,
summarise, choose post-processing from the OOF predictions, and leave a model folder for ``medseg predict``.

Run folder after :func:`run_crossval` (see docs/architecture.md):
``model.json`` (all folds = an ensemble), ``crossval_summary.json`` (mean, sd, bootstrap 95% CI per class),
``postprocessing.json``, ``per_case.csv`` (all OOF cases), and per fold ``fold_K/validation/<case>.nii.gz`` and
``fold_K/per_case.csv``. Folds already trained (their ``checkpoint_latest.pt`` says finished) are not retrained, so
folds can be trained by separate ``medseg train --fold K`` processes and collected here.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError
from medseg.io.atomic import atomic_path
from medseg.training.config import PipelineConfig
from medseg.training.fold import (
    RunData,
    fold_is_finished,
    prepare_run,
    train_fold,
    update_model_record,
)
from medseg.training.record import write_json

__all__ = ["run_crossval", "predict_out_of_fold", "summarize_crossval", "select_postprocessing",
           "load_oof_probabilities"]

logger = logging.getLogger(__name__)


def _pred_path(fold_dir: Path, case_id: str) -> Path:
    return fold_dir / "validation" / f"{case_id}.nii.gz"


def _prob_path(fold_dir: Path, case_id: str) -> Path:
    return fold_dir / "validation" / f"{case_id}_probabilities.npz"


def load_oof_probabilities(fold_dir: Path, case_id: str) -> np.ndarray:
    """The ``(K, *spatial)`` out-of-fold class probabilities of a case on its own grid (float32), as
    :func:`predict_out_of_fold` ``(probabilities=True)`` stored them (float16)."""
    with np.load(_prob_path(fold_dir, case_id)) as z:
        return z["probabilities"].astype(np.float32)


def predict_out_of_fold(run: RunData, fold: int, *, device: str | None = None, tta: bool = True,
                        probabilities: bool = False,
                        ) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Predict fold ``fold``'s validation cases with that fold's network, on each case's original grid.

    Predictions are written to ``fold_K/validation/<case>.nii.gz`` (the case's geometry, without
    post-processing); a prediction already there is reused (an interrupted crossval resumes).

    Args:
        run: the prepared run.
        fold: the fold.
        device: inference device (default: CUDA when available).
        tta: test-time mirroring.
        probabilities: also keep the class probabilities on the case's grid in
            ``fold_K/validation/<case>_probabilities.npz`` (float16, what choosing between configurations and
            ensembles needs; :func:`load_oof_probabilities`).

    Returns:
        ``(case_id, prediction, reference, spacing)`` per validation case, arrays without the channel axis, both
        in the data's label values (the plan's ``label_values``).
    """
    from medseg.inference import Predictor
    from medseg.io import read_volume, write_volume
    from medseg.runtime import resolve_device
    from medseg.transforms.case import load_case

    fold_dir = run.run_dir / f"fold_{fold}"
    val_ids = [c for c in run.splits[fold]["val"]]
    dev = resolve_device(device or run.pipeline.train.device)
    predictor = None
    out = []
    for cid in val_ids:
        case = run.manifest.case(cid)
        if case.label is None:
            continue
        image, ref = load_case(case.images, case.label, case.label_names)
        path = _pred_path(fold_dir, cid)
        if path.is_file() and (not probabilities or _prob_path(fold_dir, cid).is_file()):
            pred = read_volume(path)
        else:
            if predictor is None:
                predictor = Predictor.from_run(run.run_dir, folds=[fold], device=dev, tta=tta,
                                               amp=run.pipeline.train.amp, postprocess=False)
            full = predictor.predict_full(image, probabilities=probabilities)
            pred = full.label
            if full.probabilities is not None:
                with atomic_path(_prob_path(fold_dir, cid)) as tmp, tmp.open("wb") as f:
                    np.savez_compressed(f, probabilities=full.probabilities.array.astype(np.float16))
            write_volume(pred, path)
        assert ref is not None
        out.append((cid, np.asarray(pred.array[0]), np.asarray(ref.array[0]), tuple(ref.spacing)))
    logger.info("fold %d: %d out-of-fold predictions in %s", fold, len(out), fold_dir / "validation")
    return out


def _write_per_case(path: Path, per_case: dict[str, dict[int, dict[str, float]]], fold_of: dict[str, int],
                    labels: dict[int, str]) -> None:
    rows = []
    for cid, res in per_case.items():
        for lab, metrics in res.items():
            rows.append({"case": cid, "fold": fold_of[cid], "label": lab, "name": labels.get(lab, str(lab)),
                         **{k: ("" if v is None else v) for k, v in metrics.items()}})
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or ["case"])
        w.writeheader()
        w.writerows(rows)


def summarize_crossval(per_case: dict[str, dict[int, dict[str, float]]], labels: dict[int, str], *,
                       seed: int = 0) -> dict[str, Any]:
    """Mean, sd and bootstrap 95% CI per class and metric over the OOF cases (medseg.evaluation's summary).

    Args:
        per_case: ``{case_id: {label: {metric: value}}}``.
        labels: ``{label: name}`` of the foreground classes.
        seed: bootstrap seed.

    Returns:
        The summary dict (JSON-safe).
    """
    from medseg.evaluation.summary import json_safe, summarize_metrics

    return json_safe(summarize_metrics(per_case, label_names=labels, seed=seed))


def select_postprocessing(cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]],
                          classes: Sequence[int], ignore: int | None = None,
                          regions: Sequence[Any] = ()) -> tuple[Any, dict[str, Any]]:
    """Choose connected-component post-processing on OOF predictions; keep it only if the mean Dice improves
    and no class gets worse (else the identity).

    Args:
        cases: ``(prediction, reference, spacing)`` per OOF case.
        classes: foreground classes.
        ignore: the reference value of unlabelled voxels (left out of the Dice), or None.
        regions: the plan's regions (``classes`` are then region numbers from 1), or empty.

    Returns:
        ``(setting, report)`` for ``postprocessing.json``.
    """
    from medseg.inference.postprocess import PostprocessSetting, choose_postprocessing

    setting, report = choose_postprocessing(list(cases), classes, ignore=ignore, regions=regions)
    before = {int(k): float(v) for k, v in report["dice_before"].items()}
    after = {int(k): float(v) for k, v in report["dice_after"].items()}
    mean_before = float(np.mean(list(before.values()))) if before else 0.0
    mean_after = float(np.mean(list(after.values()))) if after else 0.0
    worse = [c for c in before if after[c] < before[c] - 1e-12]
    if not setting.is_identity and (mean_after <= mean_before or worse):
        logger.info("post-processing rejected: mean Dice %.4f -> %.4f, classes worse: %s",
                    mean_before, mean_after, worse)
        report["rejected"] = {"setting": setting.to_dict(), "classes_worse": worse}
        setting = PostprocessSetting()
        report["dice_after"] = report["dice_before"]
    report["mean_dice_before"] = mean_before
    report["mean_dice_after"] = mean_after if not report.get("rejected") else mean_before
    return setting, report


def run_crossval(
    pipeline: PipelineConfig,
    folds: Sequence[int] | None = None,
    *,
    resume: bool = False,
    retrain: bool = False,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    device: str | None = None,
    ddp: bool = False,
    oof_probabilities: bool = False,
) -> dict[str, Any]:
    """Train (or collect) the folds, predict out of fold, summarise and choose post-processing.

    With ``configuration: auto`` and a plan of several configurations, every configuration is cross-validated
    into ``RUN/<configuration>/`` and the best one or pair is chosen (:mod:`medseg.training.multiconfig`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks share the work (:mod:`medseg.training.distributed`): each
    preprocesses its share of the cases, trains the folds ``folds[rank::world]`` alone (or, with ``ddp``, every
    fold together with the others, data-parallel) and predicts its folds' validation cases; rank 0 then scores the
    out-of-fold predictions, summarises, chooses the post-processing and writes the model record. A rank that fails
    stops the others with its message.

    Args:
        pipeline: the pipeline configuration.
        folds: folds to train and evaluate (default all ``pipeline.folds``).
        resume: continue interrupted folds from their latest checkpoint.
        retrain: train even folds that already finished.
        progress: ``(fold, epoch_info)`` callback.
        device: device for the OOF predictions (default the training device).
        ddp: under torchrun, train each fold with all ranks (data-parallel) instead of one fold per rank.
        oof_probabilities: keep the out-of-fold class probabilities (:func:`predict_out_of_fold`).

    Returns:
        The crossval summary (also written to ``crossval_summary.json``), on every rank.

    Raises:
        ConfigError: a fold outside ``0 .. folds-1``; ``configuration: auto`` under torchrun.
        PeerFailure: under torchrun, another rank failed.
    """
    from medseg.training.distributed import coordinator
    from medseg.training.multiconfig import crossval_configurations, is_multi_configuration

    folds = list(range(pipeline.folds)) if folds is None else [int(f) for f in folds]
    bad = [f for f in folds if not 0 <= f < pipeline.folds]
    if bad or not folds:
        raise ConfigError("--folds", folds, f"fold numbers between 0 and {pipeline.folds - 1}")
    if is_multi_configuration(pipeline, device):
        return crossval_configurations(pipeline, folds, resume=resume, retrain=retrain, progress=progress,
                                       device=device)
    coord = coordinator()
    if coord is None:
        return _crossval(pipeline, folds, _OneProcess(), resume=resume, retrain=retrain, progress=progress,
                         device=device, ddp=False, probs=oof_probabilities)
    from medseg.training.distributed import RunRanks

    with coord.guard():
        return _crossval(pipeline, folds, RunRanks(coord), resume=resume, retrain=retrain, progress=progress,
                         device=device, ddp=ddp, probs=oof_probabilities)


class _OneProcess:
    """The hooks of :func:`_crossval` for a single process: it does everything."""

    rank, world = 0, 1

    def prepare(self, pipeline: PipelineConfig, device: str) -> RunData:
        return prepare_run(pipeline, device=device)

    def start_ddp(self) -> None:
        pass

    def my_folds(self, folds: list[int], ddp: bool) -> list[int]:
        return folds

    def oof_folds(self, folds: list[int]) -> list[int]:
        return []  # rank 0 predicts them all below

    def after_training(self, run: RunData, folds: list[int],
                       results: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        update_model_record(run)
        return results

    def after_predictions(self, run: RunData, folds: list[int]) -> None:
        pass

    def finish(self, run: RunData, summary: dict[str, Any] | None) -> dict[str, Any]:
        assert summary is not None
        return summary


def _result_entry(r: Any) -> dict[str, Any]:
    return {"epochs": r.epochs, "best_epoch": r.best_epoch, "elapsed_s": round(r.elapsed_s, 1),
            "stopped_early": r.stopped_early}


def _crossval(pipeline: PipelineConfig, folds: list[int], ranks: Any, *, resume: bool, retrain: bool,
              progress: Callable[[int, dict[str, Any]], None] | None, device: str | None,
              ddp: bool, probs: bool = False) -> dict[str, Any]:
    from medseg.metrics import compute_metrics, compute_region_metrics
    from medseg.runtime import resolve_device

    run = ranks.prepare(pipeline, resolve_device(pipeline.train.device).type)
    if ddp:
        ranks.start_ddp()
    mine = ranks.my_folds(folds, ddp)
    results = {}
    for fold in mine:
        fold_dir = run.run_dir / f"fold_{fold}"
        if not retrain and fold_is_finished(fold_dir):
            logger.info("fold %d already trained; reusing %s", fold, fold_dir)
            continue
        cb = (lambda info, f=fold: progress(f, info)) if progress is not None else None
        res = train_fold(pipeline, fold, resume=resume, progress=cb, run=run, ddp=ddp or ranks.world == 1)
        results[fold] = res
    # rank 0 gets every rank's training results and writes the model record of all finished folds
    training = ranks.after_training(run, folds, {f: _result_entry(r) for f, r in results.items()})
    for fold in ranks.oof_folds(folds):
        predict_out_of_fold(run, fold, device=device, probabilities=probs)  # each rank its share of the OOF predictions (files)
    ranks.after_predictions(run, folds)
    if ranks.rank != 0:
        return ranks.finish(run, None)
    from medseg.transforms.labels import value_names

    # predictions (Predictor) and references (the files) both hold the data's label values: score by value
    labels = {v: n for v, n in value_names(run.plan.labels, run.plan.label_values).items()
              if v != run.plan.label_values[0]}
    regions = run.plan.regions  # with regions: scored per region, numbered from 1
    if regions:
        labels = {i + 1: r.name for i, r in enumerate(regions)}
    per_case: dict[str, dict[int, dict[str, float]]] = {}
    fold_of: dict[str, int] = {}
    pp_cases = []
    for fold in folds:
        fold_cases: dict[str, dict[int, dict[str, float]]] = {}
        for cid, pred, ref, spacing in predict_out_of_fold(run, fold, device=device, probabilities=probs):
            fold_cases[cid] = (compute_region_metrics(pred, ref, spacing, regions, ignore=run.plan.ignore_value)
                               if regions else compute_metrics(pred, ref, spacing, labels, ignore=run.plan.ignore_value))
            fold_of[cid] = fold
            pp_cases.append((pred, ref, spacing))
        _write_per_case(run.run_dir / f"fold_{fold}" / "per_case.csv", fold_cases, fold_of, labels)
        per_case.update(fold_cases)
    _write_per_case(run.run_dir / "per_case.csv", per_case, fold_of, labels)
    summary = summarize_crossval(per_case, labels, seed=pipeline.seed)
    setting, report = select_postprocessing(pp_cases, sorted(labels), ignore=run.plan.ignore_value, regions=regions)
    from medseg.inference.postprocess import save_postprocessing

    save_postprocessing(run.run_dir / "postprocessing.json", setting, report)  # the choice's evidence
    update_model_record(run, postprocessing=setting.to_dict())  # the setting prediction applies
    dice_fg = [summary["classes"][str(c)]["metrics"]["dice"]["mean"] for c in sorted(labels)]
    summary = {
        "pipeline": pipeline.name,
        "folds": folds,
        "n_cases": len(per_case),
        "mean_foreground_dice": float(np.mean(dice_fg)) if dice_fg else None,
        "mean_foreground_dice_postprocessed": report["mean_dice_after"],
        "postprocessing": setting.to_dict(),
        "training": {str(f): training[f] for f in folds if f in training},
        **summary,
    }
    write_json(run.run_dir / "crossval_summary.json", summary)
    logger.debug("crossval %s: OOF mean foreground Dice %.4f over %d cases (post-processed %.4f)", pipeline.name,
                summary["mean_foreground_dice"] or float("nan"), len(per_case), report["mean_dice_after"])
    return ranks.finish(run, summary)
