"""Attention-gate maps of one case, for runs whose network has attention gates (Attention U-Net).

Uses the networks' ``forward_with_attention(x) -> (logits, [gate maps, finest first])`` on one patch of the
case's preprocessed image (the run's plan and the fold's best checkpoint, via
:meth:`medseg.inference.Predictor.from_run`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError

__all__ = ["has_attention_gates", "attention_maps_png"]

log = logging.getLogger(__name__)


def has_attention_gates(network_spec: dict[str, Any]) -> bool:
    """Whether a ``{"name", "kwargs"}`` network record describes a network with attention gates."""
    name = str(network_spec.get("name", "")).lower()
    return "attention" in name or bool((network_spec.get("kwargs") or {}).get("attention"))


def _centre_patch(image: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """A ``patch``-sized crop of ``image (C, *s)`` around its centre, zero-padded where the image is smaller."""
    out = np.zeros((image.shape[0], *patch), dtype=np.float32)
    src, dst = [], []
    for n, p in zip(image.shape[1:], patch):
        start = max(0, (n - p) // 2)
        length = min(n, p)
        off = max(0, (p - n) // 2)
        src.append(slice(start, start + length))
        dst.append(slice(off, off + length))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


def attention_maps_png(run_dir: str | Path, image_path: Path | None, fold: str | None,
                       case_id: str) -> tuple[bytes | None, str]:
    """Gate maps of one case as a PNG figure.

    Args:
        run_dir: the run folder (``model.json``, ``plan.json``, ``fold_K/checkpoint_best.pt``).
        image_path: the case's image file, or None.
        fold: fold folder name holding the case (``"fold_1"``); None: the run's first fold.
        case_id: the case id (figure title).

    Returns:
        ``(png, message)``: the PNG bytes and a caption, or ``(None, why there is no figure)``.
    """
    run = Path(run_dir)
    try:
        model = json.loads((run / "model.json").read_text())
    except (OSError, ValueError):
        return None, f"No attention maps: {run / 'model.json'} is missing or unreadable."
    spec = model.get("network") or {}
    if not has_attention_gates(spec):
        return None, f"The model ({spec.get('name', 'unknown network')}) has no attention gates."
    if image_path is None:
        return None, "The model has attention gates: pass --images to show the gate maps of a case."
    import torch

    from medseg.evaluation.figures import attention_figure, figure_to_png_bytes
    from medseg.inference import Predictor
    from medseg.io import read_volume
    from medseg.transforms.preprocess import preprocess_volume

    folds = [int(fold.split("_")[-1])] if fold and fold.split("_")[-1].isdigit() else None
    try:
        predictor = Predictor.from_run(run, folds=folds, device="cpu")
        image, _, _ = preprocess_volume(read_volume(image_path), predictor.plan, predictor.config_name)
    except MedsegError as exc:
        return None, f"No attention maps: {exc}"
    net = predictor.networks[0]
    if not hasattr(net, "forward_with_attention"):
        return None, f"The network class {type(net).__name__} does not expose forward_with_attention."
    patch = list(predictor.patch_size)
    if len(patch) == 2 and image.ndim == 4:  # 2D configuration of 3D data: the middle slice
        image = image[..., image.shape[-1] // 2]
    x = _centre_patch(image, patch)
    net.eval()
    with torch.no_grad():
        _, maps = net.forward_with_attention(torch.from_numpy(x)[None])
    arrays = [m[0, 0].float().cpu().numpy() for m in maps]
    fig = attention_figure(x[0], arrays, title=f"{case_id}: attention gates (finest first), fold "
                                                f"{fold or 'first'}")
    return figure_to_png_bytes(fig), (f"Gate coefficients (0 to 1) of {len(arrays)} gates on a "
                                      f"{'x'.join(map(str, patch))} patch at the centre of the preprocessed image.")
