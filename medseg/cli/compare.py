"""`medseg compare`: paired statistics of two models' per_case.csv tables (is model B better than A?)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    """Add the ``compare`` subcommand."""
    p = subparsers.add_parser(
        "compare",
        help="paired Wilcoxon / t-test and bootstrap CI of the difference between two per_case.csv tables",
        description="Pair two models' per_case.csv tables (from `medseg evaluate`) by case and class; for each "
        "class and metric report the mean difference B - A with a bootstrap CI, the paired Wilcoxon signed-rank "
        "and t-test p-values, Holm-adjusted p-values, and draw a paired plot.",
    )
    p.add_argument("a", help="per_case.csv of model A (baseline)")
    p.add_argument("b", help="per_case.csv of model B")
    p.add_argument("-o", "--out", default=".",
                   help="output folder for comparison.csv, comparison.json and comparison.png (default: .)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="names of the models (default: their folders)")
    p.add_argument("--metrics", nargs="+", help="metrics to compare (default: dice iou precision recall hd95_mm "
                   "assd_mm nsd)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdict (default 0.05)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``medseg compare``; returns the exit code."""
    import json

    from medseg.errors import ConfigError, InputError
    from medseg.evaluation import json_safe, read_per_case_csv
    from medseg.evaluation.compare import (
        compare_per_case,
        format_comparison_table,
        paired_plot,
        write_comparison_csv,
    )
    from medseg.io.atomic import atomic_path

    if not 0 < args.alpha < 1:
        raise ConfigError("--alpha", args.alpha, "a level between 0 and 1")
    if args.bootstrap < 1:
        raise ConfigError("--bootstrap", args.bootstrap, "an integer >= 1")
    a, names_a = read_per_case_csv(args.a)
    b, names_b = read_per_case_csv(args.b)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise InputError(args.b, f"shares no case with {args.a}", "two evaluations of the same cases")
    names = tuple(args.names) if args.names else (Path(args.a).resolve().parent.name or "A",
                                                   Path(args.b).resolve().parent.name or "B")
    if names[0] == names[1]:
        names = ("A", "B")
    try:
        rows = compare_per_case(a, b, metrics=args.metrics, label_names={**names_b, **names_a}, alpha=args.alpha,
                                n_boot=args.bootstrap, seed=args.seed)
    except ValueError as exc:
        raise ConfigError("--metrics", args.metrics, str(exc)) from None
    if not rows:
        raise InputError(args.b, f"has no class in common with {args.a}", "two evaluations of the same classes")
    out = Path(args.out)
    csv_path = write_comparison_csv(rows, out / "comparison.csv")
    json_path = out / "comparison.json"
    record = {"version": 1, "a": str(args.a), "b": str(args.b), "names": list(names), "n_cases": len(shared),
              "only_in_one": sorted(set(a) ^ set(b)), "alpha": args.alpha, "difference": "B - A",
              "verdict_rule": "two-sided Wilcoxon signed-rank p, Holm-adjusted over the classes of each metric, < alpha; direction by metric",
              "rows": rows}
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n")
    plot_metrics = [m for m in ("dice", "hd95_mm", "nsd") if not args.metrics or m in args.metrics]
    png = paired_plot(a, b, out / "comparison.png", metrics=plot_metrics or args.metrics, names=names,
                      label_names={**names_b, **names_a})
    print(f"A = {names[0]} ({args.a}), B = {names[1]} ({args.b}); {len(shared)} paired case(s)"
          + (f", {len(record['only_in_one'])} in only one table (left out)" if record["only_in_one"] else ""))
    print(format_comparison_table(rows, names))
    print(f"verdict: Wilcoxon p Holm-adjusted over classes < {args.alpha:g}; wrote {csv_path}, {json_path} and {png}")
    return 0
