"""Paired comparison of two models' per-case metrics: "is model B better than model A?".

For every class and metric, cases scored by both models are paired. Reported: the number of pairs, both means,
the mean difference B - A with a percentile-bootstrap CI, the two-sided paired Wilcoxon signed-rank p-value
(the main test: no normality assumption), the paired t-test p-value, and the Wilcoxon p-value Holm-adjusted
over the classes of each metric (one family of tests per metric: "is B better on Dice?" asked for every class). Pairs where either value is
NaN (undefined) or infinite (one mask empty) are left out of the tests and counted in ``n_excluded``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.evaluation.summary import bootstrap_ci
from medseg.io.atomic import atomic_path
from medseg.metrics import HIGHER_IS_BETTER

__all__ = ["compare_per_case", "holm", "write_comparison_csv", "paired_plot", "format_comparison_table",
           "DEFAULT_COMPARE_METRICS"]

log = logging.getLogger(__name__)

PerCase = Mapping[str, Mapping[int, Mapping[str, float]]]

#: Metrics compared by default (those with a direction: higher or lower is better).
DEFAULT_COMPARE_METRICS = ("dice", "iou", "precision", "recall", "hd95_mm", "assd_mm", "nsd")


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN and do not count as tests).

    Args:
        pvalues: raw p-values.

    Returns:
        Adjusted p-values, same order, capped at 1.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def _paired_tests(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Wilcoxon p, t-test p) for paired samples; 1.0 when all differences are 0, NaN when undefined."""
    from scipy import stats

    d = b - a
    if d.size == 0:
        return math.nan, math.nan
    if np.all(d == 0):
        return 1.0, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p_w = float(stats.wilcoxon(a, b).pvalue) if d.size >= 2 else math.nan
        except ValueError:
            p_w = math.nan
        p_t = float(stats.ttest_rel(b, a).pvalue) if d.size >= 2 and np.std(d) > 0 else math.nan
    return p_w, p_t


