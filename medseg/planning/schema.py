"""The typed plan: :class:`Plan`, its :class:`Configuration` s, :class:`Normalization` and :class:`NetworkSpec`.

A plan is written as JSON (``plan.json``) and read back by one loader, :meth:`Plan.from_dict`, that validates every
field and migrates older files (``version: 1``, written before this schema, carried no ``schema_version``). Every
default lives here, in the dataclass fields; no other module supplies one with ``dict.get``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.data.regions import Region
from medseg.errors import InputError

__all__ = ["SCHEMA_VERSION", "NORMALIZATION_SCHEMES", "NetworkSpec", "Normalization", "Configuration", "Plan"]

#: Version of the plan and model-record JSON written by this release (1: the first release's plan.json).
SCHEMA_VERSION = 2
NORMALIZATION_SCHEMES = ("ct", "zscore", "zscore_nonzero", "none")


class _Reader:
    """Typed access to one JSON object, with errors naming the file and the key."""

    def __init__(self, data: Any, source: str | Path | None, where: str):
        if not isinstance(data, Mapping):
            raise InputError(source, f"{where or 'the file'} is not a JSON object", "a plan written by medseg")
        self.data, self.source, self.where = data, source, where

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _bad(self, key: str, expected: str) -> InputError:
        return InputError(self.source, f"{self._key(key)} = {self.data.get(key)!r} is invalid", expected)

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is dataclasses.MISSING:
                raise InputError(self.source, f"lacks {self._key(key)}", "a complete file written by medseg")
            return default
        return self.data[key]

    def int(self, key: str, default: Any = dataclasses.MISSING, minimum: int | None = None) -> int:
        v = self.raw(key, default)
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            raise self._bad(key, "an integer" + (f" >= {minimum}" if minimum is not None else ""))
        return int(v)

    def float(self, key: str, default: Any = dataclasses.MISSING) -> float | None:
        v = self.raw(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(key, "a number")
        return float(v)

    def str(self, key: str, default: Any = dataclasses.MISSING) -> str:
        v = self.raw(key, default)
        if v is None:
            return v
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def bool(self, key: str, default: Any = dataclasses.MISSING) -> bool:
        v = self.raw(key, default)
        if v is None:
            return v
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def ints(self, key: str, default: Any = dataclasses.MISSING) -> list[int]:
        v = self.raw(key, default)
        if v is None:
            return v
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise self._bad(key, "a list of integers")
        return [int(x) for x in v]

    def sub(self, key: str) -> _Reader:
        return _Reader(self.raw(key), self.source, self._key(key))


@dataclass
class NetworkSpec:
    """A network as the registry builds it: ``create_model(name, **kwargs)`` (kwargs may include the reserved
    ``spatial_dims``/``in_channels``/``out_channels``, which the model record supplies when rebuilding)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None, where: str = "network") -> NetworkSpec:
        r = _Reader(data, source, where)
        kwargs = r.raw("kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise r._bad("kwargs", "a mapping of network options")
        return cls(r.str("name"), dict(kwargs))


@dataclass
class Normalization:
    """How one image channel is normalised (see :func:`medseg.transforms.preprocess.normalize`).

    ``ct``: clip to ``clip`` then subtract ``mean`` and divide by ``std`` (data-set foreground statistics);
    ``zscore``: per case; ``zscore_nonzero``: per case inside the nonzero mask, zero outside; ``none``.
    """

    scheme: str
    mean: float = 0.0
    std: float = 1.0
    clip: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "mean": self.mean, "std": self.std, "clip": self.clip}

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None, where: str = "normalization") -> Normalization:
        r = _Reader(data, source, where)
        scheme = r.str("scheme")
        if scheme == "zscore" and r.bool("use_nonzero_mask", False):  # version 1 spelled it as a flag
            scheme = "zscore_nonzero"
        if scheme not in NORMALIZATION_SCHEMES:
            raise r._bad("scheme", "one of " + ", ".join(NORMALIZATION_SCHEMES))
        clip = r.raw("clip", None)
        if scheme == "ct":
            if not (isinstance(clip, list) and len(clip) == 2):
                raise r._bad("clip", "[low, high] for the ct scheme")
            clip = [float(clip[0]), float(clip[1])]
        else:
            clip = None
        return cls(scheme, float(r.float("mean", 0.0)), float(r.float("std", 1.0)), clip)


