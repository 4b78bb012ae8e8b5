"""`medseg install-model model.zip`: verify and unpack a package into the models folder (then `-m NAME`)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the ``install-model`` subcommand."""
    p = subparsers.add_parser(
        "install-model", help="verify and unpack model.zip into the models folder so that `-m NAME` finds it",
        description="Check every entry of a package (relative paths only, no symlinks, sizes within the limit, "
                    "SHA-256 against its manifest) and unpack it into $MEDSEG_MODELS/NAME (default "
                    "~/.local/share/medseg/models/NAME). A refused package writes nothing.")
    p.add_argument("package", metavar="ZIP", help="a package written by `medseg export-model`")
    p.add_argument("--models-dir", metavar="DIR", help="models folder (default: $MEDSEG_MODELS or ~/.local/share/medseg/models)")
    p.add_argument("--force", action="store_true", help="replace an installed model of the same name")
    p.add_argument("--size-limit-mb", type=float, default=4096, help="largest unpacked size accepted")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``medseg install-model``."""
    from medseg.deploy.package import install_package

    path = install_package(args.package, root=args.models_dir, force=args.force,
                           size_limit=int(args.size_limit_mb * 2**20))
    print(f"medseg install-model: installed {path.name} in {path.parent} (use `medseg predict -m {path.name}`)")
    return 0
