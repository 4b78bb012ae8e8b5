"""`medseg preprocess DATASET --plan plan.json`: write the plan-space cache the trainer reads."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``preprocess`` subcommand."""
    p = subparsers.add_parser(
        "preprocess", help="resample and normalise every case once into a memory-mappable cache",
        description="Preprocess DATASET with a plan into CACHE/<plan hash>/<configuration>/ (.npy arrays and "
                    "per-case JSON); cases already there are reused.")
    p.add_argument("dataset", help="data set folder (MSD / nnU-Net layout) or manifest CSV")
    p.add_argument("--plan", required=True, help="plan.json written by `medseg plan`")
    p.add_argument("-c", "--configuration", action="append", default=None,
                   help="configuration(s) to preprocess (repeatable; default: all in the plan)")
    p.add_argument("--cache", default="preprocessed", help="cache root folder (default: ./preprocessed)")
    p.add_argument("-j", "--workers", type=int, default=1, help="worker processes (default: 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Preprocess each requested configuration and print where its cache is."""
    from medseg.data.loader import preprocess_dataset
    from medseg.data.manifest import load_manifest
    from medseg.errors import ConfigError
    from medseg.planning import load_plan

    if args.workers < 1:
        raise ConfigError("--workers", args.workers, "at least 1")
    plan = load_plan(args.plan)
    names = args.configuration or list(plan.configurations)
    for n in names:
        plan.configuration(n)  # an unknown name fails with the valid ones
    manifest = load_manifest(args.dataset)
    for n in names:
        out = preprocess_dataset(manifest, plan, n, args.cache, num_workers=args.workers)
        print(f"{n}: {len(manifest.cases)} cases in {out}")
    return 0
