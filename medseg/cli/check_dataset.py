"""`medseg check-dataset DIR`: check that every case of a data set is readable and consistent."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    """Add the ``check-dataset`` subcommand."""
    p = subparsers.add_parser(
        "check-dataset",
        help="check every case of a data set (readable, paired, one grid, declared labels, finite values)",
        description="Read every case of a data set (MSD, nnU-Net v2 raw, images/+labels/, or CSV manifest) and "
        "print one line per problem: the file, what is wrong, what would be right. Exit code 1 when there are "
        "errors (warnings such as empty labels do not fail). A label may be a DICOM-SEG or RTSTRUCT file: its "
        "segment/ROI names are matched to the declared label names (case-insensitive, plus the aliases of "
        "--config), and a declared label the file does not name is an error.",
    )
    p.add_argument("dataset", help="data set folder or CSV manifest")
    p.add_argument("--patient-regex", default=None,
                   help="regular expression on image file names whose first group is the patient id")
    p.add_argument("--file-ending", default=None, help="image file ending, e.g. .png (default: detected)")
    p.add_argument("--tolerance", type=float, default=1e-3, metavar="MM",
                   help="tolerance in mm for comparing spacings and affines (default 1e-3)")
    p.add_argument("-j", "--workers", type=int, default=1, help="cases read in parallel (default 1)")
    p.add_argument("--config", metavar="PIPELINE_YAML",
                   help="pipeline YAML whose label_aliases map the segment/ROI names of DICOM-SEG/RTSTRUCT labels")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the data set; print problems and a summary; return 1 when there are errors."""
    from tqdm import tqdm

    from medseg.data.checks import check_dataset
    from medseg.data.manifest import load_manifest

    aliases = None
    if args.config:
        from medseg.training.config import load_pipeline

        aliases = load_pipeline(args.config).label_aliases
    manifest = load_manifest(args.dataset, patient_regex=args.patient_regex, file_ending=args.file_ending,
                             label_aliases=aliases)

    def progress(it):
        return tqdm(it, total=len(manifest.cases), desc="checking", unit="case", file=sys.stderr,
                    disable=not sys.stderr.isatty(), leave=False)

    report = check_dataset(manifest, atol=args.tolerance, workers=max(1, args.workers), progress=progress)
    for problem in report.problems:
        print(f"{problem.severity}: {problem}")
    for line in report.summary_lines():
        print(line)
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1
