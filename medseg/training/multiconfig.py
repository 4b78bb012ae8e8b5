"""Train every configuration the plan lists, then choose the best one or pair (nnU-Net's default workflow).

A pipeline whose ``configuration`` is ``auto`` (no YAML and no ``--configuration``) trains each 3D configuration of
the plan (``3d_fullres``; ``3d_lowres`` when planned; see :func:`auto_configurations`) into its own complete run
folder::

    RUN/plan.json, splits.json, config.yaml, environment.json   shared by every configuration
    RUN/cache/                                                  the preprocess cache (one folder per configuration)
    RUN/<configuration>/                                        a run folder as `medseg crossval --configuration`
                                                                writes it, with out-of-fold probabilities kept
    RUN/model.json                                              the selection record (medseg.planning.selection)
    RUN/crossval_summary.json, postprocessing.json              of the chosen configuration or ensemble

Time budget: the per-fold budget (``train.max_minutes``) is split equally between the configurations (nnU-Net
trains each for the same number of epochs, and the planner sizes every configuration's batch to the same compute
budget, so their steps cost about the same); ``train.epochs`` caps each configuration alone. The split is recorded
in each configuration's ``config.yaml`` and in the selection record's ``budget``.

When ``auto`` trains one configuration (2D data, a 3D plan without ``3d_lowres``, regions) the run keeps the
ordinary single-configuration run folder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medseg.errors import ConfigError
from medseg.planning.selection import Selection, candidate_name, load_selection, write_selection
from medseg.training.config import PipelineConfig

__all__ = ["BUDGET_RULE", "auto_configurations", "is_multi_configuration", "configuration_pipelines",
           "crossval_configurations", "train_configurations"]

logger = logging.getLogger(__name__)

BUDGET_RULE = ("the per-fold time budget split equally between the configurations (nnU-Net trains each for the same "
               "number of epochs; each configuration's batch is sized to the same compute budget); epochs cap each "
               "configuration alone")


def _no_torchrun() -> None:
    from medseg.training.distributed import env_world

    if env_world()[1] > 1:
        raise ConfigError("--configuration", "auto (every configuration of the plan)",
                          "one configuration under torchrun, e.g. --configuration 3d_fullres (then `medseg crossval` "
                          "without torchrun and without --configuration collects them and chooses)")


def _root(pipeline: PipelineConfig, device: str | None) -> Any:
    from medseg.runtime import resolve_device
    from medseg.training.fold import prepare_run

    return prepare_run(pipeline, device=resolve_device(device or pipeline.train.device).type, root=True)


def _plan(pipeline: PipelineConfig, device: str | None) -> Any:
    """The run's plan: ``RUN/plan.json``, else the pipeline's ``plan``, else planned now and saved as
    ``RUN/plan.json`` (which :func:`~medseg.training.fold.prepare_run` then reuses)."""
    from medseg.planning import load_plan

    run_plan = pipeline.output / "plan.json"
    if run_plan.is_file():
        return load_plan(run_plan)
    if pipeline.plan is not None:
        return load_plan(pipeline.plan)
    from medseg.data.manifest import load_manifest
    from medseg.planning import fingerprint, make_plan, save_plan
    from medseg.runtime import resolve_device

    manifest = load_manifest(pipeline.dataset, patient_regex=pipeline.patient_regex,
                             file_ending=pipeline.file_ending, label_aliases=pipeline.label_aliases)
    plan = make_plan(fingerprint(manifest), device=resolve_device(device or pipeline.train.device).type)
    pipeline.output.mkdir(parents=True, exist_ok=True)
    save_plan(plan, run_plan)
    return plan


def auto_configurations(plan: Any) -> list[str]:
    """The configurations that ``configuration: auto`` trains: the plan's 3D ones (``3d_fullres``, and
    ``3d_lowres`` with its cascade stage ``3d_cascade_fullres`` where the planner found the full-resolution patch
    too small for the images; the cascade only when every fold is cross-validated), or the plan's first alone for
    2D data and for region-based plans (choosing between sigmoid region outputs is not done here).

    ``2d`` is trained only when named (``--configuration 2d``): with a time budget every extra configuration
    takes minutes from the 3D network, and on the demo set (one epoch each) 2d scored 0.216 and the pair 0.385
    against 0.392 for 3d_fullres alone, so an unasked 2d network would halve the budget for no gain there. The
    price: data where 2d would win (strongly anisotropic stacks) is not searched unless asked.

    Args:
        plan: a :class:`~medseg.planning.schema.Plan`.

    Returns:
        Configuration names, the plan's order (``3d_fullres`` first).
    """
    names = [n for n in plan.configurations if n.startswith("3d")]
    if not names or getattr(plan, "regions", None):
        return list(plan.configurations)[:1]
    return names


def _without_cascade(plan: Any, names: list[str], folds: Sequence[int] | None, n_folds: int) -> list[str]:
    """``names`` without cascade stages unless ``folds`` is every fold: a cascade stage trains on its previous
    stage's out-of-fold predictions of every case (:mod:`medseg.training.cascade`)."""
    if folds is not None and sorted(set(folds)) == list(range(n_folds)):
        return names
    stages = [n for n in names if plan.configuration(n).previous_stage]
    for n in stages:
        logger.info("%s is not trained: a cascade stage learns from %s's out-of-fold predictions of every case, and "
                    "folds %s are not all %d folds", n, plan.configuration(n).previous_stage,
                    "-" if folds is None else list(folds), n_folds)
    return [n for n in names if n not in stages]


