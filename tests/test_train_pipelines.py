"""The shipped pipeline YAMLs are valid (their networks and losses build), config errors name the key, and
HC18's grouping by subject prefix never puts one fetus in two folds (real data when present, else synthetic)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medseg.errors import ConfigError
from medseg.training.config import load_pipeline, pipeline_from_dict

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_pipeline_builds_its_network_and_loss(path):
    from medseg.losses import build_loss
    from medseg.networks import create_model

    p = load_pipeline(path)
    assert p.name == path.stem and p.folds >= 2 and p.dataset.is_absolute()
    t = p.train
    if t.network is not None:
        dims = 2 if p.configuration == "2d" else 3
        net = create_model(t.network["name"], spatial_dims=dims, in_channels=1, out_channels=2,
                           **t.network.get("kwargs", {}))
        assert sum(x.numel() for x in net.parameters()) > 0
    assert build_loss(t.loss, num_classes=3, class_counts=[10, 5, 1], options=t.loss_options) is not None


def test_hippocampus_pipeline_decays_to_its_time_budget_and_mirrors_left_right():
    """Behaviour, not YAML values: the schedule this pipeline builds starts at its learning rate and decays to zero
    exactly when the time budget is spent; its resolved configuration mirrors (and test-time mirrors) axis 0 only."""
    import torch

    from medseg.training.fold import resolve_configuration
    from medseg.training.optim import LRSchedule, build_optimizer

    p = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "hippocampus_3d.yaml")
    opt = build_optimizer(torch.nn.Linear(2, 2), p.train)
    sched = LRSchedule(opt, p.train)
    assert sched.step(1, 0.0) == pytest.approx(p.train.lr)
    mid = sched.step(5, 0.5)
    assert 0 < mid < p.train.lr
    assert sched.step(6, 1.0) == pytest.approx(0.0, abs=1e-9)  # the budget's end: nothing left to decay
    from medseg.planning import Configuration, NetworkSpec, Normalization, Plan

    conf = Configuration(spacing=[1.0] * 3, patch_size=[40, 56, 40], batch_size=8, network=NetworkSpec("unet"),
                         mirror_axes=[0, 1, 2])
    plan = Plan(dataset="h", spatial_dims=3, in_channels=1, num_classes=3, labels={0: "b", 1: "a", 2: "p"},
                normalization=[Normalization("zscore")], configurations={"3d_fullres": conf})
    resolved = resolve_configuration(plan, p)
    assert resolved.mirror_axes == [0] and resolved.batch_size == p.train.batch_size


@pytest.mark.parametrize("key,value,match", [
    ("optimizer", "adam", "train.optimizer='adam'"),
    ("epochs", 0, "train.epochs=0"),
    ("ema", 1.5, "train.ema=1.5"),
    ("lerning_rate", 0.1, "train.lerning_rate"),
    ("amp", "fp8", "train.amp='fp8'"),
])
def test_bad_train_option_names_the_key(key, value, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        pipeline_from_dict({"name": "x", "dataset": "/d", "train": {key: value}})


def test_a_yaml_without_a_name_is_named_after_its_file(tmp_path):
    """A minimal YAML (the data set and a budget) runs as `runs/<file name>`, like the shipped pipelines/NAME.yaml."""
    cfg = tmp_path / "liver_ct.yaml"
    cfg.write_text("dataset: data\ntrain: {max_minutes: 20}\n")
    p = load_pipeline(cfg)
    assert p.name == "liver_ct" and p.output == Path("runs/liver_ct") and p.dataset == tmp_path / "data"
    named = tmp_path / "other.yaml"
    named.write_text("name: kept\ndataset: data\n")
    assert load_pipeline(named).name == "kept"


def _hc18_names() -> list[str]:
    root = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hc18" / "training_set"
    if root.is_dir():
        return sorted(p.name for p in root.glob("*HC.png"))
    names = []  # synthetic: 60 subjects, some with 2-4 images, as in HC18
    for s in range(60):
        names += [f"{s:03d}_HC.png"] + [f"{s:03d}_{k}HC.png" for k in range(2, 2 + s % 4)]
    return names


def test_hc18_subjects_never_cross_folds():
    from medseg.data.manifest import Case, Manifest
    from medseg.data.splits import check_no_leakage, make_splits

    p = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "hc18_2d.yaml")
    regex = re.compile(p.patient_regex)
    names = _hc18_names()
    cases = [Case(n[:-4], regex.search(n).group(1), [Path(n)], Path(n)) for n in names]
    assert len({c.patient_id for c in cases}) < len(cases)  # some subjects have several images
    manifest = Manifest(Path("."), "hc18", cases, {0: "background", 1: "head"}, {0: "US"}, 2, [])
    splits = make_splits(manifest, p.folds, p.seed, stratify=False)
    check_no_leakage(splits, manifest)
    fold_of: dict[str, int] = {}
    for k, fold in enumerate(splits):
        for cid in fold["val"]:
            subject = cid.split("_")[0]
            assert fold_of.setdefault(subject, k) == k, f"subject {subject} in folds {fold_of[subject]} and {k}"
    assert sorted(c for f in splits for c in f["val"]) == sorted(c.case_id for c in cases)


def _tiny_plan():
    from medseg.planning import Configuration, NetworkSpec, Normalization, Plan

    conf = Configuration(spacing=[1.0] * 3, patch_size=[8, 8, 8], batch_size=2, network=NetworkSpec("unet"),
                         mirror_axes=[0, 1, 2])
    return Plan(dataset="d", spatial_dims=3, in_channels=1, num_classes=2, labels={0: "bg", 1: "fg"},
                normalization=[Normalization("zscore")], configurations={"3d_fullres": conf})


def test_training_mirror_axes_become_the_runs_test_time_mirror_axes():
    """TTA must flip only the axes training flipped: the resolved configuration (what the model record keeps and
    inference reads) takes the pipeline's augmentation.mirror_axes."""
    from medseg.training.fold import resolve_configuration

    plan = _tiny_plan()
    p = pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"augmentation": {"mirror_axes": [0]}}})
    assert resolve_configuration(plan, p).mirror_axes == [0]
    assert plan.configuration("3d_fullres").mirror_axes == [0, 1, 2]  # the planner's plan is not modified
    default = pipeline_from_dict({"name": "x", "dataset": "/d"})
    assert resolve_configuration(plan, default).mirror_axes == [0, 1, 2]
    bad = pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"augmentation": {"mirror_axes": [3]}}})
    with pytest.raises(ConfigError, match=r"mirror_axes"):
        resolve_configuration(plan, bad)
    patch = pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"patch_size": [8, 8]}})
    with pytest.raises(ConfigError, match=r"patch_size"):
        resolve_configuration(plan, patch)


