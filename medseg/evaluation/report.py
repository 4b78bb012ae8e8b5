"""Self-contained HTML QA report for a prediction folder or a cross-validation run folder.

One HTML file, every figure embedded as a base64 PNG (it can be mailed or archived as it is). Content:
summary table (mean ± sd, bootstrap CI), metric distributions, training curves of every fold (run folders),
per-case overlay panels (image / reference / prediction, three orthogonal slices through the structure),
worst cases first, and the attention-gate maps of one case for networks that have attention gates.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.evaluation.evaluate import check_same_geometry, list_cases, read_label_names
from medseg.io.atomic import atomic_path

__all__ = ["build_report", "is_run_folder", "read_training_curves", "find_image", "worst_first"]

log = logging.getLogger(__name__)


@dataclass
class _Case:
    case_id: str
    pred: Path
    ref: Path | None
    fold: str | None
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)


def is_run_folder(path: str | Path) -> bool:
    """True for a training run folder (``model.json`` or ``fold_K/`` subfolders)."""
    p = Path(path)
    return (p / "model.json").is_file() or any(d.is_dir() for d in p.glob("fold_*"))


def read_training_curves(run_dir: str | Path) -> dict[str, list[dict[str, float]]]:
    """``{fold name: rows}`` from every ``fold_K/metrics.csv`` of a run (numeric columns only)."""
    curves: dict[str, list[dict[str, float]]] = {}
    for f in sorted(Path(run_dir).glob("fold_*/metrics.csv"), key=lambda p: _fold_key(p.parent.name)):
        rows = []
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                parsed = {}
                for k, v in row.items():
                    try:
                        parsed[k] = float(v)
                    except (TypeError, ValueError):
                        continue
                if "epoch" in parsed:
                    rows.append(parsed)
        if rows:
            curves[f.parent.name] = rows
    return curves


def _fold_key(name: str) -> tuple[int, str]:
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else 10**9, name)


def find_image(image_dir: str | Path | None, case_id: str) -> Path | None:
    """The image of ``case_id`` in ``image_dir``: ``<case>.<ext>`` or nnU-Net's ``<case>_0000.<ext>``."""
    if image_dir is None:
        return None
    cases = list_cases(image_dir)
    return cases.get(case_id) or cases.get(f"{case_id}_0000")


def worst_first(per_case: Mapping[str, Mapping[int, Mapping[str, float]]], metric: str = "dice") -> list[str]:
    """Case ids sorted by mean foreground ``metric`` over classes, lowest first; undefined (NaN) last."""
    def key(case: str) -> tuple[int, float, str]:
        vals = [m.get(metric, math.nan) for k, m in per_case[case].items() if k != 0]
        vals = [v for v in vals if not math.isnan(v)]
        return (0, float(np.mean(vals)), case) if vals else (1, 0.0, case)

    return sorted(per_case, key=key)


def _collect(target: Path, ref_dir: Path | None, nsd_tolerance_mm: float, n_boot: int
             ) -> tuple[list[_Case], dict[int, str], str]:
    """Cases with metrics, label names, and the mode ("run" or "predictions")."""
    from medseg.evaluation.evaluate import evaluate_folder
    from medseg.evaluation.table import read_per_case_csv

    run = is_run_folder(target)
    if run:
        pred_dirs = [(d.parent.name, d) for d in sorted(target.glob("fold_*/validation"),
                                                          key=lambda p: _fold_key(p.parent.name)) if d.is_dir()]
    else:
        if ref_dir is None:
            raise InputError(target, "is a prediction folder; the report needs the reference label maps",
                             "--ref REF_DIR (and --images IMAGE_DIR for the image panels)")
        pred_dirs = [(None, target)]
    cases: list[_Case] = []
    names: dict[int, str] = {}
    model = _read_json(target / "model.json") if run else {}
    if isinstance(model.get("labels"), Mapping):
        names = {int(k): str(v) for k, v in model["labels"].items() if str(k).lstrip("-").isdigit()}
    if ref_dir is not None and not names:
        names = read_label_names(ref_dir) or {}
    labels = sorted(k for k in names if k != 0) or None
    for fold, pdir in pred_dirs:
        if ref_dir is not None:
            ev = evaluate_folder(pdir, ref_dir, {k: names.get(k, str(k)) for k in labels} if labels else None,
                                 nsd_tolerance_mm=nsd_tolerance_mm, allow_missing=True, n_boot=10)
            names = {**ev.label_names, **names}
            for cid, (p, r) in ev.pairs.items():
                cases.append(_Case(cid, p, r, fold, ev.per_case[cid]))
        else:
            table = pdir.parent / "per_case.csv"
            per_case, tnames = read_per_case_csv(table) if table.is_file() else ({}, {})
            names = {**tnames, **names}
            for cid, p in list_cases(pdir).items():
                cases.append(_Case(cid, p, None, fold, dict(per_case.get(cid, {}))))
    names = {k: v for k, v in names.items() if k != 0}
    return cases, names, "run" if run else "predictions"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _attention_section(target: Path, cases: list[_Case], image_dir: Path | None, case_id: str | None) -> str:
    """HTML for the attention-gate maps of one case (default: the worst), or a sentence saying why there are none."""
    from medseg.evaluation.attention import attention_maps_png

    if not cases:
        return "<p class='note'>No cases.</p>"
    chosen = next((c for c in cases if c.case_id == case_id), None) if case_id else cases[0]
    if chosen is None:
        raise InputError(target, f"has no prediction for the attention case {case_id!r}",
                         "--attention-case naming a validation case of the run")
    png, message = attention_maps_png(target, find_image(image_dir, chosen.case_id), chosen.fold, chosen.case_id)
    return (_img(png) if png is not None else "") + f"<p class='note'>{html.escape(message)}</p>"


