"""`medseg crossval`: train the folds of a pipeline, predict out of fold, summarise, choose post-processing."""

from __future__ import annotations


def _folds(text: str) -> list[int]:
    import argparse

    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--folds {text!r}: expected fold numbers such as '0 1 2' or '0,1'") from None


def register(subparsers) -> None:
    from medseg.cli.train import add_common

    p = subparsers.add_parser("crossval", help="k-fold cross-validation: train, out-of-fold metrics, model folder",
                              description="`medseg crossval --dataset DIR` needs no YAML: every choice comes from the "
                              "plan and the training recipe for the device and --time-budget (a --config only "
                              "overrides). Train every fold (folds already trained are reused), predict each fold's "
                              "validation cases, write per_case.csv, crossval_summary.json, postprocessing.json and "
                              "model.json (all folds = an ensemble for `medseg predict -m RUN`). Without a named "
                              "configuration, every 3D configuration the plan lists is cross-validated into RUN/NAME/ "
                              "(the time budget split equally) and model.json records the best one or pair by "
                              "out-of-fold Dice (nnU-Net's find_best_configuration).")
    add_common(p)
    p.add_argument("--folds", type=_folds, help="folds to run, e.g. '0 1' or '0,1' (default: all)")
    p.add_argument("--retrain", action="store_true", help="train again folds that already finished")
    p.add_argument("--ddp", action="store_true",
                   help="under torchrun: train each fold with all ranks together (data-parallel) instead of one "
                        "fold per rank (the default there: folds[rank::world])")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    import sys

    from medseg.cli.train import ProgressBar, overrides, prepare_run
    from medseg.training.config import load_pipeline
    from medseg.training.crossval import run_crossval

    pipeline = load_pipeline(args.config, overrides(args))
    prepare_run(pipeline, args, args.folds if args.folds is not None else range(pipeline.folds))
    rank = int(os.environ.get("RANK", "0"))  # under torchrun every rank trains; rank 0 alone shows and prints
    bars: dict[int, ProgressBar] = {}

    def progress(fold: int, info: dict) -> None:
        if fold not in bars:
            for b in bars.values():
                b.close()
            bars[fold] = ProgressBar(not args.no_progress and rank == 0 and sys.stderr.isatty(), f"fold {fold}")
        bars[fold](info)

    try:
        summary = run_crossval(pipeline, args.folds, resume=args.resume, retrain=args.retrain, progress=progress,
                               ddp=args.ddp)
    finally:
        for b in bars.values():
            b.close()
    if rank != 0:
        return 0
    mean, post = summary["mean_foreground_dice"], summary["mean_foreground_dice_postprocessed"]
    print(f"{pipeline.name}: out-of-fold mean foreground Dice {'n/a' if mean is None else f'{mean:.4f}'} over "
          f"{summary['n_cases']} cases (post-processed {'n/a' if post is None else f'{post:.4f}'}, "
          f"{summary['postprocessing']})")
    def num(v: object) -> str:  # a statistic is None where it cannot be computed (e.g. the sd of one case)
        return "n/a" if v is None else f"{v:.4f}"

    for lab, entry in summary["classes"].items():
        d = entry["metrics"]["dice"]
        print(f"  {lab} {entry.get('name', '')}: Dice {num(d['mean'])} +- {num(d['sd'])} "
              f"(95% CI {num(d['ci_low'])}-{num(d['ci_high'])})")
    if "selection" in summary:  # every configuration of the plan was trained: which one (or pair) predicts
        scores = ", ".join(f"{k} {v:.4f}" for k, v in summary["selection"]["candidates"].items())
        print(f"chosen: {summary['chosen']} (out-of-fold mean foreground Dice: {scores})")
    print(f"run folder: {pipeline.output}")
    return 0
