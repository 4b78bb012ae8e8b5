"""`medseg demo-data OUT`: write the built-in synthetic 3D demo data set (MSD layout plus manifest.csv)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``demo-data`` subcommand."""
    p = subparsers.add_parser(
        "demo-data",
        help="write the synthetic 3D demo data set (MSD layout + manifest.csv)",
        description="Write small synthetic MR-like volumes with two labelled structures, noise, a bias field and "
        "oblique anisotropic affines, in MSD layout plus a manifest.csv in which some cases share a patient. "
        "Deterministic from --seed.",
    )
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("-n", "--cases", type=int, default=12, help="number of cases (default 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite the demo's files in a non-empty folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the demo data set and print where it went."""
    from medseg.data.demo import make_demo_dataset
    from medseg.errors import ConfigError

    if args.cases < 1:
        raise ConfigError("--cases", args.cases, "at least 1")
    out = make_demo_dataset(args.out, n_cases=args.cases, seed=args.seed, force=args.force)
    print(f"wrote {args.cases} demo cases to {out} (MSD layout: dataset.json, imagesTr/, labelsTr/, manifest.csv)")
    return 0
