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


def test_hippocampus_pipeline_is_time_budgeted():
    p = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "hippocampus_3d.yaml")
    assert p.train.max_minutes == 20 and p.train.schedule in ("poly", "cosine") and p.train.amp == "auto"
    assert p.dataset.parts[-3:] == ("shared", "data", "hippocampus")


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


def test_training_mirror_axes_become_the_runs_test_time_mirror_axes():
    """TTA must flip only the axes training flipped: the run's plan.json (what inference reads) takes them."""
    from medseg.training.fold import _apply_train_overrides

    plan = {"configurations": {"3d_fullres": {"patch_size": [8, 8, 8], "batch_size": 2, "mirror_axes": [0, 1, 2]}}}
    p = pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"augmentation": {"mirror_axes": [0]}}})
    out = _apply_train_overrides(plan, p)
    assert out["configurations"]["3d_fullres"]["mirror_axes"] == [0]
    assert plan["configurations"]["3d_fullres"]["mirror_axes"] == [0, 1, 2]  # the planner's plan is not modified
    default = pipeline_from_dict({"name": "x", "dataset": "/d"})
    assert _apply_train_overrides(plan, default)["configurations"]["3d_fullres"]["mirror_axes"] == [0, 1, 2]
    bad = pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"augmentation": {"mirror_axes": [3]}}})
    with pytest.raises(ConfigError, match=r"mirror_axes"):
        _apply_train_overrides(plan, bad)


def test_training_flips_the_run_plans_mirror_axes(tmp_path, monkeypatch):
    """Training augmentation reads the mirror axes from the run's plan (what inference reads), so a plan.json
    edited by hand and the training flips cannot disagree; a pipeline without augmentation stays without."""
    import medseg.data.loader
    from medseg.training.fold import RunData, _loader

    class Recorder:  # stands in for PatchLoader: records the augmentation it is given
        def __init__(self, cache_dir, case_ids, *, augmentation=None):
            self.augmentation = augmentation

    monkeypatch.setattr(medseg.data.loader, "PatchLoader", Recorder)

    plan = {"spatial_dims": 3, "configurations": {"3d_fullres": {"patch_size": [8, 8, 8], "batch_size": 2,
                                                                 "mirror_axes": [2]}}}
    p = pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"augmentation": {"p_rotation": 0.0}}})
    run = RunData(p, None, plan, [], tmp_path)
    assert _loader(run, ["a"], 0, 0).augmentation == {"p_rotation": 0.0, "mirror_axes": [2]}
    none = pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"augmentation": None}})
    assert _loader(RunData(none, None, plan, [], tmp_path), ["a"], 0, 0).augmentation is None
