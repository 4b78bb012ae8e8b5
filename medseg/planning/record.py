"""The trained-model record, ``RUN/model.json``: the one place every fact of a trained model lives.

Training writes it (:func:`write_model_record`, after each fold and at the end of cross-validation with the
chosen post-processing); the Predictor reads it alone (:func:`load_model_record`). It holds the plan-level facts
preprocessing needs (dimensions, channels, normalisation), the configuration as trained (spacing, patch, batch,
network name + kwargs, mirror axes, slice axis), the labels, the post-processing setting and the folds.

Run folders of the first release (``model.json`` without ``schema_version``; the trained patch, batch, network and
mirror axes in ``plan.json``; the post-processing in ``postprocessing.json``; a bare fold folder with only
``plan.json`` and checkpoints) are migrated in memory by :func:`load_model_record` (nothing in the run folder is
rewritten) and predict exactly as they did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.data.regions import Region
from medseg.errors import InputError
from medseg.planning.schema import SCHEMA_VERSION, Configuration, NetworkSpec, Normalization, Plan, _Reader

__all__ = ["MODEL_RECORD", "ModelRecord", "load_model_record", "write_model_record", "fold_dirs",
           "previous_stage_dir"]

log = logging.getLogger(__name__)

MODEL_RECORD = "model.json"


@dataclass
class ModelRecord:
    """Everything prediction needs to know about a trained model.

    Attributes:
        dataset: the data set the model was trained on.
        configuration: the configuration's name (``3d_fullres``, ``2d``, ...).
        config: the configuration as trained (its ``network`` is the exact network built for the folds).
        spatial_dims: dimensions of the data (3 for slice-wise 2D networks of 3D data).
        in_channels: image channels; channel_names: their modalities, in order.
        num_classes: network outputs; labels: ``{class index: name}``; label_values: the label value written
            for each class index (the data's own values, e.g. 0/200/500/600); ignore_value: the training data's
            ignore label (not a class: predictions never hold it), or None; regions: the regions the network
            has one sigmoid output each for (:class:`~medseg.data.regions.Region`), or empty.
        normalization: one entry per channel.
        folds: the trained folds that form the ensemble.
        postprocessing: the setting (``PostprocessSetting.to_dict()``) chosen on the out-of-fold predictions.
        pipeline: the pipeline's name; plan_hash: the preprocessing cache key of the plan it was trained on.
    """

    dataset: str
    configuration: str
    config: Configuration
    spatial_dims: int
    in_channels: int
    num_classes: int
    labels: dict[int, str]
    normalization: list[Normalization]
    folds: list[int]
    postprocessing: dict[str, Any] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    label_values: list[int] = field(default_factory=list)
    pipeline: str | None = None
    plan_hash: str | None = None
    schema_version: int = SCHEMA_VERSION
    #: how a prediction goes back onto the input grid: "probabilities" (resampled, then the argmax there) or
    #: "label" (argmax in plan space, then nearest), the first release's way, kept for its run folders and packages
    restore: str = "probabilities"
    ignore_value: int | None = None
    regions: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        if not self.label_values:
            self.label_values = list(range(self.num_classes))
        self.regions = tuple(self.regions)

    @property
    def out_channels(self) -> int:
        """Network outputs: one per region with regions, else one per class."""
        return len(self.regions) if self.regions else self.num_classes

    @property
    def network(self) -> NetworkSpec:
        return self.config.network

    @property
    def network_in_channels(self) -> int:
        """The network's input channels: the image channels (plus the previous stage's one-hot classes in a
        cascade stage, :meth:`Configuration.network_in_channels`)."""
        return self.config.network_in_channels(self.in_channels, self.num_classes)

    def plan(self) -> Plan:
        """A one-configuration :class:`Plan` (the trained one), for preprocessing."""
        return Plan(dataset=self.dataset, spatial_dims=self.spatial_dims, in_channels=self.in_channels,
                    num_classes=self.num_classes, labels=dict(self.labels), normalization=list(self.normalization),
                    configurations={self.configuration: self.config}, label_values=list(self.label_values),
                    ignore_value=self.ignore_value, regions=self.regions)

    @classmethod
    def from_plan(cls, plan: Plan, configuration: str, config: Configuration, *, folds: list[int],
                  postprocessing: dict[str, Any] | None = None, pipeline: str | None = None,
                  plan_hash: str | None = None) -> ModelRecord:
        """The record of ``config`` (the configuration ``configuration`` of ``plan`` as trained)."""
        return cls(dataset=plan.dataset, configuration=configuration, config=config, spatial_dims=plan.spatial_dims,
                   in_channels=plan.in_channels, num_classes=plan.num_classes, labels=dict(plan.labels),
                   normalization=list(plan.normalization), folds=sorted(int(f) for f in folds),
                   postprocessing=dict(postprocessing or {}),
                   channel_names=[str(m) for m in plan.fingerprint.get("modalities", [])],
                   label_values=list(plan.label_values), pipeline=pipeline, plan_hash=plan_hash,
                   ignore_value=plan.ignore_value, regions=plan.regions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "pipeline": self.pipeline,
            "configuration": self.configuration,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "channel_names": list(self.channel_names),
            "num_classes": self.num_classes,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "label_values": list(self.label_values),
            **({} if self.ignore_value is None else {"ignore_value": int(self.ignore_value)}),
            **({"regions": [r.to_dict() for r in self.regions]} if self.regions else {}),
            "normalization": [n.to_dict() for n in self.normalization],
            "config": self.config.to_dict(),
            "folds": list(self.folds),
            "postprocessing": dict(self.postprocessing),
            "plan_hash": self.plan_hash,
            "restore": self.restore,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> ModelRecord:
        """Validate a record read from JSON (``schema_version`` 2).

        Raises:
            InputError: a missing key, a wrong type, or a newer schema.
        """
        r = _Reader(data, source, "")
        version = r.int("schema_version")
        if version > SCHEMA_VERSION:
            raise InputError(source, f"has schema_version {version}, newer than this medseg understands "
                             f"({SCHEMA_VERSION})", "a newer medseg release, or a model trained by this one")
        config = Configuration.from_dict(r.raw("config"), source, "config")
        # the plan-level facts are validated by the Plan loader, on a plan made of this record's fields
        plan = Plan.from_dict({**dict(data), "configurations": {r.str("configuration"): r.raw("config")}}, source)
        folds = r.ints("folds")
        if not folds:
            raise r._bad("folds", "at least one trained fold")
        post = r.raw("postprocessing", {})
        if not isinstance(post, dict):
            raise r._bad("postprocessing", "a post-processing setting (a mapping)")
        names = r.raw("channel_names", [])
        restore = r.str("restore", "probabilities")
        if restore not in ("probabilities", "label"):
            raise r._bad("restore", "'probabilities' or 'label'")
        return cls(dataset=plan.dataset, configuration=r.str("configuration"),
                   config=config, spatial_dims=plan.spatial_dims,
                   in_channels=plan.in_channels, num_classes=plan.num_classes, labels=plan.labels,
                   normalization=plan.normalization, folds=sorted(folds), postprocessing=post,
                   channel_names=[str(n) for n in names], label_values=plan.label_values,
                   ignore_value=plan.ignore_value, regions=plan.regions,
                   pipeline=r.raw("pipeline", None),
                   plan_hash=r.raw("plan_hash", None), schema_version=version, restore=restore)


def previous_stage_dir(run_dir: str | Path, previous_stage: str) -> Path:
    """The run folder of a cascade stage's previous stage: ``run_dir``'s sibling ``<previous_stage>`` (the layout
    of ``medseg crossval`` without ``--configuration``: ``RUN/3d_lowres`` beside ``RUN/3d_cascade_fullres``)."""
    return Path(run_dir).resolve().parent / previous_stage


def fold_dirs(run_dir: Path) -> dict[int, Path]:
    """``{fold: RUN/fold_K}`` for every fold folder of a run."""
    return {int(p.name[5:]): p for p in sorted(Path(run_dir).glob("fold_*")) if p.is_dir() and p.name[5:].isdigit()}


def write_model_record(run_dir: str | Path, record: ModelRecord) -> Path:
    """Write ``RUN/model.json`` atomically; returns its path."""
    from medseg.training.record import write_json

    path = Path(run_dir) / MODEL_RECORD
    write_json(path, record.to_dict())
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "does not exist", "a run folder written by `medseg train` or `medseg crossval`") \
            from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({str(exc).splitlines()[0]})", "a file written by medseg") \
            from None


def load_model_record(run_dir: str | Path) -> ModelRecord:
    """Read the model record of a run folder (migrating a first-release run folder in memory).

    Args:
        run_dir: the run folder (``model.json``; for first-release folders also ``plan.json``, checkpoints and
            ``postprocessing.json``).

    Returns:
        The validated :class:`ModelRecord`.

    Raises:
        InputError: not a run folder, or its files are incomplete or invalid.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(root, "is not a folder", "a run folder with model.json and fold_K/ checkpoints")
    path = root / MODEL_RECORD
    data = _read_json(path) if path.is_file() else None
    if isinstance(data, dict) and data.get("kind") == "selection":  # medseg.planning.selection
        members = [str(m) for m in data.get("members", [])]
        raise InputError(path, f"is the selection record of a run that trained the configurations {members}, "
                         "not one model's record", "RUN/<configuration> for one configuration's record, or "
                         "Predictor.from_run(RUN) / `medseg predict -m RUN` to predict with the chosen one(s)")
    if isinstance(data, dict) and "schema_version" in data:
        return ModelRecord.from_dict(data, path)
    return _migrate_v1(root, data)