def test_training_flips_the_configurations_mirror_axes(tmp_path, monkeypatch):
    """Training augmentation reads the mirror axes from the resolved configuration (what the record stores and
    inference reads), so training flips and TTA cannot disagree; a pipeline without augmentation stays without."""
    import dataclasses

    import medseg.data.loader
    from medseg.training.fold import RunData, _loader

    class Recorder:  # stands in for PatchLoader: records what it is given
        def __init__(self, cache_dir, case_ids, **kwargs):
            self.kwargs = kwargs
            self.augmentation = kwargs["augmentation"]

    monkeypatch.setattr(medseg.data.loader, "PatchLoader", Recorder)

    plan = _tiny_plan()
    conf = dataclasses.replace(plan.configuration("3d_fullres"), mirror_axes=[2])
    p = pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"augmentation": {"p_rotation": 0.0},
                                                                    "batches_per_epoch": 7}})
    run = RunData(p, None, plan, conf, [], tmp_path)
    loader = _loader(run, ["a"], 0, 0)
    assert loader.augmentation == {"p_rotation": 0.0, "mirror_axes": [2]}
    assert loader.kwargs["num_batches"] == 7 and loader.kwargs["patch_size"] == [8, 8, 8]  # no option dropped
    none = pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"augmentation": None}})
    assert _loader(RunData(none, None, plan, conf, [], tmp_path), ["a"], 0, 0).augmentation is None