def is_multi_configuration(pipeline: PipelineConfig, device: str | None = None) -> bool:
    """True when ``pipeline`` trains every configuration of a plan that lists several (plans it if needed).

    Raises:
        ConfigError: ``auto`` under torchrun (one named configuration at a time there).
    """
    if pipeline.configuration != "auto":
        return False
    _no_torchrun()
    return len(auto_configurations(_plan(pipeline, device))) > 1


def configuration_pipelines(pipeline: PipelineConfig, names: Sequence[str]) -> dict[str, PipelineConfig]:
    """The pipeline of each configuration: ``RUN/<name>``, the root's plan, splits and cache, its share of the budget.

    Args:
        pipeline: the root pipeline (``configuration: auto``).
        names: the configurations to train.

    Returns:
        ``{name: PipelineConfig}``.
    """
    from medseg.training.fold import cache_root

    root = pipeline.output
    t = pipeline.train
    share = None if t.max_minutes is None else float(t.max_minutes) / len(names)
    out = {}
    for name in names:
        train = dataclasses.replace(t, max_minutes=share)
        out[name] = dataclasses.replace(pipeline, output=root / name, configuration=name, plan=root / "plan.json",
                                        splits=root / "splits.json", cache=cache_root(pipeline), train=train)
    return out


def _budget(pipeline: PipelineConfig, names: Sequence[str]) -> dict[str, Any]:
    m = pipeline.train.max_minutes
    return {"rule": BUDGET_RULE, "max_minutes_per_fold": m,
            "minutes": {n: (None if m is None else float(m) / len(names)) for n in names},
            "epochs": pipeline.train.epochs}


