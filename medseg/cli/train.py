"""`medseg train`: train one fold of a pipeline (`--config pipelines/NAME.yaml --fold K`).

Runs under ``torchrun --nproc-per-node N -m medseg.cli.main train ...`` for multi-GPU data-parallel training.
"""

from __future__ import annotations

import argparse


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `crossval`."""
    p.add_argument("--config", "-c", metavar="YAML",
                   help="pipeline config whose values override the defaults, e.g. pipelines/demo.yaml (default: "
                        "none -- every choice from the plan and the training recipe for the device and budget; "
                        "then --dataset is required)")
    p.add_argument("--output", "-o", metavar="DIR", help="run folder (default: the config's `output`)")
    p.add_argument("--dataset", metavar="DIR", help="data set folder (default: the config's `dataset`)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from checkpoint_latest.pt")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="training time per fold, held to the step; the LR schedule decays to the end of it and "
                        "validation/checkpoint intervals follow it (config: max_minutes; CPU default without a "
                        "config: 20)")
    p.add_argument("--configuration", metavar="NAME",
                   help="train this configuration of the plan only, e.g. 3d_fullres (config: configuration; default "
                        "without a config: every 3D configuration the plan lists, each into RUN/NAME/, the budget "
                        "split equally, and crossval chooses the best one or pair from out-of-fold Dice)")
    p.add_argument("--epochs", type=int, help="maximum epochs (config: train.epochs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device (config: train.device)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "fp32", "none"),
                   help="mixed precision (config: train.amp; none = deprecated alias of fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def overrides(args: argparse.Namespace) -> dict:
    """Config overrides from the command line."""
    top: dict = {}
    train: dict = {}
    if args.output:
        top["output"] = args.output
    if args.dataset:
        import os

        top["dataset"] = os.path.abspath(args.dataset)
    if getattr(args, "configuration", None):
        top["configuration"] = args.configuration
    if args.time_budget is not None:
        train["max_minutes"] = args.time_budget
    if args.epochs is not None:
        train["epochs"] = args.epochs
    if args.device:
        train["device"] = args.device
    if args.amp:
        train["amp"] = args.amp
    if train:
        top["train"] = train
    return top


class ProgressBar:
    """tqdm bar over training progress (percent of epochs or of the time budget) with ETA and latest metrics."""

    def __init__(self, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=desc, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]")

    def __call__(self, info: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(100 * info["progress"] - self.bar.n)
        post = {"ep": info["epoch"], "loss": f"{info['train_loss']:.3f}"}
        if "val_dice" in info:
            post["dice"] = f"{info['val_dice']:.3f}"
        self.bar.set_postfix(post, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one fold (patient-wise split, resumable); no YAML needed",
                              description="Train fold K into RUN/fold_K (`--dataset DIR` alone, or a pipeline "
                              "config to override the defaults); writes model.json so that `medseg predict -m RUN` "
                              "works with the folds trained so far.")
    add_common(p)
    p.add_argument("--fold", "-f", type=int, required=True, help="fold index (0-based) of splits.json")
    p.set_defaults(func=run)


def prepare_run(pipeline, args, folds) -> None:
    """Boundary checks and cleanup before training: the YAML's voxel limit (unless --max-voxels), a run folder that
    is not a file, and no temporaries of a killed earlier run left in the fold folders this process owns."""
    import os

    from medseg.errors import InputError
    from medseg.io.atomic import remove_stale_temporaries
    from medseg.io.guard import set_max_voxels

    if pipeline.max_voxels is not None and getattr(args, "max_voxels", None) is None:
        set_max_voxels(pipeline.max_voxels)
    if pipeline.output.exists() and not pipeline.output.is_dir():
        raise InputError(pipeline.output, "exists and is not a folder", "a run folder (new or existing), --output")
    if int(os.environ.get("RANK", "0")) == 0:
        # a run of every configuration has its folds in RUN/<configuration>/fold_K
        roots = [pipeline.output] + ([d for d in pipeline.output.iterdir() if (d / "config.yaml").is_file()]
                                     if pipeline.configuration == "auto" and pipeline.output.is_dir() else [])
        for root in roots:
            for k in folds:
                remove_stale_temporaries(root / f"fold_{k}")


def run(args) -> int:
    import os
    import sys

    from medseg.training.config import load_pipeline
    from medseg.training.fold import train_fold
    from medseg.training.multiconfig import is_multi_configuration, train_configurations

    pipeline = load_pipeline(args.config, overrides(args))
    prepare_run(pipeline, args, [args.fold])
    if is_multi_configuration(pipeline):
        return _train_configurations(pipeline, args, train_configurations)
    rank = int(os.environ.get("RANK", "0"))
    bar = ProgressBar(not args.no_progress and rank == 0 and sys.stderr.isatty(), f"fold {args.fold}")
    try:
        res = train_fold(pipeline, args.fold, resume=args.resume, progress=bar)
    finally:
        bar.close()
    if rank == 0:
        print(f"fold {args.fold}: {res.epochs} epochs in {res.elapsed_s / 60:.1f} min, best smoothed validation "
              f"Dice {res.best_ema_dice:.4f} (epoch {res.best_epoch}) -> {pipeline.output / f'fold_{args.fold}'}")
    return 0


def _train_configurations(pipeline, args, train_configurations) -> int:
    """``medseg train`` without a configuration: fold K of every 3D configuration the plan lists."""
    import sys

    bars: dict[str, ProgressBar] = {}

    def progress(name: str, info: dict) -> None:
        if name not in bars:
            for b in bars.values():
                b.close()
            bars[name] = ProgressBar(not args.no_progress and sys.stderr.isatty(), f"{name} fold {args.fold}")
        bars[name](info)

    try:
        results = train_configurations(pipeline, args.fold, resume=args.resume, progress=progress)
    finally:
        for b in bars.values():
            b.close()
    for name, res in results.items():
        print(f"{name} fold {args.fold}: {res.epochs} epochs in {res.elapsed_s / 60:.1f} min, best smoothed "
              f"validation Dice {res.best_ema_dice:.4f} (epoch {res.best_epoch}) -> "
              f"{pipeline.output / name / f'fold_{args.fold}'}")
    return 0
