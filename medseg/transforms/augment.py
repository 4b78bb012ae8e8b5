"""Batch augmentation in torch, on whatever device the batch lives (GPU when present, else CPU).

``augment_batch(image, label, params, generator)`` applies, per sample with its own random parameters:
spatial (rotation, scaling, elastic deformation) through ONE sampling grid shared by image and label
(``F.affine_grid`` + ``F.grid_sample``: image linear, label nearest, mirrored borders for both), mirroring,
then intensity (noise, blur, brightness, contrast, low-resolution simulation, gamma) on the image only, then
the ``extra`` transforms of the configuration (MONAI or medseg dictionary transforms, see
:mod:`medseg.transforms.extra`). All randomness comes from ``generator`` (a ``torch.Generator`` seeded from
(seed, fold, epoch, worker)), so the same generator state gives the same batch.

Each step is one function over a batch and its per-sample draws (``spatial_grid``/``resample``, ``mirror``,
``add_noise``, ``blur``, ``brightness``, ``contrast``, ``lowres``, ``gamma``): ``augment_batch`` draws every
number in one fixed order and calls them; the MONAI-protocol transforms of :mod:`medseg.transforms.random`
draw their own and call the same functions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_AUGMENTATION", "augment_batch", "resolve_params", "make_generator", "single_threaded",
           "spatial_grid", "resample", "mirror", "add_noise", "blur", "brightness", "contrast", "lowres", "gamma"]

#: nnU-Net-like defaults; ``p_*`` are per-sample probabilities.
DEFAULT_AUGMENTATION: dict[str, Any] = {
    "p_rotation": 0.2, "rotation_deg": 30.0,
    "p_scale": 0.2, "scale": [0.7, 1.4],
    "p_elastic": 0.0, "elastic_magnitude": 3.0, "elastic_grid": 4,
    "mirror_axes": None,  # None: every spatial axis; [] disables mirroring
    "p_mirror": 0.5,
    "p_noise": 0.1, "noise_std": [0.0, 0.1],
    "p_blur": 0.2, "blur_sigma": [0.5, 1.0],
    "p_brightness": 0.15, "brightness": [0.75, 1.25],
    "p_contrast": 0.15, "contrast": [0.75, 1.25],
    "p_lowres": 0.25, "lowres": [0.5, 1.0],
    "p_gamma": 0.3, "gamma": [0.7, 1.5], "p_gamma_invert": 0.1,
    "extra": [],  # further transforms appended to the chain: [{"name": "RandBiasFieldd", "kwargs": {...}}, ...]
}


def resolve_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with ``params``.

    Raises:
        ConfigError: an unknown key (a typo would otherwise silently keep the default), or an ``extra`` entry
            that names no known transform or gives it invalid keyword arguments.
    """
    from medseg.errors import ConfigError

    out = dict(DEFAULT_AUGMENTATION)
    for k, v in (params or {}).items():
        if k not in out:
            raise ConfigError(f"augmentation.{k}", v, f"one of {sorted(out)}")
        out[k] = v
    if out["extra"]:
        from medseg.transforms.extra import check_extra

        check_extra(out["extra"])
    return out