FRAMES = ("ras", "acquisition")


def _frame_of(r: _Reader) -> str:
    frame = r.str("frame", "ras")
    if frame not in FRAMES:
        raise r._bad("frame", "one of " + ", ".join(FRAMES))
    return frame


@dataclass
class Configuration:
    """One way to train and predict a data set (``3d_fullres``, ``2d``, ...).

    Attributes:
        spacing: target spacing per axis of the data (``None`` on the slice axis of a slice-wise configuration).
        patch_size: network input patch (2 entries for 2D networks, also for slice-wise 3D data).
        batch_size: patches per training batch.
        network: the network to build.
        mirror_axes: patch axes flipped by training augmentation and test-time mirroring (the same axes).
        slicewise: a 2D network over the slices of 3D data.
        slice_axis: the data axis that slices are taken across (slice-wise only).
        median_shape, pools_per_axis, estimated_memory_gb: what the planner saw and decided (informative).
        frame: the voxel frame of ``spacing``, ``patch_size`` and the network's axes: ``"ras"`` (RAS-reoriented
            voxel axes, every case alike) or ``"acquisition"`` (added in schema 2, default ``"ras"``: each case's
            RAS axes permuted by :func:`medseg.planning.plan.acquisition_permutation` of its own spacing, its
            coarse axis last; planned when the cases of a data set are coarse along different RAS axes).
        previous_stage: a cascade stage's previous configuration (``3d_cascade_fullres``: ``"3d_lowres"``), whose
            prediction, brought into this configuration's plan space, enters the network as one extra input channel
            per foreground class (one-hot); None for every other configuration.
    """

    spacing: list[float | None]
    patch_size: list[int]
    batch_size: int
    network: NetworkSpec
    mirror_axes: list[int] = field(default_factory=list)
    slicewise: bool = False
    slice_axis: int | None = None
    median_shape: list[int] = field(default_factory=list)
    pools_per_axis: list[int] = field(default_factory=list)
    estimated_memory_gb: float | None = None
    frame: str = "ras"
    previous_stage: str | None = None

    @property
    def network_dims(self) -> int:
        """Spatial dimensions of the network: the number of patch axes (2 for slice-wise 3D data)."""
        return len(self.patch_size)

    def network_in_channels(self, in_channels: int, num_classes: int) -> int:
        """Input channels of this configuration's network: the image channels, plus one per foreground class of
        the previous stage's prediction in a cascade stage."""
        return int(in_channels) + (int(num_classes) - 1 if self.previous_stage else 0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["network"] = self.network.to_dict()
        if d["previous_stage"] is None:  # written only by cascade stages (older readers never see the key)
            del d["previous_stage"]
        return d

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None, where: str = "configuration") -> Configuration:
        r = _Reader(data, source, where)
        spacing = r.raw("spacing")
        if not isinstance(spacing, list) or any(s is not None and (isinstance(s, bool) or
                                                                   not isinstance(s, (int, float)) or s <= 0)
                                                for s in spacing):
            raise r._bad("spacing", "a list of positive numbers (null on a slice axis)")
        patch = r.ints("patch_size")
        if not 2 <= len(patch) <= 3 or min(patch) < 1:
            raise r._bad("patch_size", "2 or 3 positive integers")
        slicewise = r.bool("slicewise", False)
        slice_axis = r.int("slice_axis", None) if slicewise else None
        if slicewise and slice_axis is None:
            slice_axis = 2  # version 1 plans of the first release always wrote it; 2 was its only default
        mirror = r.ints("mirror_axes", list(range(len(patch))))
        if any(not 0 <= a < len(patch) for a in mirror):
            raise r._bad("mirror_axes", f"axes of the {len(patch)}D patch, in [0, {len(patch)})")
        return cls(
            spacing=[None if s is None else float(s) for s in spacing],
            patch_size=patch,
            batch_size=r.int("batch_size", minimum=1),
            network=NetworkSpec.from_dict(r.raw("network"), source, r._key("network")),
            mirror_axes=sorted(set(mirror)),
            slicewise=slicewise,
            slice_axis=slice_axis,
            median_shape=r.ints("median_shape", []),
            pools_per_axis=r.ints("pools_per_axis", []),
            estimated_memory_gb=r.float("estimated_memory_gb", None),
            frame=_frame_of(r),
            previous_stage=r.str("previous_stage", None),
        )


