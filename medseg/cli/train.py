"""`medseg train` (placeholder until its issue lands: replace this module wholesale)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="(not yet available)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise NotImplementedError("medseg train is not implemented yet")
