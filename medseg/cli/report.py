"""`medseg report`: self-contained HTML QA report of a prediction folder or run; PNG overlay of one case."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    """Add the ``report`` subcommand."""
    p = subparsers.add_parser(
        "report",
        help="HTML QA report (metrics, curves, overlay panels worst first) or a PNG overlay of one case",
        description="PATH a folder: write one self-contained HTML report (figures embedded) for a prediction "
        "folder (with --ref, --images) or a cross-validation run folder. PATH a label-map file: write a PNG "
        "overlay (image / reference / prediction on three orthogonal slices) of that one case.",
    )
    p.add_argument("path", help="prediction folder, run folder, or one predicted label map (PNG overlay)")
    p.add_argument("--ref", help="reference label maps: a folder (or the reference file for a single case)")
    p.add_argument("--images", help="images: a folder with <case> or <case>_0000 files (or one image file)")
    p.add_argument("-o", "--out", help="output .html (default PATH/report.html) or .png (default "
                   "<case>_overlay.png in the current folder)")
    p.add_argument("--max-cases", type=int, default=12, help="number of case panels, worst first (default 12)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM", help="NSD tolerance in mm (default 1)")
    p.add_argument("--attention-case", help="case whose attention-gate maps to show (default: the worst case)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``medseg report``; returns the exit code."""
    from medseg.errors import ConfigError, InputError

    if args.max_cases < 0:
        raise ConfigError("--max-cases", args.max_cases, "an integer >= 0")
    path = Path(args.path)
    if not path.exists():
        raise InputError(path, "does not exist", "a prediction folder, a run folder or a label-map file")
    if path.is_dir():
        from medseg.evaluation.report import build_report

        out = build_report(path, ref_dir=args.ref, image_dir=args.images, out_path=args.out,
                           max_cases=args.max_cases, nsd_tolerance_mm=args.nsd_tolerance,
                           attention_case=args.attention_case)
        print(f"wrote {out}")
        return 0
    from medseg.evaluation.evaluate import case_id_of, check_same_geometry
    from medseg.evaluation.figures import save_overlay_png
    from medseg.io import read_volume
    from medseg.metrics import compute_metrics

    for opt in ("ref", "images"):
        value = getattr(args, opt)
        if value is not None and Path(value).is_dir():
            raise InputError(value, "is a folder", f"a single file for --{opt} when PATH is one label map")
    pred = read_volume(path)
    ref = read_volume(args.ref) if args.ref else None
    image = read_volume(args.images) if args.images else None
    case = case_id_of(path) or path.name
    title = case
    if ref is not None:
        check_same_geometry(pred, ref, path, args.ref)
        import numpy as np

        labels = [int(v) for v in np.union1d(np.unique(ref.array), np.unique(pred.array)) if v != 0]
        if labels:
            res = compute_metrics(pred.array, ref.array, ref.spacing, labels)
            title += "  " + ", ".join(f"{k}: Dice {m['dice']:.3f}" for k, m in res.items())
    if image is not None and not image.same_geometry(pred):
        raise InputError(args.images, f"is not on the voxel grid of the prediction {path}",
                         "the image the prediction was made from (same shape and affine)")
    out = Path(args.out) if args.out else Path(f"{case}_overlay.png")
    save_overlay_png(pred, out, ref, image, title=title)
    print(f"wrote {out}")
    return 0
