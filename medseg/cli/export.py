"""`medseg export RUN --format onnx|torchscript -o DIR`: one file per fold, with a parity check against PyTorch."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser(
        "export", help="export a run's networks to ONNX or TorchScript (fp32, parity-checked)",
        description="Write DIR/fold_K.onnx (or fold_K.pt for TorchScript) per fold, float32, dynamic batch and, "
                    "where the network allows, dynamic spatial axes, and DIR/export_report.json. Each file is run "
                    "back against PyTorch; a max abs logit difference above 1e-4 fails the export.")
    p.add_argument("run", metavar="RUN", help="run folder (medseg crossval) or unpacked package")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="export format")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--folds", type=int, nargs="+", metavar="K", help="folds to export (default: the run's)")
    p.add_argument("--int8", action="store_true",
                   help="also write fold_K.int8.onnx (static INT8, calibrated on the fold's training cases)")
    p.add_argument("--calibration-cases", type=int, default=8, metavar="N", help="training cases per fold for INT8")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``medseg export``."""
    from medseg.deploy.export import export_run

    report = export_run(args.run, args.format, args.output, folds=args.folds, int8=args.int8,
                        calibration_cases=args.calibration_cases)
    for fold, rep in report["folds"].items():
        axes = "dynamic batch and spatial axes" if rep["dynamic_spatial"] else f"dynamic batch, fixed spatial axes ({rep['note']})"
        extra = f", INT8 {rep['int8']['path']}" if "int8" in rep else ""
        print(f"medseg export: fold {fold}: {rep['path']} ({axes}); parity max abs logit diff "
              f"{rep['max_abs_diff']:.2e} <= {report['parity_tolerance']:g}{extra}")
    return 0
