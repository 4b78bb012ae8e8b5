"""`medseg evaluate` (placeholder until its issue lands: replace this module wholesale)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="(not yet available)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise NotImplementedError("medseg evaluate is not implemented yet")
