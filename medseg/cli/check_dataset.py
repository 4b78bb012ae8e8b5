"""`medseg check-dataset` (placeholder until its issue lands: replace this module wholesale)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("check-dataset", help="(not yet available)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise NotImplementedError("medseg check-dataset is not implemented yet")