def train_configurations(pipeline: PipelineConfig, fold: int, *, resume: bool = False,
                         progress: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``medseg train --fold K`` without a configuration: fold K of every configuration, one after the other.

    ``RUN/model.json`` is written as a provisional selection (the plan's first configuration) when absent, so
    ``medseg predict -m RUN`` works before crossval has scored the configurations.

    Args:
        pipeline: the root pipeline.
        fold: the fold.
        resume: continue interrupted trainings.
        progress: ``(configuration, epoch_info)`` callback.

    Returns:
        ``{configuration: FoldResult}``.
    """
    from medseg.training.fold import train_fold

    _no_torchrun()
    root = _root(pipeline, None)
    names = _without_cascade(root.plan, auto_configurations(root.plan), None, pipeline.folds)
    results = {}
    for name, sub in configuration_pipelines(pipeline, names).items():
        logger.info("configuration %s, fold %d (%s minutes)", name, fold, sub.train.max_minutes)
        cb = (lambda info, n=name: progress(n, info)) if progress is not None else None
        results[name] = train_fold(sub, fold, resume=resume, progress=cb)
    if load_selection(pipeline.output) is None:
        write_selection(pipeline.output, Selection(
            dataset=root.plan.dataset, members=names, chosen=[names[0]],
            rule="provisional: not scored yet (`medseg crossval` chooses from out-of-fold Dice); the plan's first "
                 "configuration", budget=_budget(pipeline, names)))
    return results


def crossval_configurations(pipeline: PipelineConfig, folds: Sequence[int], *, resume: bool = False,
                            retrain: bool = False, progress: Callable[[int, dict[str, Any]], None] | None = None,
                            device: str | None = None) -> dict[str, Any]:
    """Cross-validate every configuration of the plan, choose the best one or pair, write the selection record.

    Args:
        pipeline: the root pipeline (``configuration: auto``).
        folds: the folds.
        resume, retrain, progress, device: as :func:`medseg.training.crossval.run_crossval`.

    Returns:
        The root summary (also ``RUN/crossval_summary.json``): the chosen candidate's summary plus
        ``configurations`` (each one's OOF Dice) and ``selection`` (the record).
    """
    from medseg.training.crossval import run_crossval
    from medseg.training.find_best import FIND_BEST_RULE, find_best_configuration, score_candidates
    from medseg.training.record import write_json

    _no_torchrun()
    root = _root(pipeline, device)
    names = _without_cascade(root.plan, auto_configurations(root.plan), folds, pipeline.folds)
    subs = configuration_pipelines(pipeline, names)
    summaries = {}
    for name, sub in subs.items():
        logger.info("configuration %s: folds %s (%s minutes per fold)", name, list(folds), sub.train.max_minutes)
        summaries[name] = run_crossval(sub, folds, resume=resume, retrain=retrain, progress=progress,
                                       device=device, oof_probabilities=True)
    cases = _oof_cases(root, folds)
    oof = _OofReader(root, cases)
    scores = score_candidates(names, list(cases), oof.probabilities, oof.reference, root.plan.label_values,
                              root.plan.ignore_value)
    chosen = find_best_configuration(scores)
    if len(chosen) == 1:
        summary = dict(summaries[chosen[0]])
        post = {}  # a single configuration predicts with its own record and post-processing
    else:
        summary, post = _ensemble_summary(pipeline, root, chosen, cases, oof)
    sel = Selection(dataset=root.plan.dataset, members=names, chosen=list(chosen), candidates=scores,
                    postprocessing=post, rule=FIND_BEST_RULE, budget=_budget(pipeline, names))
    write_selection(pipeline.output, sel)
    summary.update({
        "pipeline": pipeline.name, "chosen": candidate_name(chosen),
        "configurations": {n: {"mean_foreground_dice": s["mean_foreground_dice"],
                               "mean_foreground_dice_postprocessed": s["mean_foreground_dice_postprocessed"]}
                           for n, s in summaries.items()},
        "selection": sel.to_dict()})
    write_json(pipeline.output / "crossval_summary.json", summary)
    logger.info("chosen: %s (out-of-fold mean foreground Dice %s)", candidate_name(chosen),
                ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return summary


def _oof_cases(root: Any, folds: Sequence[int]) -> dict[str, int]:
    """``{case_id: fold}`` of the labelled validation cases of ``folds``."""
    labelled = {c.case_id for c in root.manifest.cases if c.label is not None}
    return {cid: f for f in folds for cid in root.splits[f]["val"] if cid in labelled}


class _OofReader:
    """Out-of-fold probabilities of each configuration and the references, read from the run folders."""

    def __init__(self, root: Any, cases: dict[str, int]):
        self.root, self.cases = root, cases
        self._ref: tuple[str, np.ndarray, tuple[float, ...]] | None = None

    def probabilities(self, name: str, cid: str) -> np.ndarray:
        from medseg.training.crossval import load_oof_probabilities

        return load_oof_probabilities(self.root.run_dir / name / f"fold_{self.cases[cid]}", cid)

    def reference_and_spacing(self, cid: str) -> tuple[np.ndarray, tuple[float, ...]]:
        if self._ref is None or self._ref[0] != cid:  # one case cached: the candidates of a case share it
            from medseg.transforms.case import load_case

            case = self.root.manifest.case(cid)
            _, ref = load_case(case.images, case.label, case.label_names)
            assert ref is not None
            self._ref = (cid, np.asarray(ref.array[0]), tuple(ref.spacing))
        return self._ref[1], self._ref[2]

    def reference(self, cid: str) -> np.ndarray:
        return self.reference_and_spacing(cid)[0]


def _ensemble_summary(pipeline: PipelineConfig, root: Any, chosen: Sequence[str], cases: dict[str, int],
                      oof: _OofReader) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-case metrics, summary and post-processing of the ensemble ``chosen`` on the OOF cases."""
    from medseg.inference.postprocess import save_postprocessing
    from medseg.metrics import compute_metrics
    from medseg.training.crossval import select_postprocessing, summarize_crossval
    from medseg.training.find_best import ensemble_label
    from medseg.transforms.labels import value_names

    plan = root.plan
    labels = {v: n for v, n in value_names(plan.labels, plan.label_values).items() if v != plan.label_values[0]}
    per_case, pp_cases = {}, []
    for cid in cases:
        ref, spacing = oof.reference_and_spacing(cid)
        pred = ensemble_label([oof.probabilities(n, cid) for n in chosen], plan.label_values)
        per_case[cid] = compute_metrics(pred, ref, spacing, labels, ignore=plan.ignore_value)
        pp_cases.append((pred, ref, spacing))
    summary = summarize_crossval(per_case, labels, seed=pipeline.seed)
    setting, report = select_postprocessing(pp_cases, sorted(labels), ignore=plan.ignore_value)
    save_postprocessing(pipeline.output / "postprocessing.json", setting, report)
    dice_fg = [summary["classes"][str(c)]["metrics"]["dice"]["mean"] for c in sorted(labels)]
    dice_fg = [d for d in dice_fg if d is not None]
    return ({"folds": sorted(set(cases.values())), "n_cases": len(per_case),
             "mean_foreground_dice": float(np.mean(dice_fg)) if dice_fg else None,
             "mean_foreground_dice_postprocessed": report["mean_dice_after"], "postprocessing": setting.to_dict(),
             **summary}, setting.to_dict())
