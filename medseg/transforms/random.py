"""medseg's augmentations as MONAI dictionary transforms (``MapTransform`` + ``Randomizable``).

Each transform is one step of :func:`medseg.transforms.augment.augment_batch` -- it draws its own numbers and
calls the same function -- so it can stand in a MONAI ``Compose`` or be appended to medseg's chain by name
(``augmentation.extra``). A transform takes one sample ``(C, *spatial)`` as MONAI does, or a whole batch
``(B, C, *spatial)`` on any device (the GPU path) when built with ``batch=True`` or given a MONAI batch
(``MetaTensor.is_batch``). Randomness: ``set_random_state(seed)`` (MONAI's protocol) seeds a per-call torch
generator on the data's device, so a seed reproduces the output on CPU and on GPU alike. ``RandSpatiald``
resamples every key on ONE grid (label keys nearest), so image and label stay aligned.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from medseg.errors import ConfigError
from medseg.transforms import augment as aug

__all__ = ["RandSpatiald", "RandMirrord", "RandNoised", "RandBlurd", "RandBrightnessd", "RandContrastd",
           "RandLowResd", "RandGammad", "augmentation_transforms"]


def _range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(name, value, "a range [low, high]") from None
    if lo > hi:
        raise ConfigError(name, value, "a range [low, high] with low <= high")
    return lo, hi


def _prob(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(name, value, "a probability in [0, 1]")
    return float(value)


class _RandBatchd(Randomizable, MapTransform):
    """Shared protocol: samples or batches in, the same kind (and MetaTensor metadata) out."""

    def __init__(self, keys: KeysCollection, batch: bool = False, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.batch = bool(batch)
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def _draw(self, g: torch.Generator, b: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _apply(self, key: Hashable, x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        keys = list(self.key_iterator(out))
        self.randomize()
        if not keys:
            return out
        first = out[keys[0]]
        batched = self.batch or bool(getattr(first, "is_batch", False))
        tensors = {}
        for k in keys:
            t = out[k].as_tensor() if isinstance(out[k], MetaTensor) else torch.as_tensor(out[k])
            tensors[k] = t if batched else t[None]
        ref = tensors[keys[0]]
        g = torch.Generator(device=ref.device)
        g.manual_seed(self._seed)
        with aug.single_threaded() if ref.device.type == "cpu" else contextlib.nullcontext():
            draws = self._draw(g, ref.shape[0], ref)
            results = {k: self._apply(k, tensors[k], draws) for k in keys}
        for k in keys:
            y = results[k] if batched else results[k][0]
            if isinstance(out[k], MetaTensor):
                y = MetaTensor(y).copy_meta_from(out[k])
            out[k] = y
        return out


class _Intensityd(_RandBatchd):
    """An intensity step on float keys: ``prob`` per sample, a value drawn uniformly from ``value_range``."""

    _op: Any = None
    _param = "value"

    def __init__(self, keys: KeysCollection, prob: float, value_range: Sequence[float], batch: bool = False,
                 allow_missing_keys: bool = False):
        super().__init__(keys, batch, allow_missing_keys)
        name = type(self).__name__
        self.prob = _prob(f"{name}.prob", prob)
        self.value_range = _range(f"{name}.{self._param}", value_range)

    def _draw(self, g: torch.Generator, b: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"go": torch.rand(b, generator=g, device=g.device) < self.prob,
                "value": aug._uniform(g, b, *self.value_range)}

    def _apply(self, key: Hashable, x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        y = type(self)._op(x.to(torch.float32, copy=True), d["go"], d["value"])
        return y.to(x.dtype)


class RandSpatiald(_RandBatchd):
    """Rotation, scaling and elastic deformation through ONE sampling grid for every key (nnU-Net style).

    Args:
        keys: keys to resample (e.g. ``["image", "label"]``).
        mode: per key (or one for all) ``"bilinear"`` or ``"nearest"`` (label maps); default ``bilinear`` for
            every key except ``label``.
        prob_rotation, rotation_deg: per-sample probability and maximum angle (degrees) about each axis.
        prob_scale, scale: probability and zoom range (``> 1`` zooms in).
        prob_elastic, elastic_magnitude, elastic_grid: probability, displacement (voxels) and control grid size.
        batch: the values are whole batches ``(B, C, *spatial)``.
    """

    def __init__(self, keys: KeysCollection, mode: str | Sequence[str] | None = None, prob_rotation: float = 0.2,
                 rotation_deg: float = 30.0, prob_scale: float = 0.2, scale: Sequence[float] = (0.7, 1.4),
                 prob_elastic: float = 0.0, elastic_magnitude: float = 3.0, elastic_grid: int = 4,
                 batch: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, batch, allow_missing_keys)
        if mode is None:
            modes = ["nearest" if k == "label" else "bilinear" for k in self.keys]
        else:
            modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys) or any(m not in ("bilinear", "nearest") for m in modes):
            raise ConfigError("RandSpatiald.mode", mode,
                              f"'bilinear' or 'nearest', one or one per key {self.keys}")
        self.mode = dict(zip(self.keys, modes))
        self.prob_rotation = _prob("RandSpatiald.prob_rotation", prob_rotation)
        self.prob_scale = _prob("RandSpatiald.prob_scale", prob_scale)
        self.prob_elastic = _prob("RandSpatiald.prob_elastic", prob_elastic)
        self.rotation_deg, self.scale = float(rotation_deg), _range("RandSpatiald.scale", scale)
        self.elastic_magnitude, self.elastic_grid = float(elastic_magnitude), int(elastic_grid)

    def _draw(self, g: torch.Generator, b: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dims = x.ndim - 2
        r_rot, r_scale, r_el = (torch.rand(b, generator=g, device=g.device) for _ in range(3))
        angles = (torch.rand(b, 3, generator=g, device=g.device) * 2 - 1) * math.radians(self.rotation_deg)
        scales = aug._uniform(g, b, *self.scale)
        coarse = torch.randn(b, dims, *([self.elastic_grid] * dims), generator=g, device=g.device)
        dev = x.device
        sel, grid = aug.spatial_grid(x.shape[2:], angles, scales, coarse, (r_rot < self.prob_rotation).to(dev),
                                   (r_scale < self.prob_scale).to(dev), (r_el < self.prob_elastic).to(dev),
                                   self.elastic_magnitude)
        return {"sel": sel, "grid": grid}

    def _apply(self, key: Hashable, x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        y = x.clone()
        if d["grid"] is not None:
            nearest = self.mode[key] == "nearest"
            src = y[d["sel"]] if nearest else y[d["sel"]].to(torch.float32)
            y[d["sel"]] = aug.resample(src, d["grid"], nearest=nearest).to(y.dtype)
        return y


class RandMirrord(_RandBatchd):
    """Flip every key along each of ``spatial_axes`` (None: all) with probability ``prob`` per sample and axis."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, spatial_axes: Sequence[int] | None = None,
                 batch: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, batch, allow_missing_keys)
        self.prob = _prob("RandMirrord.prob", prob)
        self.spatial_axes = None if spatial_axes is None else [int(a) for a in spatial_axes]

    def _draw(self, g: torch.Generator, b: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dims = x.ndim - 2
        return {"flips": (torch.rand(b, dims, generator=g, device=g.device) < self.prob).to(x.device)}

    def _apply(self, key: Hashable, x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        axes = list(range(x.ndim - 2)) if self.spatial_axes is None else self.spatial_axes
        return aug.mirror(x.clone(), d["flips"], axes)


class RandNoised(_Intensityd):
    """Add Gaussian noise of standard deviation drawn from ``std`` with probability ``prob``."""

    _param = "std"

    def __init__(self, keys: KeysCollection, prob: float = 0.1, std: Sequence[float] = (0.0, 0.1),
                 batch: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, prob, std, batch, allow_missing_keys)

    def _draw(self, g: torch.Generator, b: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        d = super()._draw(g, b, x)
        d["noise"] = torch.randn(x.shape, generator=g, device=g.device)
        return d

    def _apply(self, key: Hashable, x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        noise = d["noise"] if d["noise"].shape == x.shape else d["noise"][:, :1].expand(x.shape)
        return aug.add_noise(x.to(torch.float32), d["go"], noise, d["value"]).to(x.dtype)


class RandBlurd(_Intensityd):
    """Gaussian blur of width drawn from ``sigma`` (voxels) with probability ``prob``."""

    _op, _param = staticmethod(aug.blur), "sigma"

    def __init__(self, keys: KeysCollection, prob: float = 0.2, sigma: Sequence[float] = (0.5, 1.0),
                 batch: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, prob, sigma, batch, allow_missing_keys)


class RandBrightnessd(_Intensityd):
    """Multiply by a factor drawn from ``factor`` with probability ``prob``."""

    _op, _param = staticmethod(aug.brightness), "factor"

    def __init__(self, keys: KeysCollection, prob: float = 0.15, factor: Sequence[float] = (0.75, 1.25),
                 batch: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, prob, factor, batch, allow_missing_keys)


class RandContrastd(_Intensityd):
    """Scale about the sample's mean by a factor drawn from ``factor`` (clipped to the former range)."""

    _op, _param = staticmethod(aug.contrast), "factor"

    def __init__(self, keys: KeysCollection, prob: float = 0.15, factor: Sequence[float] = (0.75, 1.25),
                 batch: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, prob, factor, batch, allow_missing_keys)


class RandLowResd(_Intensityd):
    """Simulate low resolution: down by a factor drawn from ``zoom`` (nearest), back up (linear)."""

    _op, _param = staticmethod(aug.lowres), "zoom"

    def __init__(self, keys: KeysCollection, prob: float = 0.25, zoom: Sequence[float] = (0.5, 1.0),
                 batch: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, prob, zoom, batch, allow_missing_keys)


class RandGammad(_Intensityd):
    """Gamma drawn from ``gamma`` on the sample's range (of the negated image with ``prob_invert``), keeping its
    mean and standard deviation."""

    _param = "gamma"

    def __init__(self, keys: KeysCollection, prob: float = 0.3, gamma: Sequence[float] = (0.7, 1.5),
                 prob_invert: float = 0.1, batch: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, prob, gamma, batch, allow_missing_keys)
        self.prob_invert = _prob("RandGammad.prob_invert", prob_invert)

    def _draw(self, g: torch.Generator, b: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        d = super()._draw(g, b, x)
        d["invert"] = torch.rand(b, generator=g, device=g.device) < self.prob_invert
        return d

    def _apply(self, key: Hashable, x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return aug.gamma(x.to(torch.float32, copy=True), d["go"], d["value"], d["invert"]).to(x.dtype)


def augmentation_transforms(params: dict[str, Any] | None = None, *, image_key: str = "image",
                            label_key: str | None = "label", batch: bool = False) -> list[Any]:
    """The chain of :func:`~medseg.transforms.augment.augment_batch` as dictionary transforms, for a ``Compose``.

    Args:
        params: overrides of :data:`~medseg.transforms.augment.DEFAULT_AUGMENTATION` (``extra`` entries are
            appended, built by name).
        image_key, label_key: the keys (label_key None: image only).
        batch: the dictionaries hold whole batches.

    Returns:
        ``[RandSpatiald, RandMirrord, RandNoised, RandBlurd, RandBrightnessd, RandContrastd, RandLowResd,
        RandGammad, *extra]`` with the configuration's probabilities and ranges.

    Raises:
        ConfigError: invalid parameters (see :func:`~medseg.transforms.augment.resolve_params`).
    """
    p = aug.resolve_params(params)
    both = [image_key] if label_key is None else [image_key, label_key]
    mode = ["bilinear"] + ([] if label_key is None else ["nearest"])
    chain: list[Any] = [
        RandSpatiald(both, mode=mode, prob_rotation=p["p_rotation"], rotation_deg=p["rotation_deg"],
                     prob_scale=p["p_scale"], scale=p["scale"], prob_elastic=p["p_elastic"],
                     elastic_magnitude=p["elastic_magnitude"], elastic_grid=p["elastic_grid"], batch=batch),
        RandMirrord(both, prob=p["p_mirror"], spatial_axes=p["mirror_axes"], batch=batch),
        RandNoised(image_key, prob=p["p_noise"], std=p["noise_std"], batch=batch),
        RandBlurd(image_key, prob=p["p_blur"], sigma=p["blur_sigma"], batch=batch),
        RandBrightnessd(image_key, prob=p["p_brightness"], factor=p["brightness"], batch=batch),
        RandContrastd(image_key, prob=p["p_contrast"], factor=p["contrast"], batch=batch),
        RandLowResd(image_key, prob=p["p_lowres"], zoom=p["lowres"], batch=batch),
        RandGammad(image_key, prob=p["p_gamma"], gamma=p["gamma"], prob_invert=p["p_gamma_invert"], batch=batch),
    ]
    if p["extra"]:
        if batch:
            raise ConfigError("augmentation.extra", p["extra"], "no extra transforms with batch=True (MONAI "
                                                                "transforms take one sample at a time)")
        from medseg.transforms.extra import build_extra

        chain += build_extra(p["extra"])
    return chain
