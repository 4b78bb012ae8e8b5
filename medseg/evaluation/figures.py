"""QA figures: per-case overlay panels, metric distributions, training curves (matplotlib, Agg backend).

Overlay panels show the image, the reference and the prediction on three orthogonal slices (axial, coronal,
sagittal) through the centre of the reference structure. 3D volumes are reoriented to RAS for display only
(nibabel orientation codes) and shown in neurological convention (the patient's right on the image's right,
anterior / superior up); pixels are drawn with their physical aspect ratio.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io.atomic import atomic_path

__all__ = [
    "overlay_figure",
    "save_overlay_png",
    "metric_distribution_figure",
    "training_curves_figure",
    "attention_figure",
    "figure_to_png_bytes",
    "png_data_uri",
    "to_ras",
]

_LABEL_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
                 "#fabebe", "#008080"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a 3D spatial array so that its axes point to R, A, S (display only).

    Args:
        array: spatial array ``(X, Y, Z)`` in file voxel order.
        affine: its 4x4 voxel-to-world (RAS) matrix.

    Returns:
        ``(array_ras, spacing_ras)``.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out = nib.orientations.apply_orientation(array, ornt)
    sp = [0.0, 0.0, 0.0]
    for axis, (world, _flip) in enumerate(ornt):
        sp[int(world)] = float(spacing[axis])
    return np.ascontiguousarray(out), (sp[0], sp[1], sp[2])


def _window(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _centre(*masks: np.ndarray | None) -> tuple[int, ...]:
    for m in masks:
        if m is not None and m.any():
            idx = np.argwhere(m)
            return tuple(int(v) for v in np.round(idx.mean(axis=0)))
    shape = next(m.shape for m in masks if m is not None)
    return tuple(s // 2 for s in shape)


def _rgba(label: np.ndarray, alpha: float) -> np.ndarray:
    from matplotlib.colors import to_rgba

    out = np.zeros((*label.shape, 4))
    for v in np.unique(label):
        if v == 0:
            continue
        r, g, b, _ = to_rgba(_LABEL_COLORS[(int(v) - 1) % len(_LABEL_COLORS)])
        out[label == v] = (r, g, b, alpha)
    return out


def _slices_3d(arr: np.ndarray | None, c: tuple[int, ...], sp: tuple[float, ...]) -> list[tuple[str, Any, float]]:
    """(plane name, 2D slice with rows = vertical axis, aspect) for axial, coronal, sagittal."""
    if arr is None:
        return [("axial", None, sp[1] / sp[0]), ("coronal", None, sp[2] / sp[0]), ("sagittal", None, sp[2] / sp[1])]
    return [
        ("axial", arr[:, :, c[2]].T, sp[1] / sp[0]),
        ("coronal", arr[:, c[1], :].T, sp[2] / sp[0]),
        ("sagittal", arr[c[0], :, :].T, sp[2] / sp[1]),
    ]


def overlay_figure(
    pred,
    ref=None,
    image=None,
    *,
    title: str = "",
    label_names: Mapping[int, str] | None = None,
):
    """Image / reference / prediction panels through the structure's centre.

    Args:
        pred: predicted label :class:`~medseg.io.Volume`.
        ref: reference label Volume on the same grid, or None.
        image: image Volume on the same grid (channel 0 is shown), or None.
        title: figure title (e.g. the case id and its Dice).
        label_names: ``{label: name}`` for the legend.

    Returns:
        A matplotlib Figure (close it with ``plt.close(fig)`` when done).
    """
    plt = _plt()
    from matplotlib.patches import Patch

    vols = {"image": image, "reference": ref, "prediction": pred}
    arrays: dict[str, np.ndarray | None] = {}
    sp: tuple[float, ...]
    for key, vol in vols.items():
        if vol is None:
            arrays[key] = None
            continue
        a = np.asarray(vol.array[0])
        if vol.spatial_dims == 3:
            a, sp = to_ras(a, vol.affine)
        else:
            sp = tuple(vol.spacing)
        arrays[key] = a if key == "image" else np.rint(a).astype(np.int32)
    if pred.spatial_dims == 3:
        _, sp = to_ras(np.asarray(pred.array[0]), pred.affine)
    else:
        sp = tuple(pred.spacing)
    img = arrays["image"]
    ref_a, pred_a = arrays["reference"], arrays["prediction"]
    centre = _centre(None if ref_a is None else ref_a > 0, pred_a > 0)
    lo, hi = _window(img) if img is not None else (0.0, 1.0)
    cols = ["image", "reference", "prediction"] if ref_a is not None else ["image", "prediction"]
    if pred.spatial_dims == 3:
        planes = {k: _slices_3d(arrays[k], centre, sp) for k in ("image", "reference", "prediction")}
    else:
        aspect = sp[1] / sp[0]
        planes = {k: [("2D", None if arrays[k] is None else arrays[k].T, aspect)] for k in arrays}
    n_rows = len(planes["prediction"])
    fig, axes = plt.subplots(n_rows, len(cols), figsize=(3.0 * len(cols), 3.0 * n_rows + 0.6), squeeze=False)
    for r in range(n_rows):
        plane, pslice, aspect = planes["prediction"][r]
        base = planes["image"][r][1]
        rslice = planes["reference"][r][1] if ref_a is not None else None
        for ci, col in enumerate(cols):
            ax = axes[r][ci]
            if base is not None:
                ax.imshow(base, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                          interpolation="nearest")
            else:
                ax.imshow(np.zeros_like(pslice, dtype=float), cmap="gray", vmin=0, vmax=1, origin="lower",
                          aspect=aspect)
            lab = {"reference": rslice, "prediction": pslice}.get(col)
            if lab is not None:
                ax.imshow(_rgba(lab, 0.45), origin="lower", aspect=aspect, interpolation="nearest")
                if col == "prediction" and rslice is not None and rslice.any():
                    ax.contour(rslice > 0, levels=[0.5], colors="white", linewidths=0.8, linestyles="dashed",
                               origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col, fontsize=10)
            if ci == 0:
                ax.set_ylabel(plane, fontsize=10)
    present = sorted({int(v) for a in (ref_a, pred_a) if a is not None for v in np.unique(a) if v != 0})
    if present:
        handles = [Patch(color=_LABEL_COLORS[(v - 1) % len(_LABEL_COLORS)],
                         label=(label_names or {}).get(v, str(v))) for v in present]
        if ref_a is not None:
            handles.append(Patch(facecolor="none", edgecolor="black", linestyle="--", label="reference outline"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if present else 0, 1, 1))
    return fig


def figure_to_png_bytes(fig, dpi: int = 80) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def save_overlay_png(pred, path: str | Path, ref=None, image=None, *, title: str = "",
                     label_names: Mapping[int, str] | None = None, dpi: int = 100) -> Path:
    """Write :func:`overlay_figure` as a PNG file (atomically).

    Args:
        pred: predicted label Volume; ref: reference Volume or None; image: image Volume or None.
        path: output ``.png``.
        title: figure title; label_names: legend names; dpi: resolution.

    Returns:
        The path written.
    """
    png = figure_to_png_bytes(overlay_figure(pred, ref, image, title=title, label_names=label_names), dpi=dpi)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return path


def metric_distribution_figure(
    per_case: Mapping[str, Mapping[int, Mapping[str, float]]],
    *,
    metrics: Sequence[str] = ("dice", "hd95_mm", "assd_mm", "nsd"),
    label_names: Mapping[int, str] | None = None,
):
    """Box plots with the individual cases (jittered points) per class, one panel per metric.

    Non-finite values are left out; the panel title counts them.

    Returns:
        A matplotlib Figure.
    """
    plt = _plt()
    labels = sorted({k for r in per_case.values() for k in r})
    metrics = [m for m in metrics if any(m in r.get(k, {}) for r in per_case.values() for k in labels)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.4 * max(1, len(metrics)), 3.2), squeeze=False)
    rng = np.random.default_rng(0)
    for j, metric in enumerate(metrics):
        ax = axes[0][j]
        data, names, excluded = [], [], 0
        for label in labels:
            v = np.array([r[label][metric] for r in per_case.values() if label in r and metric in r[label]], float)
            excluded += int((~np.isfinite(v)).sum())
            data.append(v[np.isfinite(v)])
            names.append((label_names or {}).get(label, str(label)))
        ax.boxplot([d if d.size else [math.nan] for d in data], showfliers=False)
        for i, d in enumerate(data):
            ax.scatter(1 + i + rng.uniform(-0.15, 0.15, d.size), d, s=8, alpha=0.6,
                       color=_LABEL_COLORS[(labels[i] - 1) % len(_LABEL_COLORS)])
        ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
        ax.set_title(metric + (f" ({excluded} non-finite left out)" if excluded else ""), fontsize=9)
    fig.tight_layout()
    return fig


def training_curves_figure(folds: Mapping[str, Sequence[Mapping[str, float]]]):
    """Per-fold training curves from ``metrics.csv`` rows: losses, validation Dice, learning rate.

    Args:
        folds: ``{fold name: [row dicts with "epoch" and numeric columns]}``.

    Returns:
        A matplotlib Figure.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3), squeeze=False)
    ax_loss, ax_dice, ax_lr = axes[0]
    for fi, (fold, rows) in enumerate(folds.items()):
        color = f"C{fi % 10}"

        def series(key: str, rows=rows) -> tuple[list[float], list[float]]:
            pts = [(r["epoch"], r[key]) for r in rows if key in r and math.isfinite(r.get(key, math.nan))]
            return [p[0] for p in pts], [p[1] for p in pts]

        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            x, y = series(key)
            if x:
                ax_loss.plot(x, y, style, color=color, label=f"{fold} {key}")
        x, y = series("val_dice")
        if x:
            ax_dice.plot(x, y, "-o", ms=2, color=color, label=f"{fold} val_dice")
        x, y = series("val_dice_ema")
        if x:
            ax_dice.plot(x, y, ":", color=color, label=f"{fold} EMA")
        x, y = series("lr")
        if x:
            ax_lr.plot(x, y, color=color, label=fold)
    for ax, title in ((ax_loss, "loss"), (ax_dice, "validation Dice"), (ax_lr, "learning rate")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=7)
    if ax_lr.lines and all(v > 0 for line in ax_lr.lines for v in line.get_ydata()):
        ax_lr.set_yscale("log")
    fig.tight_layout()
    return fig


