"""Summaries of per-case metrics: mean, median, sd, bootstrap 95% CI and counts per class and metric.

:func:`summarize_metrics` works on the in-memory results of :func:`medseg.metrics.compute_metrics` (the trainer
calls it for ``crossval_summary.json``); it reads no files. NaN values (metric undefined for a case, e.g. Dice
when the class is absent from both masks) are left out and counted in ``n_nan``; infinite distances (one mask
empty) are left out of the statistics and counted in ``n_inf``, so a reader sees both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["describe", "bootstrap_ci", "summarize_metrics", "format_summary_table", "json_safe"]

PerCase = Mapping[str, Mapping[int, Mapping[str, float]]]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    Args:
        values: finite values (one per case).
        n_boot: number of bootstrap resamples.
        ci: coverage, e.g. 0.95.
        rng: a NumPy generator or a seed (resamples are reproducible from it).

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values, ``(x, x)`` for one value.

    Raises:
        ValueError: ``ci`` not in (0, 1) or ``n_boot`` < 1.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), float(x[0])
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)  # bound memory for large n
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = gen.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def describe(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> dict[str, Any]:
    """Statistics of one metric over cases.

    Args:
        values: one value per case; NaN and inf allowed (left out and counted).
        n_boot: bootstrap resamples for the CI of the mean.
        ci: CI coverage.
        rng: generator or seed for the bootstrap.

    Returns:
        ``{"mean", "median", "sd", "ci_low", "ci_high", "n", "n_nan", "n_inf"}``; ``n`` counts the finite values
        the statistics use; statistics are NaN when ``n`` is 0 (``sd`` also when ``n`` is 1).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    nan = np.isnan(x)
    inf = np.isinf(x)
    finite = x[~nan & ~inf]
    n = int(finite.size)
    lo, hi = bootstrap_ci(finite, n_boot=n_boot, ci=ci, rng=rng)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "median": float(np.median(finite)) if n else math.nan,
        "sd": float(finite.std(ddof=1)) if n > 1 else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "n": n,
        "n_nan": int(nan.sum()),
        "n_inf": int(inf.sum()),
    }


def summarize_metrics(
    per_case: PerCase,
    *,
    label_names: Mapping[int, str] | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Summarise ``{case_id: compute_metrics(...)}`` per class and metric.

    Args:
        per_case: ``{case_id: {label: {metric: value}}}``.
        label_names: optional ``{label: name}`` for the output.
        n_boot: bootstrap resamples; ci: CI coverage; seed: bootstrap seed (each class/metric gets its own
            stream derived from it, so results do not depend on the order of the table).

    Returns:
        ``{"n_cases", "ci", "n_boot", "seed", "classes": {label(str): {"name", "metrics": {metric: describe()}}},
        "foreground_mean": {metric: mean over classes of the class means}}``. Label 0 is left out of the
        foreground mean. Values may be NaN: pass the result through :func:`json_safe` before ``json.dump``.
    """
    labels: list[int] = sorted({int(k) for res in per_case.values() for k in res})
    metrics: list[str] = []
    for res in per_case.values():
        for m in res.values():
            metrics.extend(k for k in m if k not in metrics)
    classes: dict[str, Any] = {}
    for li, label in enumerate(labels):
        entry: dict[str, Any] = {"name": (label_names or {}).get(label, str(label)), "metrics": {}}
        for mi, metric in enumerate(metrics):
            vals = [float(res[label].get(metric, math.nan)) for res in per_case.values() if label in res]
            rng = np.random.default_rng(np.random.SeedSequence([seed, li, mi]))
            entry["metrics"][metric] = describe(vals, n_boot=n_boot, ci=ci, rng=rng)
        classes[str(label)] = entry
    foreground: dict[str, float] = {}
    for metric in metrics:
        means = [c["metrics"][metric]["mean"] for k, c in classes.items() if k != "0"]
        means = [m for m in means if not math.isnan(m)]
        foreground[metric] = float(np.mean(means)) if means else math.nan
    return {"n_cases": len(per_case), "ci": ci, "n_boot": n_boot, "seed": seed, "classes": classes,
            "foreground_mean": foreground}


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf floats by None (JSON null) recursively, so ``json.dump(allow_nan=False)`` works."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def format_summary_table(summary: Mapping[str, Any], metrics: Sequence[str] = ("dice", "hd95_mm", "assd_mm",
                                                                               "nsd")) -> str:
    """A plain-text table of a :func:`summarize_metrics` result: mean ± sd [CI] (n) per class and metric.

    Args:
        summary: output of :func:`summarize_metrics` (or the same loaded from ``summary.json``).
        metrics: the metrics to show, in column order.

    Returns:
        The table as one string (lines joined by newlines).
    """
    digits = {"dice": 3, "iou": 3, "nsd": 3, "precision": 3, "recall": 3, "accuracy": 4}
    header = ["class"] + list(metrics)
    rows = [header]
    for label, entry in summary["classes"].items():
        row = [f"{label} {entry['name']}"]
        for metric in metrics:
            s = entry["metrics"].get(metric)
            if s is None:
                row.append("n/a")
                continue
            d = digits.get(metric, 2)
            cell = (f"{_fmt(s['mean'], d)} ± {_fmt(s['sd'], d)} "
                    f"[{_fmt(s['ci_low'], d)}, {_fmt(s['ci_high'], d)}] n={s['n']}")
            if s.get("n_inf"):
                cell += f" inf={s['n_inf']}"
            row.append(cell)
        rows.append(row)
    fg = summary.get("foreground_mean") or {}
    rows.append(["foreground mean"] + [_fmt(fg.get(m), digits.get(m, 2)) for m in metrics])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