def compare_per_case(
    a: PerCase,
    b: PerCase,
    *,
    metrics: Sequence[str] | None = None,
    label_names: Mapping[int, str] | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Compare two models' ``{case: {label: {metric: value}}}`` tables, paired by case and class.

    Args:
        a: per-case metrics of model A (the baseline).
        b: per-case metrics of model B.
        metrics: metrics to compare; default: those of :data:`DEFAULT_COMPARE_METRICS` present in both.
        label_names: optional ``{label: name}``.
        alpha: significance level of the verdict (on Holm-adjusted Wilcoxon p-values).
        n_boot: bootstrap resamples for the CI of the mean difference; seed: their seed.

    Returns:
        One dict per (class, metric): ``label, name, metric, higher_is_better, n, n_excluded, mean_a, mean_b,
        mean_diff, ci_low, ci_high, p_wilcoxon, p_ttest, p_wilcoxon_holm, verdict`` where the difference is
        B - A and ``verdict`` is ``"B better"``, ``"A better"`` or ``"no significant difference"``.

    Raises:
        ValueError: the tables share no case, or a requested metric is in neither table.
    """
    cases = sorted(set(a) & set(b))
    if not cases:
        raise ValueError("the two tables have no case in common")
    only = sorted(set(a) ^ set(b))
    if only:
        log.warning("%d case(s) are in only one table and are not compared: %s", len(only), ", ".join(only[:5]))
    labels = sorted({k for c in cases for k in a[c]} & {k for c in cases for k in b[c]})
    avail = {m for c in cases for k in a[c] for m in a[c][k]} & {m for c in cases for k in b[c] for m in b[c][k]}
    if metrics is None:
        metrics = [m for m in DEFAULT_COMPARE_METRICS if m in avail]
    else:
        bad = [m for m in metrics if m not in avail]
        if bad:
            raise ValueError(f"metric(s) {', '.join(bad)} not in both tables (available: {', '.join(sorted(avail))})")
    rows: list[dict[str, Any]] = []
    for li, label in enumerate(labels):
        for mi, metric in enumerate(metrics):
            va = np.array([a[c].get(label, {}).get(metric, math.nan) for c in cases], dtype=np.float64)
            vb = np.array([b[c].get(label, {}).get(metric, math.nan) for c in cases], dtype=np.float64)
            ok = np.isfinite(va) & np.isfinite(vb)
            pa, pb = va[ok], vb[ok]
            p_w, p_t = _paired_tests(pa, pb)
            rng = np.random.default_rng(np.random.SeedSequence([seed, li, mi]))
            lo, hi = bootstrap_ci(pb - pa, n_boot=n_boot, rng=rng)
            rows.append({
                "label": label, "name": (label_names or {}).get(label, str(label)), "metric": metric,
                "higher_is_better": HIGHER_IS_BETTER.get(metric), "n": int(ok.sum()),
                "n_excluded": int((~ok).sum()),
                "mean_a": float(pa.mean()) if pa.size else math.nan,
                "mean_b": float(pb.mean()) if pb.size else math.nan,
                "mean_diff": float((pb - pa).mean()) if pa.size else math.nan,
                "ci_low": lo, "ci_high": hi, "p_wilcoxon": p_w, "p_ttest": p_t,
            })
    for metric in metrics:  # one family of tests per metric: its classes
        family = [r for r in rows if r["metric"] == metric]
        for r, p in zip(family, holm([r["p_wilcoxon"] for r in family])):
            r["p_wilcoxon_holm"] = p
    for r in rows:
        p = r["p_wilcoxon_holm"]
        hib = r["higher_is_better"]
        if hib is None or math.isnan(p) or p >= alpha or r["mean_diff"] == 0:
            r["verdict"] = "no significant difference"
        else:
            r["verdict"] = "B better" if (r["mean_diff"] > 0) == hib else "A better"
    return rows


def write_comparison_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write :func:`compare_per_case` rows as CSV (atomically); returns the path."""
    import csv

    path = Path(path)
    cols = list(rows[0]) if rows else []
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return path


def paired_plot(
    a: PerCase,
    b: PerCase,
    path: str | Path,
    *,
    metrics: Sequence[str] = ("dice", "hd95_mm", "nsd"),
    names: tuple[str, str] = ("A", "B"),
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Paired plot: one line per case from A's value to B's, per class (rows) and metric (columns).

    Lines are green where B is better, red where worse (by the metric's direction), grey when equal; the
    black line joins the means. Non-finite pairs are left out. Written atomically as PNG.

    Args:
        a: per-case metrics of A; b: of B.
        path: output ``.png``.
        metrics: metrics to plot (those missing from the tables are skipped).
        names: axis labels of the two models.
        label_names: optional class names.

    Returns:
        The path written.

    Raises:
        ValueError: no case in common.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted(set(a) & set(b))
    if not cases:
        raise ValueError("the two tables have no case in common")
    labels = sorted({k for c in cases for k in a[c]} & {k for c in cases for k in b[c]})
    metrics = [m for m in metrics if any(m in a[c].get(k, {}) for c in cases for k in labels)]
    fig, axes = plt.subplots(len(labels), max(1, len(metrics)), figsize=(3.2 * max(1, len(metrics)),
                             2.8 * len(labels)), squeeze=False)
    for i, label in enumerate(labels):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            va = np.array([a[c].get(label, {}).get(metric, math.nan) for c in cases], dtype=float)
            vb = np.array([b[c].get(label, {}).get(metric, math.nan) for c in cases], dtype=float)
            ok = np.isfinite(va) & np.isfinite(vb)
            hib = HIGHER_IS_BETTER.get(metric)
            for x0, x1 in zip(va[ok], vb[ok]):
                better = (x1 > x0) if hib else (x1 < x0)
                color = "0.6" if x0 == x1 else ("tab:green" if better else "tab:red")
                ax.plot([0, 1], [x0, x1], color=color, alpha=0.6, lw=1, marker="o", ms=2.5)
            if ok.any():
                ax.plot([0, 1], [va[ok].mean(), vb[ok].mean()], color="black", lw=2.5, marker="D", ms=6)
            ax.set_xticks([0, 1], list(names))
            ax.set_xlim(-0.3, 1.3)
            name = (label_names or {}).get(label, str(label))
            ax.set_title(f"{name}: {metric} (n={int(ok.sum())})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _f(v: float, d: int = 3) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{d}f}"


def _p(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else (f"{v:.2e}" if v < 1e-3 else f"{v:.4f}")


def format_comparison_table(rows: Sequence[Mapping[str, Any]], names: tuple[str, str] = ("A", "B")) -> str:
    """Plain-text table of :func:`compare_per_case` rows.

    Args:
        rows: comparison rows.
        names: the two models' names for the header.

    Returns:
        The table as one string.
    """
    head = ["class", "metric", "n", f"mean {names[0]}", f"mean {names[1]}", "diff B-A [95% CI]", "p Wilcoxon",
            "p t-test", "p Holm", "verdict"]
    table = [head]
    for r in rows:
        table.append([f"{r['label']} {r['name']}", r["metric"], str(r["n"]), _f(r["mean_a"]), _f(r["mean_b"]),
                      f"{_f(r['mean_diff'])} [{_f(r['ci_low'])}, {_f(r['ci_high'])}]", _p(r["p_wilcoxon"]),
                      _p(r["p_ttest"]), _p(r["p_wilcoxon_holm"]), r["verdict"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