def build_report(
    target: str | Path,
    *,
    ref_dir: str | Path | None = None,
    image_dir: str | Path | None = None,
    out_path: str | Path | None = None,
    max_cases: int = 12,
    nsd_tolerance_mm: float = 1.0,
    attention_case: str | None = None,
    n_boot: int = 2000,
) -> Path:
    """Write the HTML QA report of a prediction folder or a cross-validation run folder.

    Args:
        target: prediction folder (needs ``ref_dir``) or run folder (``fold_K/validation`` predictions and
            ``fold_K/metrics.csv`` curves; without ``ref_dir`` it uses ``fold_K/per_case.csv``).
        ref_dir: folder of reference label maps (file names as the predictions).
        image_dir: folder of images (``<case>`` or ``<case>_0000``); without it panels show labels only.
        out_path: output HTML file; default ``target/report.html``.
        max_cases: number of per-case panels (worst cases first).
        nsd_tolerance_mm: NSD tolerance.
        attention_case: case whose attention-gate maps to show (default: the worst case).
        n_boot: bootstrap resamples for the summary CIs.

    Returns:
        The path of the HTML file.

    Raises:
        InputError: missing folders or references, geometry mismatches, unreadable files.
    """
    from medseg.evaluation import figures
    from medseg.evaluation.summary import summarize_metrics
    from medseg.io import read_volume

    target = Path(target)
    if not target.is_dir():
        raise InputError(target, "is not a folder", "a prediction folder or a training run folder")
    ref = Path(ref_dir) if ref_dir is not None else None
    images = Path(image_dir) if image_dir is not None else None
    if images is not None and not images.is_dir():
        raise InputError(images, "is not a folder", "the folder of images for --images")
    cases, names, mode = _collect(target, ref, nsd_tolerance_mm, n_boot)
    if not cases:
        raise InputError(target, "holds no predictions", "label maps (or fold_K/validation/ folders of a run)")
    per_case = {c.case_id: c.metrics for c in cases if c.metrics}
    by_id = {c.case_id: c for c in cases}
    parts: list[str] = []
    summary = summarize_metrics(per_case, label_names=names, n_boot=n_boot) if per_case else None
    parts.append(_summary_html(summary, len(cases), mode, target, ref))
    if per_case:
        fig = figures.metric_distribution_figure(per_case, label_names=names)
        parts.append(_section("Metric distributions", _img(figures.figure_to_png_bytes(fig))))
    curves = read_training_curves(target) if mode == "run" else {}
    if mode == "run":
        body = (_img(figures.figure_to_png_bytes(figures.training_curves_figure(curves))) if curves
                else "<p class='note'>No fold_K/metrics.csv found in this run.</p>")
        parts.append(_section("Training curves", body))
    order = worst_first(per_case) + sorted(set(by_id) - set(per_case))
    panels = []
    for cid in order[:max_cases]:
        c = by_id[cid]
        pred = read_volume(c.pred)
        refv = read_volume(c.ref) if c.ref is not None else None
        if refv is not None:
            check_same_geometry(pred, refv, c.pred, c.ref)
        img_path = find_image(images, cid)
        img = read_volume(img_path) if img_path is not None else None
        if img is not None and not img.same_geometry(pred):
            raise InputError(img_path, f"is not on the voxel grid of its prediction {c.pred}",
                             "the image the prediction was made from (same shape and affine)")
        caption = _case_caption(c, names)
        fig = figures.overlay_figure(pred, refv, img, title=cid, label_names=names)
        panels.append(f"<figure class='case' id='case-{html.escape(cid)}'>{_img(figures.figure_to_png_bytes(fig))}"
                      f"<figcaption>{caption}</figcaption></figure>")
    note = "" if len(order) <= max_cases else f"<p class='note'>Showing the {max_cases} worst of {len(order)} cases " \
        "(by mean foreground Dice).</p>"
    if ref is None:
        note += "<p class='note'>No --ref given: panels show predictions only.</p>"
    if images is None:
        note += "<p class='note'>No --images given: panels show label maps without the image.</p>"
    parts.append(_section("Cases, worst first", note + "".join(panels)))
    if mode == "run":
        parts.append(_section("Attention gates", _attention_section(target, [by_id[c] for c in order], images,
                                                                    attention_case)))
    out = Path(out_path) if out_path is not None else target / "report.html"
    doc = _page(f"medseg report: {target.name}", "".join(parts))
    with atomic_path(out) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    log.debug("wrote %s (%d panels)", out, len(panels))
    return out


