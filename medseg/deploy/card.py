"""The model card of a package: ``model_card.json`` (numbers copied from the run's records) and ``MODEL_CARD.md``.

Every number comes from a run-folder file (never recomputed): the data set fingerprint (``plan.json``), the
patients (``splits.json``), the cross-validation Dice per class with its bootstrap CI
(``crossval_summary.json``), versions and hardware (``environment.json``), training time (the summary's
``training`` block, else each fold's ``metrics.csv``), and the free text of the pipeline YAML's ``card:`` block
(intended use, limitations, ...).
"""

from __future__ import annotations

from typing import Any

from medseg.deploy.runfolder import RunFolder

__all__ = ["build_card", "render_card"]

CARD_VERSION = 1
_FINGERPRINT_KEYS = ("dataset", "manifest_hash", "num_cases", "spatial_dims", "channels", "modalities", "labels",
                     "median_spacing", "median_shape")


def _training_time(run: RunFolder, folds: list[int]) -> dict[str, float | None]:
    recorded = run.summary.get("training") or {}
    out: dict[str, float | None] = {}
    for f in folds:
        sec = (recorded.get(str(f)) or {}).get("elapsed_s")
        if sec is None:
            rows = run.fold_metrics_rows(f)
            sec = float(rows[-1]["elapsed_s"]) if rows and rows[-1].get("elapsed_s") else None
        out[str(f)] = None if sec is None else float(sec)
    return out


def build_card(run: RunFolder, folds: list[int], name: str) -> dict[str, Any]:
    """The card as plain data.

    Args:
        run: the run folder.
        folds: the folds the package carries.
        name: the package name.

    Returns:
        The ``model_card.json`` mapping.
    """
    from medseg import __version__

    plan, model, summary, env = run.plan, run.model, run.summary, run.environment
    fp = plan.get("fingerprint") or {}
    patients = set()
    for split in run.splits:
        patients.update(split.get("train_patients", []))
        patients.update(split.get("val_patients", []))
    cfg_name = run.configuration
    cfg = plan["configurations"][cfg_name]
    classes = {}
    for idx, entry in (summary.get("classes") or {}).items():
        dice = (entry.get("metrics") or {}).get("dice") or {}
        classes[str(idx)] = {"name": entry.get("name"), "dice_mean": dice.get("mean"), "dice_ci_low": dice.get("ci_low"),
                             "dice_ci_high": dice.get("ci_high"), "n": dice.get("n")}
    card_block = run.card_block
    extra = {k: v for k, v in card_block.items() if k not in ("intended_use", "limitations")}
    return {
        "card_version": CARD_VERSION,
        "name": name,
        "pipeline": model.get("pipeline") or run.config.get("name"),
        "dataset": {
            **{k: fp.get(k) for k in _FINGERPRINT_KEYS if k in fp},
            "name": fp.get("dataset") or plan.get("dataset"),
            "num_cases": summary.get("n_cases", fp.get("num_cases")),
            "num_patients": len(patients) or None,
        },
        "model": {
            "configuration": cfg_name,
            "network": model.get("network") or cfg.get("network"),
            "patch_size": cfg.get("patch_size"),
            "spacing": cfg.get("spacing"),
            "mirror_axes": cfg.get("mirror_axes"),
            "labels": model.get("labels") or plan.get("labels"),
            "folds": folds,
        },
        "cross_validation": {
            "folds": summary.get("folds"),
            "n_cases": summary.get("n_cases"),
            "ci": summary.get("ci"),
            "n_boot": summary.get("n_boot"),
            "mean_foreground_dice": summary.get("mean_foreground_dice"),
            "mean_foreground_dice_postprocessed": summary.get("mean_foreground_dice_postprocessed"),
            "classes": classes,
        },
        "intended_use": card_block.get("intended_use"),
        "limitations": card_block.get("limitations"),
        "card": extra,
        "software": {"trained_with": env.get("packages") or {}, "python": env.get("python"),
                     "packaged_with_medseg": __version__, "git": env.get("git")},
        "training": {
            "seconds_per_fold": _training_time(run, folds),
            "hardware": {k: env.get(k) for k in ("processor", "platform", "cuda", "torch_threads") if k in env},
        },
    }


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def render_card(card: dict[str, Any]) -> str:
    """``MODEL_CARD.md`` from the card mapping (the same numbers, for people)."""
    ds, model, cv, sw, tr = card["dataset"], card["model"], card["cross_validation"], card["software"], card["training"]
    ci = cv.get("ci")
    lines = [
        f"# Model card: {card['name']}", "",
        f"Pipeline `{card.get('pipeline')}`, configuration `{model['configuration']}`, "
        f"network `{(model.get('network') or {}).get('name')}`, folds {model['folds']} (ensembled).", "",
        "## Intended use", "", str(card.get("intended_use") or "Not stated in the pipeline's `card:` block."), "",
        "## Limitations", "", str(card.get("limitations") or "Not stated in the pipeline's `card:` block."), "",
        "## Training data", "",
        f"- data set: {ds.get('name')} (manifest hash `{ds.get('manifest_hash')}`)",
        f"- cases: {_fmt(ds.get('num_cases'))}, patients: {_fmt(ds.get('num_patients'))}",
        f"- channels: {ds.get('channels') or ds.get('modalities')}, median spacing {ds.get('median_spacing')}, "
        f"median shape {ds.get('median_shape')}",
        f"- labels: {model.get('labels')}", "",
        "## Cross-validation", "",
        f"Out-of-fold Dice over {_fmt(cv.get('n_cases'))} cases, folds {cv.get('folds')}"
        + (f", {round(100 * ci)}% bootstrap CI ({cv.get('n_boot')} resamples)" if ci else "") + ".", "",
        "| class | name | Dice | CI low | CI high | n |", "|---|---|---|---|---|---|",
    ]
    for idx, c in sorted(cv["classes"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {idx} | {c['name']} | {_fmt(c['dice_mean'])} | {_fmt(c['dice_ci_low'])} | "
                     f"{_fmt(c['dice_ci_high'])} | {_fmt(c['n'])} |")
    lines += ["", f"Mean foreground Dice: {_fmt(cv.get('mean_foreground_dice'))} "
                  f"(after post-processing: {_fmt(cv.get('mean_foreground_dice_postprocessed'))}).", "",
              "## Input", "", f"- patch {model.get('patch_size')} at spacing {model.get('spacing')}, "
                              f"test-time mirroring over axes {model.get('mirror_axes')}", "",
              "## Software and hardware", ""]
    pk = sw.get("trained_with") or {}
    lines.append(f"- trained with medseg {pk.get('medseg')}, torch {pk.get('torch')}, MONAI {pk.get('monai')}, "
                 f"Python {sw.get('python')}; packaged with medseg {sw.get('packaged_with_medseg')}")
    hw = tr.get("hardware") or {}
    lines.append(f"- hardware: {hw.get('processor')} on {hw.get('platform')}, CUDA {hw.get('cuda')}, "
                 f"{hw.get('torch_threads')} torch threads")
    secs = tr.get("seconds_per_fold") or {}
    lines.append("- training time per fold: " + ", ".join(
        f"fold {k}: {_fmt(None if v is None else v / 60, 1)} min" for k, v in secs.items()))
    for key, value in (card.get("card") or {}).items():
        lines += ["", f"## {str(key).replace('_', ' ').capitalize()}", "", str(value)]
    return "\n".join(lines) + "\n"
