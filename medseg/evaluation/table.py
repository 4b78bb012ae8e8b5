"""The ``per_case.csv`` table: one row per (case, class), one column per metric.

Columns: ``case, label, name, <metric>...``. Undefined values are written ``nan`` and infinite distances
``inf`` (Python's ``float()`` reads both back).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

from medseg.errors import InputError
from medseg.io.atomic import atomic_path

__all__ = ["write_per_case_csv", "read_per_case_csv", "PER_CASE_FIXED_COLUMNS"]

PER_CASE_FIXED_COLUMNS = ("case", "label", "name")


def _cell(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(float(v))


def write_per_case_csv(
    per_case: Mapping[str, Mapping[int, Mapping[str, float]]],
    path: str | Path,
    *,
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Write ``{case_id: {label: {metric: value}}}`` as ``per_case.csv`` (atomically).

    Args:
        per_case: results of :func:`medseg.metrics.compute_metrics` by case.
        path: output CSV path.
        label_names: optional ``{label: name}``.

    Returns:
        The path written.
    """
    metrics: list[str] = []
    for res in per_case.values():
        for m in res.values():
            metrics.extend(k for k in m if k not in metrics)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*PER_CASE_FIXED_COLUMNS, *metrics])
        for case in sorted(per_case):
            for label in sorted(per_case[case]):
                vals = per_case[case][label]
                name = (label_names or {}).get(label, str(label))
                w.writerow([case, label, name, *(_cell(float(vals.get(m, math.nan))) for m in metrics)])
    return path


def read_per_case_csv(path: str | Path) -> tuple[dict[str, dict[int, dict[str, float]]], dict[int, str]]:
    """Read a ``per_case.csv`` back.

    Args:
        path: the CSV file.

    Returns:
        ``(per_case, label_names)`` with ``per_case = {case_id: {label: {metric: value}}}``.

    Raises:
        InputError: missing file, missing columns, or values that are not numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist", "a per_case.csv written by `medseg evaluate`")
    per_case: dict[str, dict[int, dict[str, float]]] = {}
    names: dict[int, str] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in PER_CASE_FIXED_COLUMNS if c not in cols]
        if missing:
            raise InputError(path, f"has no column(s) {', '.join(missing)} (columns: {', '.join(cols) or 'none'})",
                             "a per_case.csv written by `medseg evaluate` (case,label,name,<metrics>)")
        metrics = [c for c in cols if c not in PER_CASE_FIXED_COLUMNS]
        for lineno, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
                values = {m: float(row[m]) for m in metrics}
            except (TypeError, ValueError):
                raise InputError(path, f"line {lineno} has a label or metric value that is not a number",
                                 "integer labels and numeric metric values (nan/inf allowed)") from None
            per_case.setdefault(row["case"], {})[label] = values
            names[label] = row["name"]
    if not per_case:
        raise InputError(path, "has no data rows", "one row per case and class")
    return per_case, names