def attention_figure(image: np.ndarray, maps: Sequence[np.ndarray], *, title: str = ""):
    """Attention-gate maps over the middle slice of a (preprocessed) image.

    Args:
        image: spatial array of the network input (2D or 3D, channel 0).
        maps: gate maps, finest first, each a spatial array (any resolution; resampled for display).
        title: figure title.

    Returns:
        A matplotlib Figure.
    """
    from scipy import ndimage

    plt = _plt()
    img = image if image.ndim == 2 else image[:, :, image.shape[2] // 2]
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.8 * (len(maps) + 1), 3.0), squeeze=False)
    lo, hi = _window(img)
    axes[0][0].imshow(img.T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
    axes[0][0].set_title("input (middle slice)", fontsize=9)
    for i, m in enumerate(maps):
        m2 = m if m.ndim == 2 else m[:, :, m.shape[2] // 2]
        zoom = [a / b for a, b in zip(img.shape, m2.shape)]
        up = ndimage.zoom(m2, zoom, order=1) if any(z != 1 for z in zoom) else m2
        ax = axes[0][i + 1]
        ax.imshow(img.T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.imshow(up.T, cmap="jet", vmin=0, vmax=1, alpha=0.45, origin="lower")
        ax.set_title(f"gate {i} ({'x'.join(str(s) for s in m.shape)})", fontsize=9)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
