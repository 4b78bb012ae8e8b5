"""Segmentation losses: a name -> loss table over MONAI's losses, the U-Net paper's border weight map, and
deep-supervision weighting.

Every loss built here takes ``(logits (B, K, *spatial), target (B, 1, *spatial) integer labels)`` and returns a
scalar. MONAI provides the Dice, Dice+CE, focal, Tversky and IoU (Jaccard) terms; medseg adds only what MONAI
lacks: the inverse-frequency class weights, the border-weighted cross-entropy of Ronneberger et al. 2015
(eq. 2: ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``) and a deep-supervision wrapper whose
weights ``1/2^i`` are normalised to sum to one (nnU-Net's scheme).

**Ignore label.** With ``build_loss(..., ignore_index=K)`` target voxels holding ``K`` (the plan's
``ignore_index``: one past the last class) take no part in the loss: :func:`split_ignore` is the one place that
turns such a target into a valid-voxel mask and a target of real classes; cross-entropy is the mean over labelled
voxels only, the overlap losses (Dice, IoU, Tversky) sum probabilities and one-hot targets over labelled voxels
only (:class:`MaskedOverlapLoss`). What holds exactly (``tests/test_ignore_label.py``): changing the logits at
ignored voxels changes neither the loss nor its gradient at the other logits (bitwise), and the gradient at ignored
voxels is zero; a batch without a labelled voxel gives loss 0 and zero gradient, never NaN. Deep supervision
downsamples the target by nearest neighbour, so lower levels keep the ignore index.

**Regions.** With ``build_loss(..., regions=...)`` (the plan's :meth:`~medseg.planning.Plan.region_classes`) the
network has one sigmoid output per region and the loss is :class:`RegionLoss`: binary cross-entropy plus batch
Dice over the regions, against region masks made from the integer target on the fly
(:func:`medseg.transforms.regions.regions_onehot`); ignored voxels are left out exactly as above.
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
    "IGNORE_LOSSES",
    "build_loss",
    "inverse_frequency_weights",
    "unet_weight_map",
    "BorderWeightedCELoss",
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "MaskedOverlapLoss",
    "RegionLoss",
    "REGION_LOSSES",
    "split_ignore",
    "deep_supervision_weights",
]

logger = logging.getLogger(__name__)

#: Loss names accepted by :func:`build_loss` (config key ``train.loss``).
LOSSES = ("ce", "weighted_ce", "dice", "dice_ce", "focal", "dice_focal", "tversky", "iou", "border_ce")


#: Loss names that support an ignore label (``build_loss(..., ignore_index=K)``).
IGNORE_LOSSES = ("ce", "weighted_ce", "dice", "dice_ce", "iou", "tversky")


#: Loss names accepted with regions (each means BCE + Dice per region, :class:`RegionLoss`).
REGION_LOSSES = ("dice_ce",)


def split_ignore(target: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one definition of "ignored voxel": a target of real classes and the mask of labelled voxels.

    Args:
        target: integer labels ``(B, 1, *spatial)`` (or any shape).
        ignore_index: the value of unlabelled voxels (the plan's ``ignore_index``), or None.

    Returns:
        ``(labels, valid)``: ``labels`` is ``target`` as int64 with ignored voxels set to class 0 (so one-hot
        encoding and indexing stay in range; callers must mask them out with ``valid``); ``valid`` is the boolean
        mask of labelled voxels, shaped like ``target``, or None when ``ignore_index`` is None.
    """
    labels = target.long()
    if ignore_index is None:
        return labels, None
    valid = labels != int(ignore_index)
    return torch.where(valid, labels, torch.zeros_like(labels)), valid


