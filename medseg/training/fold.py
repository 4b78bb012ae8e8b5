"""Set up and train one fold of a pipeline: manifest -> plan -> splits -> preprocess cache -> patch loader ->
network -> :class:`~medseg.training.trainer.Trainer`, recording everything in the run folder.

Each fold can run as its own process (folds spread over GPUs or nodes); the shared files of the run folder
(plan.json, splits.json) are written atomically and are identical whichever process writes them first. Under
``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised here (NCCL on CUDA, gloo on CPU); rank 0
plans while the others wait, then every rank preprocesses its share of the cases
(:class:`medseg.training.distributed.RunRanks`; store barriers with data-scaled timeouts, not NCCL's).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError, InputError
from medseg.planning.record import ModelRecord, fold_dirs, load_model_record, write_model_record
from medseg.planning.schema import Configuration, NetworkSpec, Plan
from medseg.training.config import PipelineConfig
from medseg.training.record import environment, write_json, write_yaml

__all__ = ["RunData", "prepare_run", "train_fold", "resolve_configuration", "update_model_record",
           "finished_folds", "fold_is_finished"]

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """What every fold of a run shares.

    Attributes:
        plan: the planner's plan (``RUN/plan.json``).
        config: the configuration as trained: the plan's, with the pipeline's ``train:`` overrides resolved once
            (:func:`resolve_configuration`); the model record stores exactly this.
    """

    pipeline: PipelineConfig
    manifest: Any
    plan: Plan
    config: Configuration
    splits: list[dict[str, Any]]
    cache_dir: Path

    @property
    def run_dir(self) -> Path:
        return self.pipeline.output


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cache_root(pipeline: PipelineConfig) -> Path:
    """The root of the pipeline's preprocess cache: its ``cache:`` key, else ``RUN/cache``."""
    return Path(pipeline.cache or (pipeline.output / "cache"))