@dataclass
class Plan:
    """A data set's plan: what preprocessing, training and inference need, with one entry per configuration.

    Attributes:
        dataset: the data set's name.
        spatial_dims: 2 or 3 (of the data).
        in_channels: image channels.
        num_classes: network outputs (background included).
        labels: ``{class index: name}``.
        normalization: one entry per channel.
        configurations: ``{name: Configuration}``.
        device, memory_gb: what the plan was sized for.
        fingerprint: the data set fingerprint's summary (informative; ``manifest_hash`` keys the cache).
        label_values: the label value in the data's files of each class index (``label_values[k]`` is written
            for class ``k``; e.g. ``[0, 200, 500, 600]``); default: the class indices themselves.
        ignore_value: the label value of unlabelled voxels (dataset.json's ignore label), or None. Not a class:
            the preprocessed cache holds it as class index :attr:`ignore_index` (= ``num_classes``), which the
            losses, the patch sampler and validation leave out.
        regions: the data set's regions (:class:`~medseg.data.regions.Region`: name, label values, painted
            value), or empty. With regions the network has one sigmoid output per region (:attr:`out_channels`),
            while the cache keeps the integer class indices of ``label_values``.
        explain: ``{choice: the fact that decided it}`` for ``medseg plan --explain``.
    """

    dataset: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    labels: dict[int, str]
    normalization: list[Normalization]
    configurations: dict[str, Configuration]
    device: str = "cpu"
    memory_gb: float | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    label_values: list[int] = field(default_factory=list)
    explain: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    ignore_value: int | None = None
    regions: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        if not self.label_values:
            self.label_values = list(range(self.num_classes))
        self.regions = tuple(self.regions)

    @property
    def out_channels(self) -> int:
        """Network outputs: one per region with regions, else one per class (background included)."""
        return len(self.regions) if self.regions else self.num_classes

    def region_classes(self) -> list[tuple[int, ...]]:
        """The class indices (cache values) of each region, in order; empty without regions."""
        index = {int(v): k for k, v in enumerate(self.label_values)}
        return [tuple(index[v] for v in r.values) for r in self.regions]

    @property
    def ignore_index(self) -> int | None:
        """The class index of ignored voxels in preprocessed labels (``num_classes``), or None without one."""
        return None if self.ignore_value is None else self.num_classes

    def configuration(self, name: str) -> Configuration:
        """The configuration ``name``.

        Raises:
            ConfigError: the plan has no such configuration (the message lists those it has).
        """
        from medseg.errors import ConfigError

        if name not in self.configurations:
            raise ConfigError("configuration", name, "one of " + ", ".join(sorted(self.configurations)))
        return self.configurations[name]

    def data_configuration(self, name: str) -> str:
        """The configuration whose preprocessed cache ``name`` trains on: ``name`` itself, except for a cascade
        stage, which shares the cache of the configuration with its spacing and frame (``3d_fullres``).

        Raises:
            ConfigError: the plan has no such configuration.
        """
        conf = self.configuration(name)
        if conf.previous_stage:
            for other, c in self.configurations.items():
                if (not c.previous_stage and c.spacing == conf.spacing and c.frame == conf.frame
                        and c.slicewise == conf.slicewise and c.slice_axis == conf.slice_axis):
                    return other
        return name

    def with_configuration(self, name: str, conf: Configuration) -> Plan:
        """A copy holding only ``name`` = ``conf`` (what a trained model's record keeps)."""
        return dataclasses.replace(self, configurations={name: conf})

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "device": self.device,
            "memory_gb": self.memory_gb,
            "normalization": [n.to_dict() for n in self.normalization],
            "configurations": {k: c.to_dict() for k, c in self.configurations.items()},
            "label_values": list(self.label_values),
            **({} if self.ignore_value is None else {"ignore_value": int(self.ignore_value)}),
            **({"regions": [r.to_dict() for r in self.regions]} if self.regions else {}),
            "explain": dict(self.explain),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None, where: str = "") -> Plan:
        """Validate (and migrate) a plan read from JSON.

        Raises:
            InputError: a newer or unknown version, a missing key or a value of the wrong type.
        """
        r = _Reader(data, source, where)
        version = r.int("schema_version", None)
        if version is None:
            legacy = r.raw("version", None)
            if legacy != 1:
                raise InputError(source, f"has plan version {legacy!r}",
                                 f"schema_version {SCHEMA_VERSION} (or version 1) as written by `medseg plan`")
            version = 1
        if version > SCHEMA_VERSION:
            raise InputError(source, f"has schema_version {version}, newer than this medseg understands "
                             f"({SCHEMA_VERSION})", "a newer medseg release, or a plan made by this one")
        dims = r.int("spatial_dims")
        if dims not in (2, 3):
            raise r._bad("spatial_dims", "2 or 3")
        labels_raw = r.raw("labels", {})
        if not isinstance(labels_raw, Mapping):
            raise r._bad("labels", "a mapping of class index to name")
        try:
            labels = {int(k): str(v) for k, v in labels_raw.items()}
        except (TypeError, ValueError):
            raise r._bad("labels", "integer class indices as keys") from None
        norm = r.raw("normalization")
        if not isinstance(norm, list):
            raise r._bad("normalization", "a list with one entry per channel")
        confs = r.raw("configurations")
        if not isinstance(confs, Mapping) or not confs:
            raise r._bad("configurations", "a mapping of configuration names to configurations")
        plan = cls(
            dataset=r.str("dataset", "dataset"),
            spatial_dims=dims,
            in_channels=r.int("in_channels", minimum=1),
            num_classes=r.int("num_classes", minimum=2),
            labels=labels,
            normalization=[Normalization.from_dict(n, source, r._key(f"normalization[{i}]"))
                           for i, n in enumerate(norm)],
            configurations={str(k): Configuration.from_dict(v, source, r._key(f"configurations.{k}"))
                            for k, v in confs.items()},
            device=r.str("device", "cpu"),
            memory_gb=r.float("memory_gb", None),
            fingerprint=dict(r.raw("fingerprint", {})),
            label_values=r.ints("label_values", []),
            explain={str(k): str(v) for k, v in dict(r.raw("explain", {})).items()},
            ignore_value=r.int("ignore_value", None, minimum=1),
            regions=_regions_of(r),
        )
        missing = sorted({v for reg in plan.regions for v in reg.values} - set(plan.label_values))
        if missing:
            raise r._bad("regions", f"regions of the label_values {plan.label_values} (not {missing})")
        if len(plan.label_values) != plan.num_classes:
            raise r._bad("label_values", f"one label value per class ({plan.num_classes})")
        if plan.ignore_value is not None and plan.ignore_value in plan.label_values:
            raise r._bad("ignore_value", "a value that is not one of the label_values")
        if len(plan.normalization) != plan.in_channels:
            raise InputError(source, f"has {len(plan.normalization)} normalization entries for "
                             f"{plan.in_channels} channels", "one entry per channel")
        return plan

    @classmethod
    def coerce(cls, plan: Plan | Mapping[str, Any], source: str | Path | None = None) -> Plan:
        """``plan`` itself, or a plan dict validated by :meth:`from_dict` (for callers holding parsed JSON)."""
        return plan if isinstance(plan, Plan) else cls.from_dict(plan, source)


def _regions_of(r: _Reader) -> tuple[Region, ...]:
    """The ``regions`` list of a plan or model record (absent: none)."""
    raw = r.raw("regions", [])
    if not isinstance(raw, list):
        raise r._bad("regions", "a list of {name, values, paint}")
    try:
        return tuple(Region.from_dict(x) for x in raw)
    except ValueError:
        raise r._bad("regions", "a list of {name, values, paint}") from None