class CrossEntropyLoss(nn.Module):
    """Cross-entropy on ``(B, 1, *spatial)`` integer targets (the channel axis MONAI's losses expect).

    Args:
        weight: optional per-class weights ``(K,)``.
        label_smoothing: as in :class:`torch.nn.CrossEntropyLoss`.
        ignore_index: target value of unlabelled voxels: the loss is the (weighted) mean over the other voxels,
            0 with zero gradient when there are none; None = every voxel counts.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 ignore_index: int | None = None):
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` (B, K, *s) against ``target`` (B, 1, *s)."""
        if self.ignore_index is None:
            return F.cross_entropy(
                logits.float(), target[:, 0].long(), weight=self.weight, label_smoothing=self.label_smoothing
            )
        labels, valid = split_ignore(target[:, 0], self.ignore_index)
        assert valid is not None  # ignore_index is set
        # reduction "none" with ignore_index: exactly 0 (and zero gradient) at ignored voxels, w[y] * ce elsewhere
        ce = F.cross_entropy(logits.float(), target[:, 0].long(), weight=self.weight,
                             label_smoothing=self.label_smoothing, ignore_index=int(self.ignore_index),
                             reduction="none")
        w = valid.float() if self.weight is None else torch.where(valid, self.weight[labels], 0.0)
        return ce.sum() / w.sum().clamp_min(1e-8)


