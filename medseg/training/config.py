"""Pipeline configuration: a YAML file of plain data read into two small dataclasses.

```yaml
name: hippocampus_3d                       # default: the YAML file's name (here hippocampus_3d)
dataset: ../shared/data/hippocampus      # relative paths are relative to the YAML file's folder
patient_regex: null                       # e.g. "^(\\d+)_" to group HC18 images by subject
configuration: 3d_fullres
folds: 5
seed: 0
output: runs/hippocampus_3d               # the run folder (relative to the working directory)
train:                                     # TrainConfig fields
  loss: dice_ce
  max_minutes: 20
```
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, InputError

__all__ = ["TrainConfig", "PipelineConfig", "load_pipeline", "pipeline_from_dict", "check_types"]

_CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("poly", "cosine", "plateau", "constant"),
    "device": ("auto", "cpu", "cuda"),
}


@dataclass
class TrainConfig:
    """Options of one fold's training (the ``train:`` block of a pipeline YAML).

    Length: training stops at ``epochs`` or after ``max_minutes`` of training, whichever comes first; the
    learning-rate schedule follows the progress ``max(epoch / epochs, elapsed / max_minutes)``, so with a time
    budget the poly/cosine decay ends exactly when the budget does.
    """

    epochs: int = 1000
    batches_per_epoch: int = 250
    max_minutes: float | None = None
    optimizer: str = "sgd"  # sgd (Nesterov, momentum 0.99, nnU-Net) | adamw
    lr: float = 0.01
    weight_decay: float = 3e-5
    momentum: float = 0.99
    schedule: str = "poly"  # poly (exponent 0.9) | cosine | plateau | constant
    warmup_epochs: int = 0
    loss: str = "dice_ce"
    loss_options: dict[str, Any] = field(default_factory=dict)
    deep_supervision: bool = True
    amp: str = "auto"  # auto | bf16 | fp16 | fp32 (medseg.runtime.resolve_precision; "none" = deprecated fp32)
    grad_clip: float | None = 12.0
    compile: bool = False
    channels_last: bool = False  # channels-last memory format (3D: ~10% faster bf16 steps on AVX512 CPUs)
    val_every: int = 5
    val_every_minutes: float | None = None  # with a budget: validate at the first epoch end this long after the last
    val_overlap: float = 0.5
    val_max_cases: int | None = None
    checkpoint_every: int = 5
    checkpoint_every_minutes: float | None = None  # checkpoint_latest.pt at least this often (minutes)
    ema: float = 0.9  # smoothing of the validation Dice that picks the best checkpoint
    patience: int | None = None  # validations without EMA improvement before early stopping
    batch_size: int | None = None  # None: the plan's (times batch_scale)
    batch_scale: float = 1.0  # fraction of the plan's batch when batch_size is None (short budgets: 0.5)
    patch_size: list[int] | None = None  # None: the plan's
    oversample_foreground: float = 0.33
    # overrides of the defaults (null = none); ``extra``: [{name, kwargs}] transforms appended to the chain
    augmentation: dict[str, Any] | None = field(default_factory=dict)
    num_workers: int = 0
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    network: dict[str, Any] | None = None  # {"name", "kwargs"} replacing the plan's network (e.g. classic unet)

    def validate(self) -> TrainConfig:
        """Check every field; returns self.

        Raises:
            ConfigError: a value out of range or not among the choices.
        """
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"train.{key}", getattr(self, key), "one of " + ", ".join(choices))
        from medseg.runtime import normalize_precision

        self.amp = normalize_precision(self.amp, "train.amp")
        for key in ("epochs", "batches_per_epoch", "val_every", "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"train.{key}", getattr(self, key), "an integer >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr", self.lr, "a positive number")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError("train.max_minutes", self.max_minutes, "a positive number of minutes or null")
        for key in ("val_every_minutes", "checkpoint_every_minutes"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"train.{key}", v, "a positive number of minutes or null")
        if not 0 < self.batch_scale <= 1:
            raise ConfigError("train.batch_scale", self.batch_scale, "a fraction in (0, 1]")
        if not 0 <= self.ema < 1:
            raise ConfigError("train.ema", self.ema, "a smoothing factor in [0, 1)")
        if not 0 <= self.oversample_foreground <= 1:
            raise ConfigError("train.oversample_foreground", self.oversample_foreground, "a fraction in [0, 1]")
        if self.network is not None and "name" not in self.network:
            raise ConfigError("train.network", self.network, 'a mapping {"name": ..., "kwargs": {...}}')
        if self.augmentation and self.augmentation.get("extra"):
            from medseg.transforms.extra import validate_extra

            try:  # unknown transform names fail here, at config load, with a "did you mean"
                validate_extra(self.augmentation["extra"])
            except ConfigError as err:
                raise ConfigError(f"train.{err.name}", err.value, err.expected) from None
        from medseg.losses import LOSSES

        if self.loss not in LOSSES:
            raise ConfigError("train.loss", self.loss, "one of " + ", ".join(LOSSES))
        return self


@dataclass
class PipelineConfig:
    """A pipeline YAML: what data, which plan configuration, how many folds, where the run goes."""

    name: str
    dataset: Path
    output: Path
    configuration: str = "3d_fullres"
    patient_regex: str | None = None
    file_ending: str | None = None
    folds: int = 5
    seed: int = 0
    cache: Path | None = None  # preprocess cache root; default OUTPUT/cache
    splits: Path | None = None  # an existing splits.json to use; default OUTPUT/splits.json (made if absent)
    plan: Path | None = None  # an existing plan.json; default: planned from the data
    recipe: str | None = None  # which training recipe filled the options the YAML left out, and why
    max_voxels: int | None = None  # voxel limit of every read (medseg.io.guard); None: from the available memory
    train: TrainConfig = field(default_factory=TrainConfig)
    # other names of declared labels in DICOM-SEG / RTSTRUCT label files: {liver: [Leber, LIVER_auto]}
    label_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    card: dict[str, Any] | None = None  # model-card text (intended_use, limitations, ...) for `medseg export-model`

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (paths as strings) for config.yaml in the run folder."""
        d = dataclasses.asdict(self)
        for key in ("dataset", "output", "cache", "splits", "plan"):
            d[key] = None if d[key] is None else str(d[key])
        return d


