"""`medseg evaluate`: score a folder of predictions against references; write per_case.csv and summary.json."""

from __future__ import annotations

import argparse


def _label_arg(text: str) -> tuple[int, str | None]:
    """``1`` or ``1=anterior``."""
    value, _, name = text.partition("=")
    try:
        return int(value), (name or None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"label {text!r} is not an integer (or INT=NAME)") from None


def register(subparsers) -> None:
    """Add the ``evaluate`` subcommand."""
    p = subparsers.add_parser(
        "evaluate",
        help="score predictions against references (Dice, HD95, ASSD, NSD, volumes) with bootstrap CIs",
        description="Match prediction and reference files by name, check that each pair shares its voxel grid, "
        "compute per-case, per-class metrics and write per_case.csv and summary.json.",
    )
    p.add_argument("--pred", required=True, help="folder of predicted label maps")
    p.add_argument("--ref", required=True, help="folder of reference label maps (same file names)")
    p.add_argument("--labels", nargs="+", type=_label_arg, metavar="INT[=NAME]",
                   help="classes to score (default: dataset.json beside --ref, else every nonzero value found)")
    p.add_argument("--regions", metavar="DATASET_JSON",
                   help="score regions instead of classes: the regions this dataset.json defines (labels given as "
                        "lists of values, or labels_as_regions_for_evaluation); each region is the union of its "
                        "values in prediction and reference (default: the regions of a dataset.json beside --ref)")
    p.add_argument("-o", "--out", help="output folder for per_case.csv and summary.json (default: --pred)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                   help="tolerance of the normalised surface Dice in mm (default 1.0)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score only the predicted cases when some references have no prediction")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--ignore-label", type=int, metavar="INT",
                   help="reference value of unlabelled voxels, left out of every metric (default: the ignore label "
                        "of a dataset.json beside --ref, if any)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``medseg evaluate``; returns the exit code."""
    from medseg.errors import ConfigError
    from medseg.evaluation import evaluate_folder, format_summary_table, write_evaluation

    if args.nsd_tolerance < 0:
        raise ConfigError("--nsd-tolerance", args.nsd_tolerance, "a distance in mm >= 0")
    if args.workers < 1:
        raise ConfigError("--workers", args.workers, "an integer >= 1")
    if args.bootstrap < 1:
        raise ConfigError("--bootstrap", args.bootstrap, "an integer >= 1")
    labels, regions = None, None
    if args.regions:
        from medseg.data.regions import read_regions

        if args.labels:
            raise ConfigError("--regions", args.regions, "either --labels or --regions, not both")
        regions = read_regions(args.regions)
    if args.labels:
        labels = {v: (n or str(v)) for v, n in args.labels}
    result = evaluate_folder(args.pred, args.ref, labels, nsd_tolerance_mm=args.nsd_tolerance,
                             allow_missing=args.allow_missing, workers=args.workers, n_boot=args.bootstrap,
                             seed=args.seed, ignore=args.ignore_label, regions=regions)
    csv_path, json_path = write_evaluation(result, args.out or args.pred)
    size = "volume" if result.summary.get("spatial_dims", 3) == 3 else "area"
    print(f"{len(result.per_case)} case(s); mean ± sd [95% CI of the mean] n=finite values; "
          f"NSD at {args.nsd_tolerance:g} mm; {size} and other metrics in {csv_path.name}")
    print(format_summary_table(result.summary))
    if result.missing:
        print(f"not scored (no prediction): {len(result.missing)} case(s)")
    print(f"wrote {csv_path} and {json_path}")
    return 0
