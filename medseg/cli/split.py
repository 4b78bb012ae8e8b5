"""`medseg split DATASET -k 5 --seed S -o splits.json`: patient-grouped, class-stratified k-fold splits."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``split`` subcommand."""
    p = subparsers.add_parser(
        "split",
        help="patient-grouped k-fold splits (nnU-Net splits_final.json shape)",
        description="Make k folds that never put one patient in two folds, stratified by which label classes the "
        "cases contain and balanced in size; an existing output file is checked and reused, never re-split.",
    )
    p.add_argument("dataset", help="data set folder or CSV manifest")
    p.add_argument("-k", "--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("-o", "--output", default="splits.json", help="split file to write or reuse (default splits.json)")
    p.add_argument("--patient-regex", default=None,
                   help="regular expression on image file names whose first group is the patient id, "
                   "e.g. '^(\\d+)_' for HC18")
    p.add_argument("--file-ending", default=None, help="image file ending, e.g. .png (default: detected)")
    p.add_argument("--no-stratify", action="store_true", help="do not read labels to stratify by class")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Make or reuse the split file and print one line per fold."""
    from pathlib import Path

    from medseg.data.manifest import load_manifest
    from medseg.data.splits import load_or_create_splits

    manifest = load_manifest(args.dataset, patient_regex=args.patient_regex, file_ending=args.file_ending)
    existed = Path(args.output).exists()
    splits = load_or_create_splits(args.output, manifest, args.folds, args.seed, stratify=not args.no_stratify)
    print(f"{'reused' if existed else 'wrote'} {args.output}: {len(splits)} folds, {len(manifest.cases)} cases of "
          f"{len(manifest.patients())} patients, no patient in two folds")
    patient_of = {c.case_id: c.patient_id for c in manifest.cases}
    print(f"{'fold':>4} {'train':>6} {'val':>5} {'val patients':>12}")
    for i, fold in enumerate(splits):
        n_pat = len({patient_of[c] for c in fold["val"]})
        print(f"{i:>4} {len(fold['train']):>6} {len(fold['val']):>5} {n_pat:>12}")
    return 0