def make_generator(seed: int, fold: int, epoch: int, worker: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from ``numpy.random.SeedSequence([seed, fold, epoch, worker])``."""
    import numpy as np

    state = np.random.SeedSequence([int(seed), int(fold), int(epoch), int(worker)]).generate_state(2, np.uint64)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0] % (2**63 - 1)))
    return g


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One torch intra-op thread inside the block (restored after).

    Patch-sized ops gain little from intra-op threads, and on a busy CPU OpenMP spinning makes them up to 10x
    slower; DataLoader workers are single-threaded already, the main process is limited here.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def _rotation(angles: torch.Tensor, dims: int) -> torch.Tensor:
    """(B, dims, dims) rotation matrices; angles (B, 3) radians (3D: about axes 0, 1, 2; 2D: first angle)."""
    b = angles.shape[0]
    if dims == 2:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        return torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)
    mats = []
    for ax in range(3):
        c, s = torch.cos(angles[:, ax]), torch.sin(angles[:, ax])
        m = torch.eye(3, device=angles.device).repeat(b, 1, 1)
        i, j = [a for a in range(3) if a != ax]
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one sample (C, *spatial), mirrored borders."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    dims = x.ndim - 1
    conv = F.conv3d if dims == 3 else F.conv2d
    y = x[:, None]  # (C, 1, *spatial)
    for ax in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + ax] = k.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - ax)] = pad[2 * (dims - 1 - ax) + 1] = radius
        size = y.shape[2 + ax]
        mode = "reflect" if size > radius else "replicate"
        y = conv(F.pad(y, pad, mode=mode), k.view(shape))
    return y[:, 0]


def spatial_grid(size: tuple[int, ...] | torch.Size, angles: torch.Tensor, scales: torch.Tensor,
                 coarse: torch.Tensor, do_rot: torch.Tensor, do_scale: torch.Tensor, do_el: torch.Tensor,
                 elastic_magnitude: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The samples that change and ONE sampling grid for them (rotation, scaling, elastic), for every key.

    Args:
        size: spatial shape of the batch.
        angles: ``(B, 3)`` radians; scales: ``(B,)``; coarse: ``(B, dims, g, ...)`` elastic control displacements
            in voxels (before ``elastic_magnitude``); do_rot, do_scale, do_el: ``(B,)`` booleans.
        elastic_magnitude: displacement scale in voxels.

    Returns:
        ``(sel, grid)``: indices of the changed samples and their ``F.grid_sample`` grid (None when none change).
    """
    dims = len(size)
    dev = do_rot.device
    sel = torch.nonzero(do_rot | do_scale | do_el).flatten()  # resample only the samples that change
    if not sel.numel():
        return sel, None
    n = int(sel.numel())
    ang = (angles.to(dev) * do_rot[:, None])[sel]
    if dims == 2:
        ang = ang.clone()
        ang[:, 1:] = 0
    sc = torch.where(do_scale, scales.to(dev), torch.ones_like(scales.to(dev)))[sel]
    m = _rotation(ang, dims) / sc[:, None, None]
    half = torch.tensor([s / 2.0 for s in size], device=dev)
    m = m * half[None, None, :] / half[None, :, None]  # D^-1 M D: voxel-space map in normalised coordinates
    rev = list(range(dims))[::-1]  # affine_grid wants (x, y, z) = reversed array axes
    theta = torch.zeros(n, dims, dims + 1, device=dev)
    theta[:, :, :dims] = m[:, rev][:, :, rev]
    grid = F.affine_grid(theta, [n, 1, *size], align_corners=False)
    el = do_el[sel]
    if bool(el.any()):
        mode = "trilinear" if dims == 3 else "bilinear"
        disp = F.interpolate(coarse.to(dev)[sel], size=tuple(size), mode=mode, align_corners=True)
        disp = disp * float(elastic_magnitude) / half.view(1, dims, *([1] * dims))  # voxels -> normalised
        disp = disp[:, rev] * el.view(n, 1, *([1] * dims))
        grid = grid + disp.movedim(1, -1)
    return sel, grid


def resample(x: torch.Tensor, grid: torch.Tensor, *, nearest: bool) -> torch.Tensor:
    """Sample ``x`` (N, C, *spatial) on ``grid`` with mirrored borders: linear, or nearest for label maps."""
    if nearest:
        return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="reflection",
                             align_corners=False).round().to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def mirror(x: torch.Tensor, flips: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """Flip sample ``i`` of ``x`` (B, C, *spatial) along spatial axis ``ax`` where ``flips[i, ax]`` (in place)."""
    for ax in axes:
        sel = flips[:, ax]
        if bool(sel.any()):
            x[sel] = x[sel].flip(2 + ax)
    return x


def _view(img: torch.Tensor) -> tuple[int, ...]:
    return (img.shape[0],) + (1,) * (img.ndim - 1)


def add_noise(img: torch.Tensor, go: torch.Tensor, noise: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``img + noise * std`` on the samples where ``go`` (B,) holds."""
    dev, view = img.device, _view(img)
    return img + noise.to(dev) * std.to(dev).view(view) * go.to(dev).view(view)


def blur(img: torch.Tensor, go: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of width ``sigma[i]`` voxels on the samples where ``go`` holds (in place)."""
    for i in torch.nonzero(go).flatten().tolist():
        img[i] = _gaussian_blur(img[i], float(sigma[i]))
    return img


def brightness(img: torch.Tensor, go: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply the samples where ``go`` holds by ``factor``."""
    dev, view = img.device, _view(img)
    return torch.where(go.to(dev).view(view), img * factor.to(dev).view(view), img)


def contrast(img: torch.Tensor, go: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale each selected sample about its mean by ``factor``, clipped to its former range."""
    dev, view = img.device, _view(img)
    sel = go.to(dev).view(view)
    if not bool(sel.any()):
        return img
    red = tuple(range(2, img.ndim))
    mean = img.mean(dim=red, keepdim=True)
    lo, hi = img.amin(dim=red, keepdim=True), img.amax(dim=red, keepdim=True)
    contrasted = torch.minimum(torch.maximum((img - mean) * factor.to(dev).view(view) + mean, lo), hi)
    return torch.where(sel, contrasted, img)


def lowres(img: torch.Tensor, go: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Simulate low resolution on the selected samples: nearest down to ``factor`` of the size, linear up
    (in place)."""
    size = img.shape[2:]
    mode = "trilinear" if len(size) == 3 else "bilinear"
    for i in torch.nonzero(go).flatten().tolist():
        small = [max(1, int(round(s * float(factor[i])))) for s in size]
        low = F.interpolate(img[i : i + 1], size=small, mode="nearest")
        img[i] = F.interpolate(low, size=tuple(size), mode=mode, align_corners=False)[0]
    return img


def gamma(img: torch.Tensor, go: torch.Tensor, value: torch.Tensor, invert: torch.Tensor) -> torch.Tensor:
    """Gamma ``value[i]`` on the selected samples' [min, max] range (of the negated image where ``invert[i]``),
    keeping each sample's mean and standard deviation (in place)."""
    for i in torch.nonzero(go).flatten().tolist():
        x = img[i]
        inv = bool(invert[i])
        x = -x if inv else x
        mean, std = x.mean(), x.std()
        lo, rng = x.min(), (x.max() - x.min()).clamp_min(1e-7)
        x = ((x - lo) / rng) ** float(value[i]) * rng + lo
        x = (x - x.mean()) / x.std().clamp_min(1e-7) * std + mean  # keep the sample's statistics
        img[i] = -x if inv else x
    return img


def augment_batch(
    image: torch.Tensor, label: torch.Tensor | None, params: dict[str, Any] | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a whole batch; spatial changes are identical for image and label.

    Args:
        image: float tensor ``(B, C, *spatial)`` (2 or 3 spatial axes), on any device.
        label: integer tensor ``(B, 1, *spatial)`` or None.
        params: overrides of :data:`DEFAULT_AUGMENTATION` (None = defaults).
        generator: source of all randomness; its device must be the batch's device type.

    Returns:
        ``(image, label)`` new tensors of the same shapes and dtypes.

    Raises:
        ConfigError: unknown parameter names, or an ``extra`` transform that changes the patch shape.
    """
    p = resolve_params(params)
    g = generator
    dev = image.device
    b, dims = image.shape[0], image.ndim - 2
    img = image.to(torch.float32, copy=True)  # never modify the caller's tensors
    lab = None if label is None else label.clone()

    # ---- draw every random number in a fixed order (reproducible whatever is enabled)
    r_rot, r_scale, r_el = (torch.rand(b, generator=g, device=g.device) for _ in range(3))
    angles = (torch.rand(b, 3, generator=g, device=g.device) * 2 - 1) * math.radians(p["rotation_deg"])
    scales = _uniform(g, b, *p["scale"])
    coarse = torch.randn(b, dims, *([int(p["elastic_grid"])] * dims), generator=g, device=g.device)
    r_mirror = torch.rand(b, max(dims, 1), generator=g, device=g.device)
    draws = {k: (torch.rand(b, generator=g, device=g.device), _uniform(g, b, *p[k]))
             for k in ("noise_std", "blur_sigma", "brightness", "contrast", "lowres", "gamma")}
    noise = torch.randn(img.shape, generator=g, device=g.device) if p["p_noise"] > 0 else None
    r_invert = torch.rand(b, generator=g, device=g.device)

    # ---- spatial: one grid for image and label
    sel, grid = spatial_grid(img.shape[2:], angles, scales, coarse, (r_rot < p["p_rotation"]).to(dev),
                             (r_scale < p["p_scale"]).to(dev), (r_el < p["p_elastic"]).to(dev),
                             p["elastic_magnitude"])
    if grid is not None:
        img[sel] = resample(img[sel], grid, nearest=False)
        if lab is not None:
            lab[sel] = resample(lab[sel], grid, nearest=True)

    # ---- mirroring
    axes = list(range(dims)) if p["mirror_axes"] is None else [int(a) for a in p["mirror_axes"]]
    if axes:
        flips = (r_mirror < p["p_mirror"]).to(dev)
        img = mirror(img, flips, axes)
        if lab is not None:
            lab = mirror(lab, flips, axes)

    # ---- intensity (image only)
    if noise is not None:
        go, val = draws["noise_std"]
        img = add_noise(img, go < p["p_noise"], noise, val)
    go, val = draws["blur_sigma"]
    img = blur(img, go < p["p_blur"], val)
    go, val = draws["brightness"]
    img = brightness(img, go < p["p_brightness"], val)
    go, val = draws["contrast"]
    img = contrast(img, go < p["p_contrast"], val)
    go, val = draws["lowres"]
    img = lowres(img, go < p["p_lowres"], val)
    go, val = draws["gamma"]
    img = gamma(img, go < p["p_gamma"], val, r_invert < p["p_gamma_invert"])

    # ---- extra transforms of the configuration, seeded from the same generator
    if p["extra"]:
        from medseg.transforms.extra import apply_extra

        img, lab = apply_extra(img, lab, p["extra"], g)
    return img.to(image.dtype), lab