def prepare_run(pipeline: PipelineConfig, *, device: str = "cpu", write: bool = True,
                preprocess: bool = True, root: bool = False) -> RunData:
    """Load the manifest, make or reuse the plan and splits, fill the preprocess cache, write the run record.

    Args:
        pipeline: the pipeline configuration.
        device: ``"cpu"`` or ``"cuda"``: what the plan is sized for when a new plan is made.
        write: write plan.json, splits.json, config.yaml, environment.json (False on DDP ranks > 0).
        preprocess: fill the cache (False: the caller does, e.g. each torchrun rank its share of the cases with
            ``preprocess_dataset(..., shard=(rank, world))``); ``cache_dir`` is the same either way.
        root: the root of a run that trains every configuration of the plan (:mod:`medseg.training.multiconfig`):
            plan.json, splits.json, config.yaml (``configuration: auto`` kept) and environment.json are written,
            nothing is preprocessed; ``config`` is the plan's first configuration and ``cache_dir`` the cache root.

    Returns:
        The shared :class:`RunData`.

    Raises:
        InputError: unusable data set, plan or split file.
        ConfigError: the configuration is absent from the plan.
    """
    from medseg.data.loader import cache_folder, preprocess_dataset
    from medseg.data.manifest import load_manifest
    from medseg.data.splits import load_or_create_splits, read_splits
    from medseg.planning import fingerprint, load_plan, make_plan, plan_hash, save_plan

    p = pipeline
    run_dir = p.output
    manifest = load_manifest(p.dataset, patient_regex=p.patient_regex, file_ending=p.file_ending,
                             label_aliases=p.label_aliases)
    unlabelled = [c.case_id for c in manifest.cases if c.label is None]
    if unlabelled:
        logger.warning("%d cases have no label and are left out of training: %s", len(unlabelled), unlabelled[:5])
    run_plan = run_dir / "plan.json"
    if run_plan.is_file():
        plan = load_plan(run_plan)
    elif p.plan is not None:
        plan = load_plan(p.plan)
    else:
        logger.info("planning %s for %s", manifest.name, device)
        plan = make_plan(fingerprint(manifest), device=device)
    if p.configuration == "auto" and not root:  # the plan's first configuration (3d_fullres for 3D data, else 2d)
        p = dataclasses.replace(p, configuration=next(iter(plan.configurations)))
        logger.info("configuration %s (the plan's first)", p.configuration)
    config = resolve_configuration(plan, dataclasses.replace(p, configuration=next(iter(plan.configurations)))
                                   if root else p)
    split_path = run_dir / "splits.json"
    if p.splits is not None and not split_path.is_file():
        splits = read_splits(p.splits)
        if len(splits) != p.folds:
            raise InputError(p.splits, f"has {len(splits)} folds but the pipeline asks for {p.folds}",
                             f"folds: {len(splits)} in the pipeline, or a {p.folds}-fold split file")
    if write:
        logger.info("options the pipeline does not set: %s", p.recipe)
        _check_same_config(run_dir / "config.yaml", p)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not run_plan.is_file():
            save_plan(plan, run_plan)
        if p.splits is not None and not split_path.is_file():
            write_json(split_path, splits)
    splits = load_or_create_splits(split_path, manifest, p.folds, p.seed) if write else read_splits(split_path)
    if root:
        cache_dir = cache_root(p)
    elif preprocess:  # a cascade stage trains on the cache of the configuration it shares the spacing with
        cache_dir = Path(preprocess_dataset(manifest, plan, plan.data_configuration(p.configuration), cache_root(p)))
    else:
        cache_dir = cache_folder(cache_root(p), plan, plan.data_configuration(p.configuration))
    if write:
        write_yaml(run_dir / "config.yaml", p.to_dict())
        write_json(run_dir / "environment.json", environment({
            "manifest_hash": manifest.hash(), "plan_hash": plan_hash(plan), "dataset": str(p.dataset),
            "n_cases": len(manifest.cases)}))
    return RunData(p, manifest, plan, config, splits, cache_dir)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _check_same_config(path: Path, p: PipelineConfig) -> None:
    """Refuse to reuse a run folder whose config.yaml differs from ``p`` (its folds, plan and checkpoints were made
    with that config: mixing them would make the run folder's record false).

    Raises:
        InputError: the folder holds a run of another configuration.
    """
    if not path.is_file():
        return
    import json

    import yaml

    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot be read ({exc})", "the config.yaml that medseg wrote") from None
    old_flat = _flatten(json.loads(json.dumps(old, default=str)))
    new_flat = _flatten(json.loads(json.dumps(p.to_dict(), default=str)))
    ignored = ("output", "cache", "recipe")  # where things are written and a description, not what the run is
    # keys an older release did not write are options it did not have: compared only where both have them
    diff = sorted(k for k in set(old_flat) | set(new_flat)
                  if k not in ignored and k in old_flat and old_flat.get(k) != new_flat.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise InputError(path.parent, f"holds a run of a different configuration ({shown}{more})",
                         "a new --output folder for a changed configuration, or the run's own settings to "
                         "resume or reuse it")


def resolve_configuration(plan: Plan, p: PipelineConfig) -> Configuration:
    """The configuration a pipeline trains: the plan's ``p.configuration`` with the ``train:`` block's patch size,
    batch size, network and mirror axes in place of the planner's (the plan itself is not changed).

    Training mirrors and test-time mirroring flip the same axes (the result's ``mirror_axes``), since a network
    never shown a flip along an axis (e.g. anterior-posterior, where a structure's position carries its label)
    mispredicts that flip.

    Raises:
        ConfigError: an unknown configuration, or mirror axes outside the patch.
    """
    conf = plan.configuration(p.configuration)
    t = p.train
    changes: dict[str, Any] = {}
    if t.patch_size:
        if len(t.patch_size) != conf.network_dims:
            raise ConfigError("train.patch_size", t.patch_size,
                              f"{conf.network_dims} values for the {conf.network_dims}D configuration {p.configuration}")
        changes["patch_size"] = [int(v) for v in t.patch_size]
    if t.batch_size:
        changes["batch_size"] = int(t.batch_size)
    elif t.batch_scale != 1.0:  # the recipe's "batch sized for steps"
        changes["batch_size"] = max(2, int(round(conf.batch_size * t.batch_scale)))
    if t.network:
        changes["network"] = NetworkSpec(str(t.network["name"]), dict(t.network.get("kwargs") or {}))
    if t.augmentation and t.augmentation.get("mirror_axes") is not None:
        axes = sorted({int(a) for a in t.augmentation["mirror_axes"]})
        dims = len(changes.get("patch_size", conf.patch_size))
        if any(not 0 <= a < dims for a in axes):
            raise ConfigError("train.augmentation.mirror_axes", t.augmentation["mirror_axes"],
                              f"spatial axes of the {dims}D patch, in [0, {dims})")
        changes["mirror_axes"] = axes
    return dataclasses.replace(conf, **changes)


def fold_is_finished(fold_dir: Path) -> bool:
    """True when ``fold_dir/checkpoint_latest.pt`` records a finished training."""
    path = fold_dir / "checkpoint_latest.pt"
    if not path.is_file():
        return False
    from medseg.runtime import load_checkpoint

    return bool(load_checkpoint(path).get("finished", False))


def finished_folds(run_dir: Path) -> list[int]:
    """Folds of ``run_dir`` whose training finished."""
    return [f for f, d in fold_dirs(run_dir).items() if fold_is_finished(d)]


def update_model_record(run: RunData, network: dict[str, Any] | None = None, *,
                        postprocessing: dict[str, Any] | None = None) -> ModelRecord:
    """(Re)write ``RUN/model.json`` for the run's finished folds, so that ``medseg predict -m RUN`` works as is.

    Args:
        run: the prepared run.
        network: the ``{name, kwargs}`` the folds were built with (``model_spec``); default: the existing record's.
        postprocessing: the post-processing setting chosen by crossval; default: the existing record's when its
            folds are the same, else none.

    Returns:
        The record written.
    """
    folds = finished_folds(run.run_dir)
    old = None
    if (run.run_dir / "model.json").is_file():
        try:
            old = load_model_record(run.run_dir)
        except InputError:  # an unreadable old record is replaced, not trusted
            old = None
    if network is None:
        if old is None:
            raise InputError(run.run_dir / "model.json", "does not exist", "a run folder with a trained fold")
        network = old.network.to_dict()
    if postprocessing is None:
        postprocessing = old.postprocessing if old is not None and old.folds == folds else {}
    from medseg.planning import plan_hash

    config = dataclasses.replace(run.config, network=NetworkSpec.from_dict(network))
    record = ModelRecord.from_plan(run.plan, run.pipeline.configuration, config, folds=folds,
                                   postprocessing=postprocessing, pipeline=run.pipeline.name,
                                   plan_hash=plan_hash(run.plan))
    write_model_record(run.run_dir, record)
    return record


def _network(run: RunData) -> tuple[Any, dict[str, Any], bool]:
    from medseg.networks import model_entry, model_spec
    from medseg.runtime import build_network

    spec = run.config.network
    kwargs = dict(spec.kwargs)
    asked = "deep_supervision" in kwargs  # the spec's own choice; else the pipeline's train.deep_supervision
    if "deep_supervision" in model_entry(spec.name).options:
        kwargs["deep_supervision"] = bool(run.pipeline.train.deep_supervision and kwargs.get("deep_supervision", True))

    def build(kw: dict[str, Any]) -> Any:
        return build_network({"name": spec.name, "kwargs": kw}, spatial_dims=run.config.network_dims,
                             in_channels=run.config.network_in_channels(run.plan.in_channels, run.plan.num_classes),
                             out_channels=run.plan.out_channels)

    try:
        net = build(kwargs)
    except ConfigError as exc:
        if asked or exc.name != "deep_supervision" or not kwargs.get("deep_supervision"):
            raise
        logger.info("%s has no deep-supervision heads: trained with one output", spec.name)
        kwargs["deep_supervision"] = False
        net = build(kwargs)
    return net, model_spec(net), bool(kwargs.get("deep_supervision", False))


def _val_image(cache_dir: Path, cid: str, previous_dir: Path | None, num_classes: int) -> np.ndarray:
    """A validation case's plan-space image (with a cascade stage's previous-stage channels attached)."""
    image = np.load(cache_dir / f"{cid}.npy")
    if previous_dir is None:
        return image
    from medseg.transforms.cascade import stack_previous

    return stack_previous(image, np.load(previous_dir / f"{cid}.npy"), num_classes)


def _class_counts(cache_dir: Path, case_ids: list[str], num_classes: int) -> list[float]:
    counts = np.zeros(num_classes, dtype=np.float64)
    for cid in case_ids:
        seg = np.load(cache_dir / f"{cid}_seg.npy", mmap_mode="r")
        counts += np.bincount(np.asarray(seg).ravel().clip(0).astype(np.int64), minlength=num_classes)[:num_classes]
    return counts.tolist()


def _device_augmented(loader: Any, device: Any) -> Callable[[int], Any]:
    """``epoch -> batches`` moved to ``device`` and augmented there as whole batches (the GPU path), with the
    loader's (seed, fold, epoch) generator on that device, so CPU cores only crop patches."""
    from medseg.transforms.augment import augment_batch

    def batches(epoch: int) -> Any:
        gen = loader.generator(epoch, device)
        for batch in loader.epoch(epoch):
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            image, label = augment_batch(image, label, loader.augmentation, gen)
            if loader.attaches_previous:  # a cascade stage: the previous stage's map into the image, perturbed
                from medseg.transforms.cascade import attach_previous

                image, label = attach_previous(image, label, loader.num_classes, gen)
            yield {"image": image, "label": label}

    return batches


def _loader(run: RunData, case_ids: list[str], seed: int, fold: int, augment_in_loader: bool = True,
            previous_dir: Path | None = None) -> Any:
    from medseg.data.loader import PatchLoader

    cfg = run.pipeline.train
    conf = run.config
    # the configuration's mirror axes (the pipeline's augmentation.mirror_axes, else the planner's) are what both
    # training and test-time mirroring flip
    augmentation = None if cfg.augmentation is None else {**cfg.augmentation, "mirror_axes": list(conf.mirror_axes)}
    return PatchLoader(
        run.cache_dir, case_ids, patch_size=conf.patch_size, batch_size=conf.batch_size,
        spatial_dims=conf.network_dims, slice_axis=conf.slice_axis if conf.slicewise else None,
        oversample_foreground=cfg.oversample_foreground, augmentation=augmentation, seed=seed, fold=fold,
        num_workers=cfg.num_workers, num_batches=cfg.batches_per_epoch, augment_in_loader=augment_in_loader,
        previous_dir=previous_dir, num_classes=run.plan.num_classes)


def train_fold(
    pipeline: PipelineConfig,
    fold: int,
    *,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    run: RunData | None = None,
    ddp: bool = True,
) -> Any:
    """Train fold ``fold`` of ``pipeline`` into ``OUTPUT/fold_K`` and (re)write ``model.json``.

    Args:
        pipeline: the pipeline configuration.
        fold: 0-based fold index (must exist in splits.json).
        resume: continue from ``fold_K/checkpoint_latest.pt`` when present.
        progress: per-epoch callback (the CLI's progress bar).
        run: an already prepared :class:`RunData` (crossval prepares it once).
        ddp: under torchrun, train the fold data-parallel with the other ranks (False: this process trains it
            alone, as distributed crossval's one fold per rank does; ``run`` is then required).

    Returns:
        The :class:`~medseg.training.trainer.FoldResult`.

    Raises:
        InputError: a fold the split file lacks, unusable data.
        ConfigError: invalid options.
        PeerFailure: under torchrun, another rank failed.
    """
    from medseg.training.distributed import coordinator

    if not ddp and run is None:
        raise ValueError("train_fold(ddp=False) needs the prepared run")
    coord = coordinator() if ddp else None
    if coord is None:
        return _train_fold(pipeline, fold, resume, progress, run, ddp, None)
    with coord.guard():  # a rank's failure stops the others with its message
        return _train_fold(pipeline, fold, resume, progress, run, ddp, coord)


def _train_fold(pipeline: PipelineConfig, fold: int, resume: bool, progress: Callable[[dict[str, Any]], None] | None,
                run: RunData | None, ddp: bool, coord: Any) -> Any:
    import numpy as np
    import torch

    from medseg.data.splits import get_fold
    from medseg.losses import build_loss
    from medseg.runtime import resolve_device
    from medseg.training.distributed import RunRanks, init_process_group
    from medseg.training.trainer import Trainer, ValCase

    rank, world = init_process_group(store=None if coord is None else coord.new_client()) if ddp else (0, 1)
    cfg = pipeline.train
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    if run is None:  # under torchrun: rank 0 plans, each rank preprocesses its share, store barriers between
        run = prepare_run(pipeline, device=device.type) if coord is None else RunRanks(coord).prepare(
            pipeline, device.type)
    entry = get_fold(run.splits, fold, run.run_dir / "splits.json")
    labelled = {c.case_id for c in run.manifest.cases if c.label is not None}
    train_ids = [c for c in entry["train"] if c in labelled]
    val_ids = [c for c in entry["val"] if c in labelled]
    if not train_ids:
        raise InputError(run.run_dir / "splits.json", f"fold {fold} has no labelled training cases",
                         "a split of labelled cases")
    seed = pipeline.seed if rank == 0 else int(np.random.SeedSequence([pipeline.seed, rank]).generate_state(1)[0])
    on_gpu = device.type == "cuda" and cfg.augmentation is not None
    previous_dir = None
    if run.config.previous_stage:  # a cascade stage: the previous stage's out-of-fold maps in this plan space
        from medseg.training.cascade import PREVIOUS_STAGE_FOLDER, prepare_previous_stage

        if rank == 0:
            prepare_previous_stage(run)
        _barrier()
        previous_dir = run.run_dir / PREVIOUS_STAGE_FOLDER
    loader = _loader(run, train_ids, seed, fold, augment_in_loader=not on_gpu, previous_dir=previous_dir)
    train_batches = _device_augmented(loader, device) if on_gpu else loader.epoch
    torch.manual_seed(int(np.random.SeedSequence([pipeline.seed, fold]).generate_state(1)[0]))
    net, spec, deep_sup = _network(run)
    k = run.plan.num_classes
    counts = _class_counts(run.cache_dir, train_ids, k) if cfg.loss == "weighted_ce" else None
    loss = build_loss(cfg.loss, num_classes=k, class_counts=counts, deep_supervision=deep_sup,
                      options=cfg.loss_options, ignore_index=run.plan.ignore_index,
                      regions=run.plan.region_classes() or None)
    val_cases = [] if rank != 0 else [
        ValCase(cid, _val_image(run.cache_dir, cid, previous_dir, k), np.load(run.cache_dir / f"{cid}_seg.npy"))
        for cid in val_ids[: cfg.val_max_cases or None]]
    conf = run.config
    fold_dir = run.run_dir / f"fold_{fold}"
    trainer = Trainer(
        net, spec, loss, cfg, fold_dir,
        train_batches=train_batches, val_cases=val_cases, patch_size=conf.patch_size,
        num_classes=k, slice_axis=conf.slice_axis if conf.slicewise else None, progress=progress, fold=fold,
        regions=run.plan.region_classes() or None,
    )
    logger.info("fold %d: %d training / %d validation cases, patch %s, batch %s, %s, autocast %s, world %d",
                fold, len(train_ids), len(val_ids), conf.patch_size, conf.batch_size, device, trainer.amp_dtype,
                world)
    result = trainer.fit(resume=resume)
    if rank == 0:
        update_model_record(run, spec)
    _barrier()
    return result
