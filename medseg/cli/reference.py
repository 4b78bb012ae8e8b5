"""Generate the CLI reference (docs/cli.md) from the argument parser, so the docs cannot drift from the code.

Usage: ``python -m medseg.cli.reference > docs/cli.md`` (a test compares the file with this output).
"""

from __future__ import annotations

import argparse
import io
import sys


def cli_reference() -> str:
    """Markdown text: ``medseg --help`` and each subcommand's ``--help``, in the parser's order."""
    from medseg.cli.main import build_parser

    parser = build_parser()
    out = io.StringIO()
    out.write("# CLI reference\n\n")
    out.write("Generated from the argument parser by `python -m medseg.cli.reference > docs/cli.md`; ")
    out.write("`tests/test_docs.py` fails when this file is out of date.\n\n")
    out.write("```text\n" + _help(parser) + "```\n")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        out.write(f"\n## medseg {name}\n\n```text\n{_help(subparser)}```\n")
    return out.getvalue()


def _help(parser: argparse.ArgumentParser) -> str:
    # a fixed width so that the output does not depend on the terminal
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        text = parser.format_help()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return text if text.endswith("\n") else text + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(cli_reference())
