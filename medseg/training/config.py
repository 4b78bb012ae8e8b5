"""Pipeline configuration: a YAML file of plain data read into two small dataclasses.

```yaml
name: hippocampus_3d
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, InputError

__all__ = ["TrainConfig", "PipelineConfig", "load_pipeline", "pipeline_from_dict"]

_CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("poly", "cosine", "plateau", "constant"),
    "amp": ("auto", "bf16", "fp16", "none"),
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
    amp: str = "auto"  # auto: bf16 on a CPU that has it, fp16 on CUDA; none = float32
    grad_clip: float | None = 12.0
    compile: bool = False
    channels_last: bool = False  # channels-last memory format (3D: ~10% faster bf16 steps on AVX512 CPUs)
    val_every: int = 5
    val_overlap: float = 0.5
    val_max_cases: int | None = None
    checkpoint_every: int = 5
    ema: float = 0.9  # smoothing of the validation Dice that picks the best checkpoint
    patience: int | None = None  # validations without EMA improvement before early stopping
    batch_size: int | None = None  # None: the plan's
    patch_size: list[int] | None = None  # None: the plan's
    oversample_foreground: float = 0.33
    augmentation: dict[str, Any] | None = field(default_factory=dict)  # overrides of the defaults; null = none
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
        for key in ("epochs", "batches_per_epoch", "val_every", "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"train.{key}", getattr(self, key), "an integer >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr", self.lr, "a positive number")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError("train.max_minutes", self.max_minutes, "a positive number of minutes or null")
        if not 0 <= self.ema < 1:
            raise ConfigError("train.ema", self.ema, "a smoothing factor in [0, 1)")
        if not 0 <= self.oversample_foreground <= 1:
            raise ConfigError("train.oversample_foreground", self.oversample_foreground, "a fraction in [0, 1]")
        if self.network is not None and "name" not in self.network:
            raise ConfigError("train.network", self.network, 'a mapping {"name": ..., "kwargs": {...}}')
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
    train: TrainConfig = field(default_factory=TrainConfig)
    card: dict[str, Any] | None = None  # model-card text (intended_use, limitations, ...) for `medseg export-model`

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (paths as strings) for config.yaml in the run folder."""
        d = dataclasses.asdict(self)
        for key in ("dataset", "output", "cache", "splits", "plan"):
            d[key] = None if d[key] is None else str(d[key])
        return d


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
    train_data = dict(data.get("train") or {})
    tfields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(train_data) - tfields
    if unknown:
        raise ConfigError(f"train.{sorted(unknown)[0]}", train_data[sorted(unknown)[0]],
                          "a known option: " + ", ".join(sorted(tfields)))
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
        folds=folds,
        seed=int(data.get("seed", 0)),
        cache=_path(data.get("cache"), base),
        splits=_path(data.get("splits"), base),
        plan=_path(data.get("plan"), base),
        train=train,
        card=_card(data.get("card")),
    )


def _card(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError("card", value, "a mapping of model-card fields, e.g. {intended_use: ..., limitations: ...}")
    return dict(value)


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML.

    Args:
        path: the YAML file.
        overrides: values replacing the file's (top-level keys, and ``train`` keys merged into ``train:``).

    Returns:
        The validated configuration.

    Raises:
        InputError: the file is missing or not valid YAML.
        ConfigError: invalid options.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "pipeline config not found", "a YAML file such as pipelines/demo.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({str(exc).splitlines()[0]})", "a YAML mapping") from exc
    data = dict(data or {})
    for key, value in (overrides or {}).items():
        if key == "train":
            data["train"] = {**(data.get("train") or {}), **value}
        else:
            data[key] = value
    return pipeline_from_dict(data, base=path.resolve().parent, where=str(path))
