"""Overlap-tile sliding-window inference with Gaussian importance weighting.

The engine predicts an image of any size with a network trained on fixed-size patches:

* windows are placed on a regular grid with a configurable overlap (default 0.5, nnU-Net's step rule: the fewest
  windows whose step does not exceed ``tile * (1 - overlap)``, spread evenly from border to border);
* every window's output is weighted by a Gaussian (sigma = tile / 8) and accumulated in place into a
  preallocated float32 tensor; the Gaussian and the grid are separable, so the normalisation is the product of
  one 1D coverage vector per axis (no full-resolution weight map is ever allocated);
* borders and images smaller than the patch are filled by **mirroring** (reflect, no edge repeat), gathered per
  window, so the image itself is never copied or padded as a whole;
* ``valid``-convolution networks (U-Net paper): the input tile is larger than the output tile by ``valid_crop``
  voxels on each side; output tiles tile the image exactly, input tiles read the mirrored context around them;
* windows go through the network in batches; test-time mirroring over ``mirror_axes`` averages all 2^n flips;
  mixed precision via ``torch.autocast`` (bf16 on CPU, fp16/bf16 on CUDA), accumulation always float32;
* if the device runs out of memory, the engine logs a warning and retries with accumulation on the host and a
  smaller window batch.

Memory: the accumulator is ``K x spatial`` float32 (on the device, or on the host after a fallback) -- never a
float64 array per class.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "sliding_window_predict",
    "sliding_window_predict_slices",
    "window_starts",
    "gaussian_1d",
    "mirror_indices",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- geometry helpers
def window_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the output tiles along one axis (of the image padded to at least ``tile``).

    Args:
        size: image length along the axis.
        tile: output tile length.
        overlap: fraction of the tile shared by neighbouring windows, in ``[0, 1)``.

    Returns:
        Sorted start offsets; the first is 0 and the last is ``max(size, tile) - tile``.
    """
    extent = max(size, tile)
    if extent == tile:
        return [0]
    target_step = tile * (1.0 - overlap)
    n = int(math.ceil((extent - tile) / target_step)) + 1
    step = (extent - tile) / (n - 1)
    return [int(round(step * i)) for i in range(n)]


