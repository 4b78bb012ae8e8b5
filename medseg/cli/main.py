"""Entry point of the ``medseg`` command.

Each subcommand lives in ``medseg/cli/<module>.py`` and defines ``register(subparsers)``, which adds its parser
and sets ``func=run`` (``run(args) -> int``). Subcommand modules import only argparse-level things at the top;
torch, MONAI and friends are imported inside ``run`` so that ``medseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medseg import __version__

#: Subcommand modules, in the order ``medseg --help`` lists them (the data path: read -> ... -> evaluate).
COMMAND_MODULES = (
    "info",
    "convert",
    "check_dataset",
    "demo_data",
    "plan",
    "preprocess",
    "split",
    "train",
    "crossval",
    "predict",
    "export",
    "export_model",
    "install_model",
    "evaluate",
    "compare",
    "report",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to generate the CLI reference in the docs)."""
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="2D and 3D medical image segmentation: read, plan, train, predict, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"medseg.cli.{name}")
        module.register(sub)
    for command in sub.choices.values():
        command.add_argument("--max-voxels", type=_max_voxels, default=None, metavar="N",
                             help="refuse images (and their grids at a plan's spacing) of more than N voxel values, "
                                  "e.g. 2e9 or 500M (default: half the available memory at 16 bytes a voxel; "
                                  "pipeline YAML: max_voxels)")
    return parser


def _max_voxels(text: str) -> int:
    from medseg.errors import ConfigError
    from medseg.io.guard import parse_max_voxels

    try:
        return parse_max_voxels(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of voxels (e.g. 2e9 or 500M)") from None


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time of each record (not the one at setup),
    so that calling ``main()`` again under redirected or captured streams never writes to a closed one."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if verbose < 2 else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("medseg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure or user error, 2 usage error, 130 interrupted).

    Every failure ends in one line on stderr: a :class:`~medseg.errors.MedsegError` as it is, an ``OSError`` that no
    inner boundary caught as ``FILE: reason``, a ``MemoryError`` with what to lower, and anything else as an internal
    error (its traceback only with ``-vv``).
    """
    from medseg.errors import MedsegError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    import os

    from medseg.io.guard import ENV_VAR, set_max_voxels

    saved_limit = os.environ.get(ENV_VAR)
    try:
        if getattr(args, "max_voxels", None) is not None:
            set_max_voxels(args.max_voxels)
        return int(args.func(args) or 0)
    except MedsegError as exc:
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"medseg {args.command}: error: ran out of memory; lower --max-voxels (or the work per step, e.g. "
              "--batch-size) below the free memory", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `medseg info x | head`: the reader left; exit quietly like other Unix tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:  # a file-level failure no inner boundary turned into an InputError: still one line
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"medseg {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: one line, the traceback with -vv
        if args.verbose >= 2:
            raise
        text = " ".join(str(exc).split())[:300]
        print(f"medseg {args.command}: internal error: {type(exc).__name__}: {text} (a bug in medseg: rerun with -vv "
              "for the traceback and report it)", file=sys.stderr)
        return 1
    finally:
        if saved_limit is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved_limit


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