class MaskedOverlapLoss(nn.Module):
    """An overlap loss (MONAI's Dice, IoU, Tversky) on softmax probabilities and one-hot targets that are zero at
    ignored voxels, so those voxels add nothing to any intersection, prediction or reference sum.

    Args:
        overlap: the MONAI loss, built with ``softmax=False, to_onehot_y=False`` (it receives probabilities and
            one-hot targets).
        ignore_index: target value of unlabelled voxels, or None.
    """

    def __init__(self, overlap: nn.Module, ignore_index: int | None):
        super().__init__()
        self.overlap = overlap
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The overlap loss of ``logits`` (B, K, *s) against ``target`` (B, 1, *s) over labelled voxels."""
        labels, valid = split_ignore(target, self.ignore_index)
        prob = torch.softmax(logits.float(), dim=1)
        onehot = F.one_hot(labels[:, 0], logits.shape[1]).movedim(-1, 1).to(prob.dtype)
        if valid is not None:  # where, not a product: exact zeros whatever the logits there (inf included)
            prob = torch.where(valid, prob, 0.0)
            onehot = torch.where(valid, onehot, 0.0)
        return self.overlap(prob, onehot)


class RegionLoss(nn.Module):
    """Binary cross-entropy + Dice per region, on sigmoid outputs (nnU-Net v2's region loss).

    The BCE is the mean over labelled voxels and regions; the Dice is MONAI's batch Dice over all regions (no
    background channel) on sigmoid probabilities and region masks that are zero at ignored voxels.

    Args:
        region_classes: the class indices of each region (the plan's ``region_classes()``).
        ignore_index: target value of unlabelled voxels, or None.
        lambda_bce: weight of the BCE term; lambda_dice: weight of the Dice term.
        **dice_options: keyword arguments of :class:`monai.losses.DiceLoss` (``smooth_nr``, ``smooth_dr``, ...).
    """

    def __init__(self, region_classes: Sequence[Sequence[int]], ignore_index: int | None = None, *,
                 lambda_bce: float = 1.0, lambda_dice: float = 1.0, **dice_options):
        from monai.losses import DiceLoss

        super().__init__()
        self.region_classes = [tuple(int(c) for c in r) for r in region_classes]
        self.ignore_index = ignore_index
        self.lambda_bce, self.lambda_dice = float(lambda_bce), float(lambda_dice)
        self.dice = DiceLoss(include_background=True, to_onehot_y=False, sigmoid=False, batch=True, **dice_options)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of region logits (B, R, *s) against integer targets (B, 1, *s)."""
        from medseg.transforms.regions import regions_onehot

        if logits.shape[1] != len(self.region_classes):
            raise ValueError(f"{logits.shape[1]} output channels for {len(self.region_classes)} regions")
        logits = logits.float()
        onehot = regions_onehot(target, self.region_classes)
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        prob = torch.sigmoid(logits)
        _, valid = split_ignore(target, self.ignore_index)
        if valid is None:
            bce_mean = bce.mean()
        else:  # where, not a product: exact zeros (and zero gradient) at ignored voxels whatever the logits there
            bce = torch.where(valid, bce, 0.0)
            prob, onehot = torch.where(valid, prob, 0.0), torch.where(valid, onehot, 0.0)
            bce_mean = bce.sum() / (valid.sum() * logits.shape[1]).clamp_min(1)
        return self.lambda_bce * bce_mean + self.lambda_dice * self.dice(prob, onehot)


class _WeightedSum(nn.Module):
    """``sum(w * loss(outputs, target))`` over ``(w, loss)`` terms (Dice + CE with an ignore label)."""

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]):
        super().__init__()
        self.weights = [float(w) for w, _ in terms]
        self.terms = nn.ModuleList([t for _, t in terms])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * t(logits, target) for w, t in zip(self.weights, self.terms))  # type: ignore[return-value]


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
    neighbour to each output's size (an ignore index stays an ignore index), weighted by
    :func:`deep_supervision_weights`. A single tensor is passed straight to ``loss``.

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
    ignore_index: int | None = None,
    regions: Sequence[Sequence[int]] | None = None,
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
        ignore_index: target value of unlabelled voxels (the plan's ``ignore_index``), which then take no part in
            the loss (see the module docstring); one of :data:`IGNORE_LOSSES` is required then.
        regions: the class indices of each region, for a network with one sigmoid output per region: the loss
            is then :class:`RegionLoss` (BCE + Dice per region); ``name`` must be one of :data:`REGION_LOSSES`.

    Returns:
        an ``nn.Module`` called as ``loss(logits_or_list, target)``.

    Raises:
        ConfigError: unknown name, ``weighted_ce`` without ``class_counts``, an ignore label with a loss that
            does not support one, or regions with a loss other than :data:`REGION_LOSSES`.
    """
    from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss, TverskyLoss

    opts = dict(options or {})
    common = {"to_onehot_y": True, "softmax": True, "include_background": False, "batch": True}
    if num_classes < 2:
        raise ConfigError("num_classes", num_classes, "at least 2 (background and one class)")
    if ignore_index is not None and name not in IGNORE_LOSSES:
        raise ConfigError("train.loss", name, "with an ignore label in the data, one of " + ", ".join(IGNORE_LOSSES))
    if regions and name not in REGION_LOSSES:
        raise ConfigError("train.loss", name, "with regions, dice_ce (BCE + Dice per region)")
    loss: nn.Module
    try:
        if regions:
            loss = RegionLoss(regions, ignore_index, **opts)
        elif ignore_index is not None:
            loss = _ignore_loss(name, opts, ignore_index, class_counts)
        elif name == "ce":
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


def _ignore_loss(name: str, opts: dict, ignore_index: int, class_counts: Sequence[float] | None) -> nn.Module:
    """The losses of :data:`IGNORE_LOSSES` with unlabelled voxels left out (the same terms as without)."""
    from monai.losses import DiceLoss, TverskyLoss

    overlap = {"to_onehot_y": False, "softmax": False, "include_background": False, "batch": True}
    if name in ("ce", "weighted_ce"):
        if name == "weighted_ce":
            if class_counts is None:
                raise ConfigError("train.loss", name, "class voxel counts to derive inverse-frequency weights")
            opts = {"weight": inverse_frequency_weights(class_counts), **opts}
        return CrossEntropyLoss(**opts, ignore_index=ignore_index)
    if name == "dice":
        return MaskedOverlapLoss(DiceLoss(**overlap, **opts), ignore_index)
    if name == "iou":
        return MaskedOverlapLoss(DiceLoss(**overlap, jaccard=True, **opts), ignore_index)
    if name == "tversky":
        return MaskedOverlapLoss(TverskyLoss(**overlap, **{"alpha": 0.3, "beta": 0.7, **opts}), ignore_index)
    # dice_ce: MONAI's DiceCELoss terms and keywords (lambda_dice, lambda_ce, weight, label_smoothing)
    ce_opts = {k: opts.pop(k) for k in ("weight", "label_smoothing") if k in opts}
    lam_dice, lam_ce = float(opts.pop("lambda_dice", 1.0)), float(opts.pop("lambda_ce", 1.0))
    return _WeightedSum([(lam_dice, MaskedOverlapLoss(DiceLoss(**overlap, **opts), ignore_index)),
                         (lam_ce, CrossEntropyLoss(**ce_opts, ignore_index=ignore_index))])


class _FloatTarget(nn.Module):
    """Casts logits to float32 (losses under autocast are computed in full precision)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs.float(), target)
        return self.loss([o.float() for o in outputs], target)
