"""Segmentation losses: a name -> loss table over MONAI's losses, the U-Net paper's border weight map, and
deep-supervision weighting.

Every loss built here takes ``(logits (B, K, *spatial), target (B, 1, *spatial) integer labels)`` and returns a
scalar. MONAI provides the Dice, Dice+CE, focal, Tversky and IoU (Jaccard) terms; medseg adds only what MONAI
lacks: the inverse-frequency class weights, the border-weighted cross-entropy of Ronneberger et al. 2015
(eq. 2: ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``) and a deep-supervision wrapper whose
weights ``1/2^i`` are normalised to sum to one (nnU-Net's scheme).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError

__all__ = [
    "LOSSES",
    "build_loss",
    "inverse_frequency_weights",
    "unet_weight_map",
    "BorderWeightedCELoss",
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "deep_supervision_weights",
]

logger = logging.getLogger(__name__)

#: Loss names accepted by :func:`build_loss` (config key ``train.loss``).
LOSSES = ("ce", "weighted_ce", "dice", "dice_ce", "focal", "dice_focal", "tversky", "iou", "border_ce")


class CrossEntropyLoss(nn.Module):
    """Cross-entropy on ``(B, 1, *spatial)`` integer targets (the channel axis MONAI's losses expect).

    Args:
        weight: optional per-class weights ``(K,)``.
        label_smoothing: as in :class:`torch.nn.CrossEntropyLoss`.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` (B, K, *s) against ``target`` (B, 1, *s)."""
        return F.cross_entropy(
            logits.float(), target[:, 0].long(), weight=self.weight, label_smoothing=self.label_smoothing
        )


def unet_weight_map(
    label: np.ndarray,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | None = None,
    foreground: int = 1,
) -> np.ndarray:
    """The U-Net paper's pixel weight map that makes the thin borders between touching instances count.

    ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))`` on background pixels, where ``d1``/``d2`` are the
    distances to the nearest and second-nearest instance (connected component of ``foreground``, found with cc3d)
    and ``w_c`` balances the class frequencies (inverse frequency, normalised to mean 1, unless given).

    Args:
        label: integer label map ``(*spatial)`` (2D or 3D, no channel axis).
        w0: border weight (10 in the paper).
        sigma: border width in pixels (about 5 in the paper).
        class_weights: per-class weights ``w_c``; default inverse frequency in this map.
        foreground: the label whose connected components are the instances (cells).

    Returns:
        float32 array of the shape of ``label``.
    """
    import cc3d
    from scipy import ndimage

    label = np.asarray(label)
    n_classes = max(int(label.max()) + 1, foreground + 1)
    if class_weights is None:
        counts = np.bincount(label.ravel().astype(np.int64), minlength=n_classes).astype(np.float64)
        wc = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    else:
        wc = np.asarray(class_weights, dtype=np.float64)
    weight = wc[label.astype(np.int64)]
    fg = label == foreground
    inst = cc3d.connected_components(fg.astype(np.uint8), connectivity=4 if label.ndim == 2 else 6)
    n = int(inst.max())
    if n >= 2:
        d1 = np.full(label.shape, np.inf)
        d2 = np.full(label.shape, np.inf)
        for i in range(1, n + 1):
            d = ndimage.distance_transform_edt(inst != i)
            closer = d < d1
            d2 = np.where(closer, d1, np.minimum(d2, d))
            d1 = np.where(closer, d, d1)
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
        weight = weight + np.where(fg, 0.0, border)
    return weight.astype(np.float32)


class BorderWeightedCELoss(nn.Module):
    """Pixel-weighted cross-entropy with :func:`unet_weight_map` computed from each target on the fly.

    Args:
        w0: border weight.
        sigma: border width in pixels.
        foreground: the instance label.
    """

    def __init__(self, w0: float = 10.0, sigma: float = 5.0, foreground: int = 1):
        super().__init__()
        self.w0, self.sigma, self.foreground = w0, sigma, foreground

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted mean cross-entropy of ``logits`` (B, K, *s) against ``target`` (B, 1, *s)."""
        labels = target[:, 0].long()
        lab_np = labels.detach().cpu().numpy()
        w = np.stack(
            [unet_weight_map(t, w0=self.w0, sigma=self.sigma, foreground=self.foreground) for t in lab_np]
        )
        weights = torch.from_numpy(w).to(logits.device)
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        return (ce * weights).sum() / weights.sum().clamp_min(1e-8)


def inverse_frequency_weights(counts: Sequence[float]) -> torch.Tensor:
    """Class weights proportional to ``1 / frequency``, normalised so that they average to one.

    Args:
        counts: voxel count per class (classes absent from the data get weight 0).

    Returns:
        float32 tensor ``(K,)``.
    """
    c = torch.as_tensor(counts, dtype=torch.float64)
    w = torch.where(c > 0, c.sum() / c.clamp_min(1.0), torch.zeros_like(c))
    present = (c > 0).sum().clamp_min(1)
    return (w * present / w.sum().clamp_min(1e-12)).float()


def deep_supervision_weights(levels: int) -> list[float]:
    """Weights ``1/2^i`` for output ``i`` (0 = full resolution), normalised to sum to one.

    Args:
        levels: number of outputs.

    Returns:
        list of ``levels`` floats.
    """
    w = [0.5**i for i in range(max(1, levels))]
    s = sum(w)
    return [x / s for x in w]


class DeepSupervisionLoss(nn.Module):
    """Apply ``loss`` to every output of a deeply supervised network, the target downsampled by nearest
    neighbour to each output's size, weighted by :func:`deep_supervision_weights`. A single tensor is passed
    straight to ``loss``.

    Args:
        loss: the per-level loss.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the per-level losses."""
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            t = target
            if tuple(out.shape[2:]) != tuple(target.shape[2:]):
                t = F.interpolate(target.float(), size=out.shape[2:], mode="nearest-exact").long()
            total = total + w * self.loss(out, t)
        return total


def build_loss(
    name: str,
    *,
    num_classes: int,
    class_counts: Sequence[float] | None = None,
    deep_supervision: bool = False,
    options: dict | None = None,
) -> nn.Module:
    """Create a loss by name.

    Args:
        name: one of :data:`LOSSES`: ``ce``, ``weighted_ce`` (inverse class frequency), ``dice``, ``dice_ce``
            (the default of medseg's pipelines), ``focal``, ``dice_focal``, ``tversky``, ``iou`` (soft Jaccard),
            ``border_ce`` (U-Net paper's border weight map, for touching instances).
        num_classes: number of output channels ``K`` (background included).
        class_counts: voxel count per class in the training data, required for ``weighted_ce``.
        deep_supervision: wrap the loss in :class:`DeepSupervisionLoss`.
        options: extra keyword arguments for the chosen loss (e.g. ``{"alpha": 0.3, "beta": 0.7}`` for Tversky,
            ``{"gamma": 2.0}`` for focal, ``{"w0": 10, "sigma": 5}`` for ``border_ce``).

    Returns:
        an ``nn.Module`` called as ``loss(logits_or_list, target)``.

    Raises:
        ConfigError: unknown name, or ``weighted_ce`` without ``class_counts``.
    """
    from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss, TverskyLoss

    opts = dict(options or {})
    common = {"to_onehot_y": True, "softmax": True, "include_background": False, "batch": True}
    if num_classes < 2:
        raise ConfigError("num_classes", num_classes, "at least 2 (background and one class)")
    loss: nn.Module
    try:
        if name == "ce":
            loss = CrossEntropyLoss(**opts)
        elif name == "weighted_ce":
            if class_counts is None:
                raise ConfigError("train.loss", name, "class voxel counts to derive inverse-frequency weights")
            loss = CrossEntropyLoss(weight=inverse_frequency_weights(class_counts), **opts)
        elif name == "dice":
            loss = DiceLoss(**common, **opts)
        elif name == "iou":
            loss = DiceLoss(**common, jaccard=True, **opts)
        elif name == "dice_ce":
            loss = DiceCELoss(**common, **opts)
        elif name == "dice_focal":
            loss = DiceFocalLoss(**common, **opts)
        elif name == "focal":
            loss = FocalLoss(to_onehot_y=True, use_softmax=True, **opts)
        elif name == "tversky":
            loss = TverskyLoss(**common, **{"alpha": 0.3, "beta": 0.7, **opts})
        elif name == "border_ce":
            loss = BorderWeightedCELoss(**opts)
        else:
            import difflib

            close = difflib.get_close_matches(name, LOSSES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError("train.loss", name, f"one of {', '.join(LOSSES)}{hint}")
    except TypeError as exc:
        raise ConfigError("train.loss_options", opts, f"keyword arguments accepted by {name!r} ({exc})") from exc
    return _FloatTarget(DeepSupervisionLoss(loss) if deep_supervision else loss)


class _FloatTarget(nn.Module):
    """Casts logits to float32 (losses under autocast are computed in full precision)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs.float(), target)
        return self.loss([o.float() for o in outputs], target)
