"""`medseg export-model RUN -o model.zip`: a verified model package (record, weights, card, SHA-256 manifest)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the ``export-model`` subcommand."""
    p = subparsers.add_parser(
        "export-model", help="package a run folder as model.zip (weights, model card, SHA-256 manifest)",
        description="Write a model package: model.json, plan.json, post-processing, the chosen folds' weights only, "
                    "MODEL_CARD.md and model_card.json, and MANIFEST.json with the SHA-256 of every file. "
                    "`medseg predict -m model.zip` and `medseg install-model model.zip` read it.")
    p.add_argument("run", metavar="RUN", help="run folder (medseg crossval)")
    p.add_argument("-o", "--output", required=True, metavar="ZIP", help="the package to write (.zip)")
    p.add_argument("--folds", type=int, nargs="+", metavar="K", help="folds to include (default: the run's)")
    p.add_argument("--name", help="package name for install-model (default: the pipeline name)")
    p.add_argument("--onnx", action="store_true", help="also include onnx/fold_K.onnx (parity-checked)")
    p.add_argument("--int8", action="store_true",
                   help="also include onnx/fold_K.int8.onnx, calibrated on the run's training cases (needs the data)")
    p.add_argument("--calibration-cases", type=int, default=8, metavar="N", help="training cases per fold for INT8")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``medseg export-model``."""
    from medseg.deploy.package import export_package

    manifest = export_package(args.run, args.output, folds=args.folds, name=args.name, onnx=args.onnx,
                              int8=args.int8, calibration_cases=args.calibration_cases)
    size = sum(m["size"] for m in manifest["files"].values())
    print(f"medseg export-model: wrote {args.output} ({manifest['name']}, folds {manifest['folds']}, "
          f"{len(manifest['files'])} files, {size / 2**20:.1f} MiB unpacked)")
    for fold, rep in (manifest.get("export") or {}).get("folds", {}).items():
        print(f"  fold {fold}: ONNX parity max abs logit diff {rep['max_abs_diff']:.2e}")
    return 0