def _type_text(tp: Any) -> str:
    """``int | None`` -> ``"an integer or null"``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_text(a) for a in typing.get_args(tp) if a is not type(None)]
        nullable = type(None) in typing.get_args(tp)
        return " or ".join(parts) + (" or null" if nullable else "")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return "a list" + (f" of {_type_text(item).removeprefix('an ').removeprefix('a ')}s" if item is not Any else "")
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if tp is Path:
        return isinstance(value, (str, Path))
    if origin is list:
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


def check_types(cls: type, data: dict[str, Any], *, prefix: str = "") -> None:
    """Check every value of ``data`` against the annotated type of the field of dataclass ``cls`` it sets.

    Integers are not booleans, numbers must be finite, paths are strings, and None only where the field allows
    it, so that ``folds: two`` or ``lr: fast`` fails here, naming the key, rather than deep inside training.

    Raises:
        ConfigError: ``PREFIXkey='value' is invalid; expected <type>``.
    """
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is not None and not _type_ok(value, tp):
            raise ConfigError(f"{prefix}{key}", value, _type_text(tp))


def pipeline_from_dict(data: dict[str, Any], *, base: Path | None = None, where: str = "config") -> PipelineConfig:
    """Build a :class:`PipelineConfig` from plain data.

    Args:
        data: the parsed YAML mapping.
        base: folder against which relative ``dataset``/``cache``/``splits``/``plan`` paths are resolved
            (the YAML file's folder); ``output`` stays relative to the working directory.
        where: name used in error messages.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: unknown or invalid keys.
    """
    if not isinstance(data, dict):
        raise ConfigError(where, type(data).__name__, "a YAML mapping of pipeline options")
    top = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = set(data) - top
    if unknown:
        raise ConfigError(f"{where}: key", sorted(unknown)[0], "one of " + ", ".join(sorted(top)))
    for key in ("name", "dataset"):
        if not data.get(key):
            raise ConfigError(f"{where}: {key}", data.get(key), "a non-empty value")
    data = dict(data)
    if data.get("max_voxels") is not None:
        from medseg.io.guard import parse_max_voxels

        try:
            data["max_voxels"] = parse_max_voxels(data["max_voxels"])
        except ConfigError:
            raise ConfigError(f"{where}: max_voxels", data["max_voxels"],
                              "a positive number of voxels, e.g. 2e9 or 500M") from None
    if data.get("train") is not None and not isinstance(data["train"], dict):
        raise ConfigError(f"{where}: train", data["train"], "a mapping of training options (train: {epochs: ...})")
    check_types(PipelineConfig, {k: v for k, v in data.items() if k != "train" and not (k == "output" and v is None)},
                prefix=f"{where}: ")
    train_data = dict(data.get("train") or {})
    tfields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(train_data) - tfields
    if unknown:
        raise ConfigError(f"train.{sorted(unknown)[0]}", train_data[sorted(unknown)[0]],
                          "a known option: " + ", ".join(sorted(tfields)))
    check_types(TrainConfig, train_data, prefix=f"{where}: train.")
    train = TrainConfig(**train_data).validate()

    def _path(v: Any, rel_to: Path | None) -> Path | None:
        if v is None:
            return None
        p = Path(str(v)).expanduser()
        return p if p.is_absolute() or rel_to is None else (rel_to / p).resolve()

    folds = int(data.get("folds", 5))
    if folds < 2:
        raise ConfigError("folds", folds, "an integer >= 2 (k of k-fold cross-validation)")
    return PipelineConfig(
        name=str(data["name"]),
        dataset=_path(data["dataset"], base),  # type: ignore[arg-type]
        output=Path(str(data.get("output") or f"runs/{data['name']}")),
        configuration=str(data.get("configuration", "3d_fullres")),
        patient_regex=data.get("patient_regex"),
        file_ending=data.get("file_ending"),
        max_voxels=data.get("max_voxels"),
        folds=folds,
        seed=int(data.get("seed", 0)),
        cache=_path(data.get("cache"), base),
        splits=_path(data.get("splits"), base),
        plan=_path(data.get("plan"), base),
        recipe=data.get("recipe"),
        train=train,
        label_aliases=_label_aliases(data.get("label_aliases")),
        card=_card(data.get("card")),
    )


def _label_aliases(value: Any) -> dict[str, tuple[str, ...]]:
    """The YAML's ``label_aliases`` (shape only; checked against the data set's labels when the manifest loads)."""
    from medseg.data.dicom_labels import parse_label_aliases

    return parse_label_aliases(value, where="label_aliases")


def _card(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError("card", value, "a mapping of model-card fields, e.g. {intended_use: ..., limitations: ...}")
    return dict(value)


def load_pipeline(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline: the training recipe for the device and budget, overridden by the YAML, then by ``overrides``.

    Without a YAML (``path=None``) everything comes from the recipe and the plan: ``overrides`` must name the
    ``dataset``; the name is the data set folder's, the run goes to ``runs/NAME`` and the configuration is the
    plan's first (``auto``). Options the YAML sets are kept as written; an interval the YAML gives in epochs
    (``val_every``, ``checkpoint_every``) is not replaced by the recipe's interval in minutes.

    Args:
        path: the YAML file, or None.
        overrides: values replacing the file's (top-level keys, and ``train`` keys merged into ``train:``).

    Returns:
        The validated configuration (``recipe`` says which recipe filled the rest, and why).

    Raises:
        InputError: the file is missing or not valid YAML.
        ConfigError: invalid options, or no data set without a YAML.
    """
    import yaml

    from medseg.training.recipe import train_recipe

    data: dict[str, Any] = {}
    base = None
    where = "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "pipeline config not found", "a YAML file such as pipelines/demo.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InputError(path, f"not valid YAML ({str(exc).splitlines()[0]})", "a YAML mapping") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(str(path), f"a YAML {type(loaded).__name__}", "a YAML mapping of pipeline options (name: ...)")
        data = dict(loaded or {})
        data.setdefault("name", path.stem)  # a run is named by its config (runs/NAME), as pipelines/NAME.yaml
        base, where = path.resolve().parent, str(path)
    if data.get("train") is not None and not isinstance(data["train"], dict):
        raise ConfigError(f"{where}: train", data["train"], "a mapping of training options")
    for key, value in (overrides or {}).items():
        if key == "train":
            data["train"] = {**(data.get("train") or {}), **value}
        else:
            data[key] = value
    if path is None:
        if not data.get("dataset"):
            raise ConfigError("--dataset", None, "a data set folder (or --config pipelines/NAME.yaml)")
        name = Path(str(data["dataset"])).resolve().name or "dataset"
        data.setdefault("name", name)
        data.setdefault("configuration", "auto")
    user = dict(data.get("train") or {})
    device = _device_type(user.get("device", "auto"))
    options, reason = train_recipe(device, user.get("max_minutes"))
    for group in (("val_every", "val_every_minutes"), ("checkpoint_every", "checkpoint_every_minutes")):
        if any(k in user for k in group):
            for k in group:
                options.pop(k, None)
    if "batch_size" in user:
        options.pop("batch_scale", None)
    data["train"] = {**options, **user}
    data["recipe"] = reason
    return pipeline_from_dict(data, base=base, where=where)


def _device_type(name: Any) -> str:
    """``cpu`` or ``cuda``: what ``auto`` (or a named device) trains on here."""
    text = str(name)
    if text == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if text.startswith("cuda") else "cpu"
