"""The previous stage of a cascade as network input: one-hot channels, and their training-time perturbation.

A cascade stage (``3d_cascade_fullres``) sees the image plus the previous stage's (``3d_lowres``) prediction,
brought into its own plan space, as one extra input channel per foreground class (nnU-Net's
``MoveSegAsOneHotToData``). During training the previous stage's map travels through the spatial augmentation as a
second label channel (nearest interpolation, the same grid and mirroring as the target, and untouched by the
intensity transforms), then :func:`attach_previous` moves it into the image as one-hot channels and perturbs
them as nnU-Net does, so the stage learns to correct the previous stage rather than to copy it:

- with probability 0.4 per sample, each foreground channel in random order is dilated, eroded, opened or closed
  with a cube of radius 1-4 voxels (``ApplyRandomBinaryOperatorTransform``; nnU-Net uses a ball of 1-8);
- with probability 0.2 per sample, one connected component of each foreground channel that covers less than 15%
  of the patch is removed (``RemoveRandomConnectedComponentFromOneHotEncodingTransform``).

At inference (:meth:`medseg.inference.Predictor.prepare`) the channels are attached unperturbed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["one_hot_previous", "stack_previous", "attach_previous", "perturb_previous", "P_BINARY_OPERATOR", "P_REMOVE_COMPONENT"]

#: Per-sample probability of a random binary operator on the previous stage's channels (nnU-Net: 0.4).
P_BINARY_OPERATOR = 0.4
#: Per-sample probability of removing a random small connected component per channel (nnU-Net: 0.2).
P_REMOVE_COMPONENT = 0.2
#: A component is removed only when it covers less than this share of the patch (nnU-Net: 0.15).
MAX_REMOVED_SHARE = 0.15


def one_hot_previous(prev: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    """``(B, 1, *s)`` class indices -> ``(B, K-1, *s)`` float32 one-hot of the foreground classes 1..K-1 (the
    background channel is implied, as in nnU-Net). For one case, pass ``prev[None]`` and take ``[0]``."""
    t = torch.as_tensor(prev)
    classes = torch.arange(1, int(num_classes), device=t.device).view(1, -1, *([1] * (t.ndim - 2)))
    return (t == classes).to(torch.float32)


def stack_previous(image: np.ndarray, previous: np.ndarray, num_classes: int) -> np.ndarray:
    """One case's plan-space ``image (C, *s)`` with the previous stage's class map ``(1, *s)`` appended as K-1
    one-hot channels (unperturbed: validation and inference)."""
    channels = one_hot_previous(np.asarray(previous)[None], num_classes)[0].numpy()
    return np.concatenate([image, channels.astype(image.dtype)], axis=0)


def _morph(x: torch.Tensor, radius: int, op: str) -> torch.Tensor:
    """Binary dilation/erosion/opening/closing of ``x`` (1, 1, *s) in {0, 1} with a cube of ``radius``."""
    k = 2 * radius + 1
    pool = F.max_pool3d if x.ndim == 5 else F.max_pool2d

    def dilate(v: torch.Tensor) -> torch.Tensor:
        return pool(v, k, stride=1, padding=radius)

    def erode(v: torch.Tensor) -> torch.Tensor:
        return 1.0 - pool(1.0 - v, k, stride=1, padding=radius)

    if op == "dilation":
        return dilate(x)
    if op == "erosion":
        return erode(x)
    if op == "opening":
        return dilate(erode(x))
    return erode(dilate(x))  # closing


def _remove_component(channel: torch.Tensor, pick: float) -> torch.Tensor:
    """``channel`` (*s) in {0, 1} with one of its connected components smaller than 15% of the patch set to 0."""
    import cc3d

    mask = channel.detach().cpu().numpy() > 0.5
    if not mask.any():
        return channel
    labels = cc3d.connected_components(mask.astype(np.uint8), connectivity=26 if mask.ndim == 3 else 8)
    sizes = np.bincount(labels.ravel())[1:]
    small = np.flatnonzero(sizes < MAX_REMOVED_SHARE * mask.size) + 1
    if not len(small):
        return channel
    chosen = int(small[min(int(pick * len(small)), len(small) - 1)])
    keep = torch.from_numpy(labels != chosen).to(channel.device)
    return channel * keep


def perturb_previous(onehot: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """nnU-Net's perturbation of a cascade stage's previous-stage channels ``(B, K-1, *s)`` (a new tensor).

    Args:
        onehot: float one-hot channels of the foreground classes.
        generator: the batch's generator (its device is where the random numbers are drawn).

    Returns:
        The perturbed channels (still in {0, 1}), same shape and device.
    """
    g = generator
    b, k = onehot.shape[:2]
    out = onehot.clone()
    ops = ("dilation", "erosion", "opening", "closing")
    r_bin = torch.rand(b, generator=g, device=g.device).tolist()
    r_rm = torch.rand(b, generator=g, device=g.device).tolist()
    order = torch.rand(b, k, generator=g, device=g.device).argsort(dim=1).tolist()
    op_pick = torch.randint(0, len(ops), (b, k), generator=g, device=g.device).tolist()
    radius = torch.randint(1, 5, (b, k), generator=g, device=g.device).tolist()
    comp_pick = torch.rand(b, k, generator=g, device=g.device).tolist()
    for i in range(b):
        if r_bin[i] < P_BINARY_OPERATOR:
            for c in order[i]:
                changed = _morph(out[i: i + 1, c: c + 1], int(radius[i][c]), ops[op_pick[i][c]])[0, 0]
                # a class grown by the operator takes its voxels from the others (the channels stay one-hot)
                grown = (changed > 0.5) & (out[i, c] < 0.5)
                out[i, :, grown] = 0.0
                out[i, c] = changed
        if r_rm[i] < P_REMOVE_COMPONENT:
            for c in range(k):
                out[i, c] = _remove_component(out[i, c], comp_pick[i][c])
    return out


def attach_previous(image: torch.Tensor, label: torch.Tensor, num_classes: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the previous stage's map (``label[:, 1:2]``) into the image as one-hot channels.

    Args:
        image: ``(B, C, *s)`` float.
        label: ``(B, 2, *s)`` integer: the target, then the previous stage's class indices.
        num_classes: classes of the plan (background included).
        generator: when given, the channels are perturbed (:func:`perturb_previous`); None at validation.

    Returns:
        ``(image (B, C + K - 1, *s), label (B, 1, *s))``.
    """
    prev = one_hot_previous(label[:, 1:2], num_classes).to(image.device)
    if generator is not None:
        prev = perturb_previous(prev, generator)
    return torch.cat([image, prev.to(image.dtype)], dim=1), label[:, :1]