def gaussian_1d(tile: int, sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian importance weights over one tile axis (maximum 1, sigma = ``tile * sigma_scale``).

    Args:
        tile: tile length.
        sigma_scale: sigma as a fraction of the tile (1/8 by default, as in nnU-Net and MONAI).

    Returns:
        float64 array of length ``tile``.
    """
    sigma = max(tile * sigma_scale, 1e-6)
    x = np.arange(tile, dtype=np.float64) - (tile - 1) / 2.0
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.max()


def mirror_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices ``start..stop-1`` mapped into ``[0, size)`` by mirroring at the borders (no edge repeat).

    Equivalent to ``numpy.pad(mode="reflect")`` of any width; a length-1 axis repeats its only element.

    Args:
        start: first index (may be negative).
        stop: one past the last index (may exceed ``size``).
        size: axis length.

    Returns:
        int64 array of length ``stop - start``.
    """
    idx = np.arange(start, stop, dtype=np.int64)
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    m = np.mod(idx, period)
    return np.where(m >= size, period - m, m)


def _as_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{name} must have {n} entries (one per spatial axis), got {out}")
    return out


# --------------------------------------------------------------------------------------------- the engine
def sliding_window_predict(
    network: nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    valid_crop: int | Sequence[int] | None = None,
    activation: str | None = None,
    accumulate_on_host: bool = False,
) -> torch.Tensor:
    """Predict a whole image with overlapping, Gaussian-weighted windows.

    Args:
        network: any module mapping ``(B, C, *patch)`` to ``(B, K, *out_tile)`` (``out_tile = patch - 2 * crop``).
            Put it in eval mode and on ``device`` yourself (the engine does not change it).
        image: ``(C, *spatial)`` with 2 or 3 spatial axes, on any device (windows are moved to ``device``).
        patch_size: network input tile, one entry per spatial axis.
        overlap: fraction in ``[0, 1)`` shared by neighbouring windows.
        mirror_axes: spatial axes (0-based) for test-time mirroring; all ``2**len`` flip combinations are averaged.
        batch_size: windows per forward pass.
        device: where the network runs; default: the network's parameters' device (CPU for a parameterless module).
        amp_dtype: ``torch.bfloat16`` / ``torch.float16`` for mixed precision (autocast), ``None`` for float32.
        valid_crop: voxels a valid-convolution network loses on each side (int or per axis); None or 0 for
            same-size output.
        activation: ``"softmax"`` to average probabilities (softmax per window before weighting), ``"sigmoid"``, or
            ``None`` to average raw outputs (logits).
        accumulate_on_host: accumulate on the CPU from the start (what the out-of-memory fallback switches to).

    Returns:
        ``(K, *spatial)`` float32 tensor: the weighted average of the window outputs, on ``device`` (or the CPU when
        accumulating on the host).

    Raises:
        ValueError: inconsistent shapes or options (wrong number of axes, output tile of unexpected size, ...).
    """
    image_t = torch.as_tensor(image)
    if image_t.ndim not in (3, 4):
        raise ValueError(f"image must be (C, *spatial) with 2 or 3 spatial axes, got shape {tuple(image_t.shape)}")
    out = _predict_stack(
        network, image_t[None], patch_size=patch_size, overlap=overlap, mirror_axes=mirror_axes,
        batch_size=batch_size, device=device, amp_dtype=amp_dtype, valid_crop=valid_crop, activation=activation,
        accumulate_on_host=accumulate_on_host,
    )
    return out[0]


def sliding_window_predict_slices(
    network: nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    slice_axis: int = 2,
    patch_size: Sequence[int],
    **kwargs,
) -> torch.Tensor:
    """Predict a 3D image slice by slice with a 2D network (2D configurations of 3D data).

    Windows from different slices are batched together; each slice is tiled exactly as a 2D image would be.

    Args:
        network: a 2D network.
        image: ``(C, X, Y, Z)``.
        slice_axis: spatial axis (0-2) along which slices are taken.
        patch_size: the 2D patch (the two in-plane axes, in their order in ``image``).
        **kwargs: the options of :func:`sliding_window_predict` (``mirror_axes`` are in-plane 2D axes).

    Returns:
        ``(K, X, Y, Z)`` float32 tensor.

    Raises:
        ValueError: ``image`` is not 3D or ``slice_axis`` is out of range.
    """
    image_t = torch.as_tensor(image)
    if image_t.ndim != 4:
        raise ValueError(f"slice-wise prediction needs a (C, X, Y, Z) image, got shape {tuple(image_t.shape)}")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
    stack = image_t.movedim(slice_axis + 1, 0)  # (S, C, a, b): a view, no copy
    out = _predict_stack(network, stack, patch_size=patch_size, **kwargs)  # (S, K, a, b)
    return out.movedim(0, slice_axis + 1)


def _predict_stack(network, stack, *, patch_size, overlap=0.5, mirror_axes=(), batch_size=1, device=None,
                   amp_dtype=None, valid_crop=None, activation=None, accumulate_on_host=False) -> torch.Tensor:
    """Engine over a stack ``(N, C, *spatial)`` of independent images of one shape; returns ``(N, K, *spatial)``."""
    nd = stack.ndim - 2
    patch = _as_tuple(patch_size, nd, "patch_size")
    crop = _as_tuple(valid_crop or 0, nd, "valid_crop")
    tile = tuple(p - 2 * c for p, c in zip(patch, crop))
    if any(t < 1 for t in tile):
        raise ValueError(f"valid_crop {crop} leaves no output tile for patch {patch}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    axes = tuple(int(a) for a in mirror_axes)
    if any(a < 0 or a >= nd for a in axes):
        raise ValueError(f"mirror_axes {axes} must be spatial axes in [0, {nd})")
    if activation not in (None, "softmax", "sigmoid"):
        raise ValueError(f"activation must be None, 'softmax' or 'sigmoid', got {activation!r}")
    if device is None:
        param = next(iter(network.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    on_host = accumulate_on_host or device.type == "cpu"
    bs = batch_size
    while True:
        try:
            return _run(network, stack, patch, crop, tile, overlap, axes, bs, device, amp_dtype, activation, on_host)
        except torch.cuda.OutOfMemoryError:
            if on_host and bs == 1:
                raise
            new_bs = max(1, bs // 2) if on_host else bs
            log.warning(
                "out of memory on %s with %d windows per batch and %s accumulation; retrying with host "
                "accumulation and %d windows per batch", device, bs, "host" if on_host else "device", new_bs,
            )
            on_host, bs = True, new_bs
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _run(network, stack, patch, crop, tile, overlap, axes, bs, device, amp_dtype, activation, on_host):
    nd = len(patch)
    n_img, _, *spatial = stack.shape
    acc_device = torch.device("cpu") if on_host else device
    src = stack if on_host else stack.to(device)
    # per-axis layout: output tiles on the image padded (centred) to at least the tile
    pad_lo = [max(t - s, 0) // 2 for s, t in zip(spatial, tile)]
    starts = [window_starts(s, t, overlap) for s, t in zip(spatial, tile)]
    gauss = [gaussian_1d(t) for t in tile]
    # separable normalisation: coverage of each image voxel by the (Gaussian-weighted) windows, per axis
    coverage = []
    for s, t, lo, st, g in zip(spatial, tile, pad_lo, starts, gauss):
        c = np.zeros(max(s, t), dtype=np.float64)
        for a in st:
            c[a:a + t] += g
        coverage.append(c[lo:lo + s])
    n_mirror = 2 ** len(axes)
    weight = torch.ones(tile, dtype=torch.float32)
    for ax, g in enumerate(gauss):
        shape = [1] * nd
        shape[ax] = -1
        weight = weight * torch.from_numpy(g.astype(np.float32)).view(shape)
    weight = (weight / n_mirror).to(acc_device)

    windows = [(n, pos) for n in range(n_img) for pos in itertools.product(*starts)]
    acc = None
    flips = [list(c) for r in range(len(axes) + 1) for c in itertools.combinations([a + 2 for a in axes], r)]
    for b0 in range(0, len(windows), bs):
        chunk = windows[b0:b0 + bs]
        out = None
        amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            # built in inference mode like the flipped copies, so a compiled network sees one kind of tensor
            batch = torch.stack([_gather(src, n, pos, pad_lo, crop, patch, spatial) for n, pos in chunk])
            batch = batch.to(device, non_blocking=True)
            for flip in flips:
                x = torch.flip(batch, flip) if flip else batch
                y = network(x)
                if isinstance(y, (list, tuple)):
                    y = y[0]
                y = y.float()
                if activation == "softmax":
                    y = torch.softmax(y, 1)
                elif activation == "sigmoid":
                    y = torch.sigmoid(y)
                if flip:
                    y = torch.flip(y, flip)
                out = y if out is None else out.add_(y)
        if tuple(out.shape[2:]) != tile:
            raise ValueError(
                f"network output tile {tuple(out.shape[2:])} differs from the expected {tile} "
                f"(patch {patch}, valid_crop {crop}); set valid_crop for valid-convolution networks"
            )
        out = out.to(acc_device)
        if acc is None:
            acc = torch.zeros((n_img, out.shape[1], *spatial), dtype=torch.float32, device=acc_device)
        for (n, pos), y in zip(chunk, out):
            dst, tsl = [], []
            for a, lo, s, t in zip(pos, pad_lo, spatial, tile):
                i0, i1 = max(a - lo, 0), min(a + t - lo, s)
                dst.append(slice(i0, i1))
                tsl.append(slice(i0 + lo - a, i1 + lo - a))
            acc[(n, slice(None), *dst)].addcmul_(y[(slice(None), *tsl)], weight[tuple(tsl)])
    for ax, c in enumerate(coverage):
        shape = [1] * (nd + 2)
        shape[ax + 2] = -1
        acc.div_(torch.from_numpy(c.astype(np.float32)).to(acc_device).view(shape))
    return acc


def _gather(src: torch.Tensor, n: int, pos, pad_lo, crop, patch, spatial) -> torch.Tensor:
    """The mirrored input tile ``(C, *patch)`` of image ``n`` for the output tile starting at ``pos``."""
    region = src[n]
    slices, index = [], []
    for a, lo, c, p, s in zip(pos, pad_lo, crop, patch, spatial):
        i0 = a - lo - c
        if i0 >= 0 and i0 + p <= s:
            slices.append(slice(i0, i0 + p))
            index.append(None)
        else:
            idx = mirror_indices(i0, i0 + p, s)
            lo_i, hi_i = int(idx.min()), int(idx.max()) + 1
            slices.append(slice(lo_i, hi_i))
            index.append(idx - lo_i)
    tile = region[(slice(None), *slices)]
    for ax, idx in enumerate(index):
        if idx is not None:
            tile = tile.index_select(ax + 1, torch.from_numpy(idx).to(tile.device))
    return tile
