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
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

__all__ = [
    "SlidingWindowInferer",
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
@dataclass(frozen=True)
class SlidingWindowInferer:
    """The sliding-window engine with its configuration: build once, call on many images.

    ``SlidingWindowInferer(patch_size=(64, 64, 64), mirror_axes=(0,), batch_size=4)(network, image)``.
    Validation during training and the Predictor build one from the same model record.

    Args:
        patch_size: network input tile, one entry per spatial axis of the network.
        overlap: fraction in ``[0, 1)`` shared by neighbouring windows.
        mirror_axes: network axes (0-based) for test-time mirroring; all ``2**len`` flip combinations are averaged.
        batch_size: windows per forward pass.
        device: where the network runs; default: the network's parameters' device (CPU for a parameterless module).
        amp_dtype: ``torch.bfloat16`` / ``torch.float16`` for mixed precision (autocast), ``None`` for float32.
        valid_crop: voxels a valid-convolution network loses on each side (int or per axis); None or 0 for
            same-size output.
        activation: ``"softmax"`` to average probabilities (softmax per window before weighting), ``"sigmoid"``,
            or ``None`` to average raw outputs (logits).
        accumulate_on_host: accumulate on the CPU from the start (what the out-of-memory fallback switches to).
        slice_axis: for a 2D network on a 3D image, the image axis (0-2) that slices are taken across; windows of
            different slices are batched together and each slice is tiled as a 2D image would be.

    Raises:
        ValueError: inconsistent options (a programming error; user options are checked before).
    """

    patch_size: tuple[int, ...]
    overlap: float = 0.5
    mirror_axes: tuple[int, ...] = ()
    batch_size: int = 1
    device: torch.device | None = None
    amp_dtype: torch.dtype | None = None
    valid_crop: tuple[int, ...] | None = None
    activation: str | None = None
    accumulate_on_host: bool = False
    slice_axis: int | None = None

    def __post_init__(self) -> None:
        nd = len(tuple(self.patch_size))
        set_ = object.__setattr__
        set_(self, "patch_size", _as_tuple(self.patch_size, nd, "patch_size"))
        set_(self, "valid_crop", _as_tuple(self.valid_crop or 0, nd, "valid_crop"))
        set_(self, "mirror_axes", tuple(int(a) for a in self.mirror_axes))
        if self.device is not None:
            set_(self, "device", torch.device(self.device))
        if any(t < 1 for t in self.tile):
            raise ValueError(f"valid_crop {self.valid_crop} leaves no output tile for patch {self.patch_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if any(a < 0 or a >= nd for a in self.mirror_axes):
            raise ValueError(f"mirror_axes {self.mirror_axes} must be spatial axes in [0, {nd})")
        if self.activation not in (None, "softmax", "sigmoid"):
            raise ValueError(f"activation must be None, 'softmax' or 'sigmoid', got {self.activation!r}")
        if self.slice_axis is not None and self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")

    @classmethod
    def for_network(cls, network: nn.Module, patch_size: Sequence[int], *, slice_axis: int | None = None,
                    **options) -> SlidingWindowInferer:
        """The inferer for ``network`` on ``patch_size`` (its valid-convolution crop read from the network's
        declared ``output_shape``): what training's validation and the Predictor both build.

        Args:
            network: a network built by :func:`medseg.networks.create_model`.
            patch_size: the configuration's patch.
            slice_axis: the configuration's slice axis for a 2D network on 3D data, else None.
            **options: the other fields (overlap, mirror_axes, batch_size, device, amp_dtype, activation).
        """
        from medseg.runtime import valid_crop

        crop = valid_crop(network, patch_size)
        return cls(patch_size=tuple(int(p) for p in patch_size), valid_crop=crop if any(crop) else None,
                   slice_axis=slice_axis, **options)

    @property
    def tile(self) -> tuple[int, ...]:
        """The output tile: the patch less the valid-convolution crop on both sides."""
        return tuple(p - 2 * c for p, c in zip(self.patch_size, self.valid_crop or ()))

    def __call__(self, network: nn.Module, image: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Predict a whole image.

        Args:
            network: any module mapping ``(B, C, *patch)`` to ``(B, K, *tile)`` (or a list whose first entry is
                that). Put it in eval mode and on ``device`` yourself (the engine does not change it).
            image: ``(C, *spatial)`` with as many spatial axes as the patch (one more with ``slice_axis``), on
                any device (windows are moved to ``device``).

        Returns:
            ``(K, *spatial)`` float32 tensor: the weighted average of the window outputs, on ``device`` (or the
            CPU when accumulating on the host).

        Raises:
            ValueError: the image's shape does not fit the configuration, or the network's output tile differs.
        """
        image_t = torch.as_tensor(image)
        nd = len(self.patch_size)
        if self.slice_axis is not None:
            if image_t.ndim != 4 or nd != 2:
                raise ValueError(f"slice-wise prediction needs a (C, X, Y, Z) image and a 2D patch, got image "
                                 f"shape {tuple(image_t.shape)} and patch {self.patch_size}")
            stack = image_t.movedim(self.slice_axis + 1, 0)  # (S, C, a, b): a view, no copy
            return self._predict_stack(network, stack).movedim(0, self.slice_axis + 1)
        if image_t.ndim != nd + 1:
            raise ValueError(f"image must be (C, *spatial) with {nd} spatial axes, got shape {tuple(image_t.shape)}")
        return self._predict_stack(network, image_t[None])[0]

    def _predict_stack(self, network: nn.Module, stack: torch.Tensor) -> torch.Tensor:
        """Over a stack ``(N, C, *spatial)`` of independent images of one shape; returns ``(N, K, *spatial)``.
        Out of device memory, retries with host accumulation, then with halved window batches."""
        device = self.device
        if device is None:
            param = next(iter(network.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        run = replace(self, device=device, accumulate_on_host=self.accumulate_on_host or device.type == "cpu")
        while True:
            try:
                return _run(network, stack, run)
            except torch.cuda.OutOfMemoryError:
                if run.accumulate_on_host and run.batch_size == 1:
                    raise
                new_bs = max(1, run.batch_size // 2) if run.accumulate_on_host else run.batch_size
                log.warning(
                    "out of memory on %s with %d windows per batch and %s accumulation; retrying with host "
                    "accumulation and %d windows per batch", device, run.batch_size,
                    "host" if run.accumulate_on_host else "device", new_bs,
                )
                run = replace(run, accumulate_on_host=True, batch_size=new_bs)
                if device.type == "cuda":
                    torch.cuda.empty_cache()


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
    """Predict a whole image with overlapping, Gaussian-weighted windows: :class:`SlidingWindowInferer` called once.

    Args:
        network, image: as for :meth:`SlidingWindowInferer.__call__`.
        patch_size, overlap, mirror_axes, batch_size, device, amp_dtype, valid_crop, activation,
            accumulate_on_host: the fields of :class:`SlidingWindowInferer`.

    Returns:
        ``(K, *spatial)`` float32 tensor.

    Raises:
        ValueError: inconsistent shapes or options.
    """
    inferer = SlidingWindowInferer(
        patch_size=tuple(patch_size), overlap=overlap, mirror_axes=tuple(mirror_axes), batch_size=batch_size,
        device=None if device is None else torch.device(device), amp_dtype=amp_dtype,
        valid_crop=None if valid_crop is None else _as_tuple(valid_crop, len(tuple(patch_size)), "valid_crop"),
        activation=activation, accumulate_on_host=accumulate_on_host)
    return inferer(network, image)


def sliding_window_predict_slices(
    network: nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    slice_axis: int = 2,
    patch_size: Sequence[int],
    **kwargs,
) -> torch.Tensor:
    """Predict a 3D image slice by slice with a 2D network (:class:`SlidingWindowInferer` with ``slice_axis``).

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
    if "valid_crop" in kwargs and kwargs["valid_crop"] is not None:
        kwargs["valid_crop"] = _as_tuple(kwargs["valid_crop"], len(tuple(patch_size)), "valid_crop")
    if "device" in kwargs and kwargs["device"] is not None:
        kwargs["device"] = torch.device(kwargs["device"])
    if "mirror_axes" in kwargs:
        kwargs["mirror_axes"] = tuple(kwargs["mirror_axes"])
    return SlidingWindowInferer(patch_size=tuple(patch_size), slice_axis=slice_axis, **kwargs)(network, image)


def _run(network: nn.Module, stack: torch.Tensor, inf: SlidingWindowInferer) -> torch.Tensor:
    patch, crop, tile, axes, device = inf.patch_size, inf.valid_crop, inf.tile, inf.mirror_axes, inf.device
    nd = len(patch)
    n_img, _, *spatial = stack.shape
    on_host = inf.accumulate_on_host
    acc_device = torch.device("cpu") if on_host else device
    src = stack if on_host else stack.to(device)
    # per-axis layout: output tiles on the image padded (centred) to at least the tile
    pad_lo = [max(t - s, 0) // 2 for s, t in zip(spatial, tile)]
    starts = [window_starts(s, t, inf.overlap) for s, t in zip(spatial, tile)]
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
    bs = inf.batch_size
    for b0 in range(0, len(windows), bs):
        chunk = windows[b0:b0 + bs]
        out = None
        amp = (torch.autocast(device.type, dtype=inf.amp_dtype) if inf.amp_dtype is not None
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
                if inf.activation == "softmax":
                    y = torch.softmax(y, 1)
                elif inf.activation == "sigmoid":
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
