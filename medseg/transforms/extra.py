"""Extra augmentation transforms named in a pipeline YAML, appended to the default chain.

``augmentation.extra`` is a list of ``{"name": <class name>, "kwargs": {...}}``: a random dictionary transform of
MONAI (``RandBiasFieldd``, ``RandCoarseDropoutd``, ...) or of medseg (:mod:`medseg.transforms.random`), built
from plain keyword arguments (``keys`` among ``image`` and ``label``). Names are looked up in ONE table
(:func:`transform_table`) with MONAI's ``look_up_option``, so a misspelt name fails when the configuration is
loaded, with a "did you mean" and the valid names. :func:`apply_extra` runs them per sample on a batch, seeded
from the batch's torch generator, so a seed still reproduces a run.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from typing import Any

import numpy as np

from medseg.errors import ConfigError

__all__ = ["transform_table", "validate_extra", "check_extra", "build_extra", "apply_extra"]

#: Keys of the dictionaries the extra transforms see: the patch and its label map.
DATA_KEYS = ("image", "label")

# shape- or channel-changing, or whole-batch transforms cannot be appended to a patch batch
_EXCLUDED = ("Crop", "GridPatch", "AddExtremePoints", "CutMix", "CutOut", "MixUp", "RandLambda")


@functools.lru_cache(maxsize=1)
def transform_table() -> dict[str, type]:
    """Class name -> class of every transform ``augmentation.extra`` may name.

    medseg's random transforms first, then MONAI's random dictionary transforms (canonical ``...d`` names, not
    their ``D``/``Dict`` aliases) that keep a patch's shape.
    """
    import monai.transforms as mt
    from monai.transforms import MapTransform, Randomizable

    from medseg.transforms import random as medseg_random

    table: dict[str, type] = {n: getattr(medseg_random, n) for n in medseg_random.__all__}
    for name in sorted(dir(mt)):
        cls = getattr(mt, name)
        if (isinstance(cls, type) and name.endswith("d") and issubclass(cls, MapTransform)
                and issubclass(cls, Randomizable) and not inspect.isabstract(cls)
                and not any(x in name for x in _EXCLUDED)):
            table.setdefault(name, cls)
    return table


def _lookup(name: Any, where: str) -> type:
    from monai.utils import look_up_option

    table = transform_table()
    try:
        return look_up_option(name, table, print_all_options=False)
    except ValueError as exc:
        match = re.search(r"did you mean '([^']+)'", str(exc))
        guess = f" (did you mean {match.group(1)!r}?)" if match else ""
        raise ConfigError(where, name, f"a random dictionary transform of medseg or MONAI{guess}; valid: "
                                       + ", ".join(sorted(table))) from None


def validate_extra(specs: Any) -> list[dict[str, Any]]:
    """Check ``augmentation.extra`` and build each transform once (so bad keyword arguments fail now).

    Returns:
        The specs as a list of ``{"name", "kwargs"}``.

    Raises:
        ConfigError: not a list of mappings, an unknown name (with a "did you mean"), ``keys`` missing or not
            among ``image``/``label``, or keyword arguments the transform does not accept.
    """
    if not isinstance(specs, (list, tuple)):
        raise ConfigError("augmentation.extra", specs, 'a list of {"name": ..., "kwargs": {...}}')
    out = []
    for i, spec in enumerate(specs):
        where = f"augmentation.extra[{i}]"
        if not isinstance(spec, dict) or set(spec) - {"name", "kwargs"} or "name" not in spec:
            raise ConfigError(where, spec, 'a mapping {"name": <transform class>, "kwargs": {...}}')
        cls = _lookup(spec["name"], f"{where}.name")
        kwargs = dict(spec.get("kwargs") or {})
        keys = kwargs.get("keys")
        keys = [keys] if isinstance(keys, str) else keys
        if not keys or any(k not in DATA_KEYS for k in keys):
            raise ConfigError(f"{where}.kwargs.keys", keys, "a list among 'image', 'label' (label only for "
                                                             "spatial transforms, with mode nearest)")
        try:
            cls(**kwargs)
        except Exception as exc:  # noqa: BLE001 - any constructor failure is a configuration error
            raise ConfigError(f"{where}.kwargs", kwargs, f"keyword arguments {spec['name']} accepts "
                                                         f"({type(exc).__name__}: {exc})") from None
        out.append({"name": spec["name"], "kwargs": kwargs})
    return out


def build_extra(specs: list[dict[str, Any]]) -> list[Any]:
    """New transform objects for ``specs`` (``augmentation.extra``).

    Raises:
        ConfigError: see :func:`validate_extra`.
    """
    return [transform_table()[s["name"]](**s["kwargs"]) for s in validate_extra(specs)]


@functools.lru_cache(maxsize=32)
def _cached(key: str) -> list[Any]:
    return build_extra(json.loads(key))


@functools.lru_cache(maxsize=32)
def _checked(key: str) -> None:
    validate_extra(json.loads(key))


def check_extra(specs: Any) -> None:
    """:func:`validate_extra`, done once per process for each spec list (``augment_batch`` checks every batch).

    Raises:
        ConfigError: see :func:`validate_extra`.
    """
    try:
        key = json.dumps(specs, sort_keys=True)
    except TypeError:  # not plain data: validate_extra names what is wrong
        validate_extra(specs)
        return
    _checked(key)


def apply_extra(image: Any, label: Any, specs: list[dict[str, Any]], generator: Any) -> tuple[Any, Any]:
    """Apply the ``specs`` transforms to each sample of a batch, seeded from ``generator``.

    Args:
        image: ``(B, C, *spatial)`` float tensor; label: ``(B, 1, *spatial)`` integer tensor or None.
        specs: ``augmentation.extra``.
        generator: the batch's torch generator; one number drawn from it seeds every transform of this batch.

    Returns:
        ``(image, label)`` on the input's device and dtypes.

    Raises:
        ConfigError: a transform changed a sample's shape.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Randomizable

    transforms = _cached(json.dumps(specs, sort_keys=True))  # built once per process, reseeded per batch
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
    state = np.random.RandomState(seed)
    for t in transforms:
        if isinstance(t, Randomizable):
            t.set_random_state(state=state)
    images, labels = [], []
    for i in range(image.shape[0]):
        d: dict[str, Any] = {"image": image[i]}
        if label is not None:
            d["label"] = label[i]
        for t in transforms:
            d = t(d)
        for key, out, ref in (("image", images, image), ("label", labels, label)):
            if ref is None:
                continue
            x = d[key]
            x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
            if tuple(x.shape) != tuple(ref.shape[1:]):
                raise ConfigError("augmentation.extra", [s["name"] for s in specs],
                                  f"transforms that keep the {key} shape {tuple(ref.shape[1:])} "
                                  f"(got {tuple(x.shape)})")
            if x.is_floating_point() and not ref.is_floating_point():
                x = x.round()  # a label map resampled by a MONAI transform comes back as float
            out.append(x.to(device=ref.device, dtype=ref.dtype))
    return torch.stack(images), (None if label is None else torch.stack(labels))
