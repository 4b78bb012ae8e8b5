"""The one-fold trainer on synthetic data: it learns, writes every record, checkpoints load with
weights_only=True, resume continues the same run, schedules follow their definitions, early stopping works."""

from __future__ import annotations

import csv

import pytest
import torch
from _train_helpers import batches_fn, tiny_net, val_cases

from medseg.losses import build_loss
from medseg.runtime import load_checkpoint
from medseg.training.config import TrainConfig
from medseg.training.optim import LRSchedule
from medseg.training.trainer import Trainer, dice_per_class


def _trainer(tmp_path, **kw):
    cfg = TrainConfig(**{"epochs": 6, "batches_per_epoch": 3, "optimizer": "adamw", "lr": 0.02, "val_every": 2,
                         "checkpoint_every": 1, "amp": "fp32", "threads": 1, **kw}).validate()
    net, spec = tiny_net()
    loss = build_loss(cfg.loss, num_classes=3)
    return Trainer(net, spec, loss, cfg, tmp_path, train_batches=batches_fn(), val_cases=val_cases(),
                   patch_size=(16, 16, 16), num_classes=3)


def test_trainer_learns_and_writes_the_fold_record(tmp_path):
    torch.set_num_threads(1)
    result = _trainer(tmp_path, epochs=8).fit()
    assert result.epochs == 8 and result.best_epoch >= 1
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(8))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_dice"]) > 0.3
    assert {"val_dice_1", "val_dice_2", "val_dice_ema", "lr"} <= set(rows[-1])
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert list(tmp_path.glob("events.out.tfevents.*"))
    ckpt = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    assert ckpt["epoch"] == 7 and ckpt["network"]["name"] == "unet" and ckpt["fold"] is None
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor) and "state" in ckpt["optimizer"]


def test_resume_continues_the_same_run(tmp_path):
    torch.set_num_threads(1)
    full = _trainer(tmp_path / "full")
    full.fit()
    part = _trainer(tmp_path / "part")
    batches = part.train_batches

    def dies_in_epoch_3(epoch):
        if epoch == 3:
            raise KeyboardInterrupt  # as if killed after epoch 2's checkpoint ...
        return batches(epoch)

    part.train_batches = dies_in_epoch_3
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed = _trainer(tmp_path / "part")  # ... then a fresh process resumes with the full length
    resumed.fit(resume=True)
    a, b = full.network.state_dict(), resumed.network.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    rows = list(csv.DictReader((tmp_path / "part" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(6))


def test_channels_last_trains_the_same_network(tmp_path):
    """channels_last changes only the memory layout: same losses as the default layout (to float tolerance), and
    its checkpoint loads into a default-layout network."""
    torch.set_num_threads(1)
    a = _trainer(tmp_path / "a", epochs=2)
    a.fit()
    b = _trainer(tmp_path / "b", epochs=2, channels_last=True)
    assert next(b.network.parameters()).dim() < 5 or any(
        p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
        for p in b.network.parameters() if p.dim() == 5)
    b.fit()
    la = [float(r["train_loss"]) for r in csv.DictReader((tmp_path / "a" / "metrics.csv").open())]
    lb = [float(r["train_loss"]) for r in csv.DictReader((tmp_path / "b" / "metrics.csv").open())]
    assert la == pytest.approx(lb, rel=1e-3)
    net, _ = tiny_net()
    net.load_state_dict(load_checkpoint(tmp_path / "b" / "checkpoint_latest.pt")["state_dict"])
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval()
    b.network.eval()
    torch.testing.assert_close(net(x), b.network(x.contiguous(memory_format=torch.channels_last_3d)),
                               atol=1e-4, rtol=1e-4)


def test_early_stopping(tmp_path):
    tr = _trainer(tmp_path, epochs=40, lr=1e-9, val_every=1, patience=2, ema=0.0)
    res = tr.fit()
    assert res.stopped_early and res.epochs < 40


@pytest.mark.parametrize("kind", ["poly", "cosine", "constant"])
def test_schedules(kind):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, TrainConfig(schedule=kind, lr=1.0, warmup_epochs=2))
    assert sched.step(0, 0.0) == pytest.approx(0.5)  # warm-up: epoch 1 of 2
    mid = sched.step(5, 0.5)
    expected = {"poly": 0.5**0.9, "cosine": 0.5, "constant": 1.0}[kind]
    assert mid == pytest.approx(expected) and opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert sched.step(9, 1.0) == pytest.approx(0.0 if kind != "constant" else 1.0)


def test_plateau_halves_after_patience():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, TrainConfig(schedule="plateau", lr=1.0))
    for _ in range(5):
        sched.observe(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_time_budget_ends_the_schedule(tmp_path):
    tr = _trainer(tmp_path, epochs=10_000, max_minutes=0.05, schedule="poly", val_every=1000)
    res = tr.fit()
    assert 1 <= res.epochs < 10_000 and res.elapsed_s >= 3.0
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert "val_dice" in rows[-1]  # the final epoch is always validated
    assert float(rows[-1]["lr"]) < 0.02 * 0.5


def test_dice_per_class():
    import numpy as np

    pred = np.array([0, 1, 1, 2, 0])
    ref = np.array([0, 1, 0, 2, 2])
    d = dice_per_class(pred, ref, 4)
    assert d[0] == pytest.approx(2 / 3) and d[1] == pytest.approx(2 / 3) and np.isnan(d[2])


def test_bad_checkpoint_is_an_input_error(tmp_path):
    from medseg.errors import InputError

    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="x.pt"):
        load_checkpoint(tmp_path / "x.pt")
