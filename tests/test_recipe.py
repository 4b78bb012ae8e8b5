"""No YAML needed: the training recipe for the device and budget, a budget held to the step, adaptive intervals."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from _train_helpers import batches_fn, tiny_net, val_cases

from medseg.losses import build_loss
from medseg.training.config import TrainConfig, load_pipeline
from medseg.training.recipe import train_recipe
from medseg.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_recipe_for_device_and_budget():
    cpu, why = train_recipe("cpu", None)
    assert cpu["optimizer"] == "adamw" and cpu["max_minutes"] == 20 and "20 minutes per fold" in why
    assert cpu["val_every_minutes"] == pytest.approx(2.0) and cpu["batch_scale"] == 0.5
    gpu_long, why = train_recipe("cuda", None)
    assert gpu_long["optimizer"] == "sgd" and gpu_long["momentum"] == 0.99 and gpu_long["max_minutes"] is None
    assert "nnU-Net" in why
    gpu_short, _ = train_recipe("cuda", 5)
    assert gpu_short["optimizer"] == "adamw" and gpu_short["val_every_minutes"] == pytest.approx(0.5)


def test_yaml_overrides_the_recipe(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "dataset": str(tmp_path),
                                    "train": {"optimizer": "sgd", "val_every": 3, "batch_size": 6,
                                              "device": "cpu"}}))
    p = load_pipeline(path)
    assert p.train.optimizer == "sgd" and p.train.lr == pytest.approx(3e-3)  # YAML key kept, recipe fills the rest
    assert p.train.val_every == 3 and p.train.val_every_minutes is None  # an interval in epochs is kept as given
    assert p.train.batch_size == 6 and p.train.batch_scale == 1.0
    assert p.train.max_minutes == 20 and "short-schedule" in p.recipe
    bare = load_pipeline(None, {"dataset": str(tmp_path), "train": {"device": "cpu", "max_minutes": 7}})
    assert bare.name == tmp_path.name and bare.configuration == "auto" and bare.train.max_minutes == 7
    assert bare.train.checkpoint_every_minutes == pytest.approx(7 / 8)
    from medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="--dataset"):
        load_pipeline(None, {})


def _trainer(tmp_path, n_val=2, **kw) -> Trainer:
    net, spec = tiny_net()
    cfg = TrainConfig(**{"epochs": 50, "batches_per_epoch": 1000, "optimizer": "adamw", "lr": 0.01,
                         "amp": "fp32", "threads": 1, **kw}).validate()
    loss = build_loss("dice_ce", num_classes=3)
    return Trainer(net, spec, loss, cfg, tmp_path, train_batches=batches_fn(per_epoch=1000),
                   val_cases=val_cases(n=n_val), patch_size=(16, 16, 16), num_classes=3)


def test_time_budget_is_held_to_the_step(tmp_path):
    """A 1000-batch epoch does not outlast a 5-second budget: the budget is checked every step, the run ends
    with a final validation and a finished checkpoint, and validations came every tenth of the budget."""
    budget_min = 5 / 60
    trainer = _trainer(tmp_path, max_minutes=budget_min, val_every_minutes=budget_min / 10,
                       checkpoint_every_minutes=budget_min / 4)
    res = trainer.fit()
    assert res.elapsed_s <= 60 * budget_min + 3.0  # one step and one validation of slack
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert all(int(r["epoch_s"].split(".")[0]) < 60 * budget_min + 2 for r in rows)
    validations = [r for r in rows if r.get("val_dice")]
    assert len(validations) >= 4  # time-based validation, not once per 1000-batch epoch
    ckpt = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["elapsed_s"] == pytest.approx(res.elapsed_s, abs=1e-6)


def test_validation_subset_fits_the_budget(tmp_path):
    """With a budget, validation uses the first cases that keep it within ~1.5% of the budget (at least 2)."""
    trainer = _trainer(tmp_path, n_val=6, max_minutes=0.01, epochs=1, batches_per_epoch=1)
    trainer.fit()
    assert trainer._val_subset == 2
    unbudgeted = _trainer(tmp_path / "b", n_val=6, epochs=1, batches_per_epoch=1)
    unbudgeted.fit()
    assert unbudgeted._val_subset == 6


def test_crossval_needs_no_yaml(tmp_path):
    """`medseg crossval --dataset DIR` runs with every choice from the plan and the recipe; the run folder records
    the resolved configuration."""
    from medseg.cli.main import main
    from medseg.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n_cases=10, seed=0)
    run = tmp_path / "run"
    assert main(["-q", "crossval", "--dataset", str(data), "--folds", "0", "--epochs", "1", "--time-budget", "0.15",
                 "--output", str(run), "--no-progress", "--device", "cpu"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    # the demo plan lists 3d_fullres and 2d; `auto` trains the one 3D configuration, in the ordinary run folder
    assert cfg["configuration"] == "3d_fullres" and cfg["train"]["optimizer"] == "adamw"
    assert "short-schedule" in cfg["recipe"] and cfg["train"]["max_minutes"] == 0.15
    plan = json.loads((run / "plan.json").read_text())["configurations"]
    assert list(plan) == ["3d_fullres", "2d"] and not (run / "2d").exists()
    record = json.loads((run / "model.json").read_text())
    assert record["configuration"] == "3d_fullres"
    assert record["config"]["batch_size"] == max(2, round(plan["3d_fullres"]["batch_size"] * 0.5))  # sized for steps
    assert json.loads((run / "crossval_summary.json").read_text())["n_cases"] > 0