def _migrate_v1(root: Path, model: dict[str, Any] | None) -> ModelRecord:
    """A first-release run folder: ``plan.json`` (carrying the trained patch/batch/network/mirror axes),
    ``model.json`` (network spec, configuration, folds, labels) or, for a bare folder, the checkpoints."""
    from medseg.inference.postprocess import POSTPROCESSING_FILE, PostprocessSetting, load_postprocessing
    from medseg.planning.plan import load_plan, plan_hash
    from medseg.runtime import load_checkpoint

    if model is not None and not isinstance(model, dict):
        raise InputError(root / MODEL_RECORD, "does not hold a JSON object", "a model.json written by medseg")
    plan = load_plan(root / "plan.json")
    model = model or {}
    folds_on_disk = sorted(fold_dirs(root))
    folds = sorted(int(f) for f in model.get("folds", [])) or folds_on_disk
    spec = model.get("network")
    config_name = model.get("configuration")
    if (spec is None or config_name is None) and folds_on_disk:
        fold = folds_on_disk[0]
        ckpt = None
        for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):
            if (root / f"fold_{fold}" / name).is_file():
                ckpt = load_checkpoint(root / f"fold_{fold}" / name)
                break
        if ckpt is not None:
            spec = spec or ckpt.get("network")
            config_name = config_name or ckpt.get("configuration")
    if config_name is None and len(plan.configurations) == 1:
        config_name = next(iter(plan.configurations))
    if config_name not in plan.configurations:
        raise InputError(root / MODEL_RECORD, f"configuration {config_name!r} is not one of plan.json's",
                         "a model.json naming one of " + ", ".join(sorted(plan.configurations)))
    if not folds:
        raise InputError(root, "has no trained fold", "fold_K/checkpoint_best.pt files")
    conf = plan.configurations[config_name]
    if spec is not None:
        conf = dataclasses.replace(conf, network=NetworkSpec.from_dict(spec, root / MODEL_RECORD))
    setting = load_postprocessing(root) if (root / POSTPROCESSING_FILE).is_file() else PostprocessSetting()
    labels = model.get("labels")
    if labels:
        plan = dataclasses.replace(plan, labels={int(k): str(v) for k, v in labels.items()})
    log.info("%s: a first-release run folder (no model.json schema_version); read in memory, not rewritten",
             root)
    record = ModelRecord.from_plan(plan, config_name, conf, folds=folds, postprocessing=setting.to_dict(),
                                   pipeline=model.get("pipeline"), plan_hash=plan_hash(plan))
    record.restore = "label"  # as the first release predicted
    return record