# ------------------------------------------------------------------------------------------------- HTML pieces
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
figure.case{display:inline-block;vertical-align:top;margin:8px;border:1px solid #ddd;padding:6px}
figure.case img{max-width:560px;display:block}figcaption{font-size:12px;max-width:560px}
img.plot{max-width:100%}.note{color:#666;font-size:13px}
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def _section(title: str, body: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return f"<section id='{slug}'><h2>{html.escape(title)}</h2>{body}</section>"


def _img(png: bytes) -> str:
    from medseg.evaluation.figures import png_data_uri

    return f"<img class='plot' alt='figure' src='{png_data_uri(png)}'>"


def _fmt(v: Any, d: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "inf" if isinstance(v, float) and math.isinf(v) else "–"
    return f"{v:.{d}f}"


def _summary_html(summary: dict | None, n_cases: int, mode: str, target: Path, ref: Path | None) -> str:
    src = "cross-validation run" if mode == "run" else "prediction folder"
    head = (f"<p>{html.escape(src)} <code>{html.escape(str(target))}</code>, {n_cases} case(s)"
            + (f"; references <code>{html.escape(str(ref))}</code>" if ref else "") + ".</p>")
    if summary is None:
        return _section("Summary", head + "<p class='note'>No metrics available (pass --ref).</p>")
    metrics = ("dice", "iou", "hd95_mm", "assd_mm", "nsd", "precision", "recall")
    rows = ["<tr><th>class</th>" + "".join(f"<th>{m}</th>" for m in metrics) + "</tr>"]
    for label, entry in summary["classes"].items():
        cells = []
        for m in metrics:
            s = entry["metrics"].get(m)
            if s is None:
                cells.append("<td>–</td>")
                continue
            d = 2 if m.endswith("_mm") else 3
            extra = f" ({s['n_inf']} inf)" if s["n_inf"] else ""
            cells.append(f"<td title='median {_fmt(s['median'], d)}, n={s['n']}'>{_fmt(s['mean'], d)} ± "
                         f"{_fmt(s['sd'], d)}<br><small>[{_fmt(s['ci_low'], d)}, {_fmt(s['ci_high'], d)}]"
                         f"{extra}</small></td>")
        rows.append(f"<tr><td>{html.escape(label)} {html.escape(entry['name'])}</td>{''.join(cells)}</tr>")
    legend = ("<p class='note'>mean ± sd, [bootstrap 95% CI of the mean]; distances in mm; NaN (class absent "
              "from both masks) left out; inf (one mask empty) counted separately.</p>")
    return _section("Summary", head + f"<table>{''.join(rows)}</table>" + legend)


def _case_caption(c: _Case, names: Mapping[int, str]) -> str:
    bits = [f"<b>{html.escape(c.case_id)}</b>" + (f" ({html.escape(c.fold)})" if c.fold else "")]
    for label, m in sorted(c.metrics.items()):
        bits.append(f"{html.escape(names.get(label, str(label)))}: Dice {_fmt(m.get('dice'))}, "
                    f"HD95 {_fmt(m.get('hd95_mm'), 2)} mm, NSD {_fmt(m.get('nsd'))}")
    return "<br>".join(bits)
