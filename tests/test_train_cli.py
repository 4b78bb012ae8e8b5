"""`medseg train` / `medseg crossval` end to end on tiny synthetic demo data: every artefact of the run folder,
`medseg predict`'s Predictor uses it as it is, kill -9 then --resume finishes the same run, bad input is one line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

TINY = {
    "name": "tiny",
    "configuration": "3d_fullres",
    "folds": 2,
    "seed": 0,
    "train": {"epochs": 2, "batches_per_epoch": 2, "optimizer": "adamw", "lr": 0.003, "val_every": 1,
              "checkpoint_every": 1, "batch_size": 2, "patch_size": [16, 16, 16], "device": "cpu",
              "val_max_cases": 2, "threads": 1,
              "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2], "kernel_sizes": 3}}},
}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from medseg.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_cases=6, seed=0)


def _config(tmp_path: Path, data: Path, **train) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["dataset"] = str(data)
    cfg["output"] = str(tmp_path / "run")
    cfg["cache"] = str(tmp_path.parent / "shared_cache")
    cfg["train"].update(train)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _medseg(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_crossval_writes_every_artefact_and_predict_uses_the_run(tmp_path, demo_data):
    from medseg.cli.main import main

    cfg = _config(tmp_path, demo_data)
    assert main(["-q", "crossval", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "plan.json", "splits.json", "model.json", "environment.json",
                 "crossval_summary.json", "postprocessing.json", "per_case.csv"):
        assert (run / name).stat().st_size > 0, name
    splits = json.loads((run / "splits.json").read_text())
    # the model record carries what training used, since inference reads it alone (patch, batch, network)
    conf = json.loads((run / "model.json").read_text())["config"]
    assert conf["patch_size"] == [16, 16, 16] and conf["batch_size"] == 2
    net = TINY["train"]["network"]
    assert conf["network"]["name"] == net["name"]
    assert {k: conf["network"]["kwargs"][k] for k in net["kwargs"]} == net["kwargs"]
    for k in range(2):
        fold = run / f"fold_{k}"
        for name in ("checkpoint_best.pt", "checkpoint_latest.pt", "metrics.csv", "curves.png", "per_case.csv"):
            assert (fold / name).stat().st_size > 0, (k, name)
        assert list(fold.glob("events.out.tfevents.*"))
        assert sorted(p.name[: -len(".nii.gz")] for p in (fold / "validation").glob("*.nii.gz")) == sorted(
            splits[k]["val"])
        ckpt = torch.load(fold / "checkpoint_best.pt", weights_only=True)
        assert ckpt["network"]["name"] == "unet"
    env = json.loads((run / "environment.json").read_text())
    assert env["manifest_hash"] and env["packages"]["torch"] and "git" in env
    model = json.loads((run / "model.json").read_text())
    assert model["folds"] == [0, 1] and model["configuration"] == "3d_fullres"
    summary = json.loads((run / "crossval_summary.json").read_text())
    assert summary["n_cases"] == 6 and 0 <= summary["mean_foreground_dice"] <= 1
    dice1 = summary["classes"]["1"]["metrics"]["dice"]
    assert dice1["ci_low"] <= dice1["mean"] <= dice1["ci_high"] and dice1["n"] >= 1
    rows = list(csv.DictReader((run / "per_case.csv").open()))
    assert {r["case"] for r in rows} == {c for s in splits for c in s["val"]}
    pp = json.loads((run / "postprocessing.json").read_text())
    assert pp["report"]["mean_dice_after"] >= pp["report"]["mean_dice_before"]
    # the run folder is a model folder as it is: the OOF prediction of a case equals the fold's prediction
    from medseg.inference import Predictor
    from medseg.io import read_volume
    from medseg.transforms.case import load_case

    case_id = splits[0]["val"][0]
    image, _ = load_case(sorted((demo_data / "imagesTr").glob(f"{case_id}*")))
    pred = Predictor.from_run(run, folds=[0], device="cpu", postprocess=False, amp="bf16").predict(image)
    oof = read_volume(run / "fold_0" / "validation" / f"{case_id}.nii.gz")
    assert pred.same_geometry(oof) and pred.same_geometry(image)
    assert (pred.array == oof.array).mean() > 0.99
    # a second crossval reuses the finished folds and predictions instead of retraining
    t0 = time.perf_counter()
    assert main(["-q", "crossval", "--config", str(cfg), "--no-progress"]) == 0
    assert time.perf_counter() - t0 < 60
    # ... but a changed configuration never reuses (nor relabels) this run folder
    before = (run / "config.yaml").read_text()
    changed = _config(tmp_path, demo_data, lr=0.01)
    proc = _medseg("-q", "crossval", "--config", str(changed), "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "different configuration" in proc.stderr and "train.lr" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == before


def test_kill_9_then_resume_finishes_the_same_run(tmp_path, demo_data):
    cfg = _config(tmp_path, demo_data, epochs=8, val_every=4)
    fold = tmp_path / "run" / "fold_0"
    proc = subprocess.Popen([sys.executable, "-m", "medseg.cli.main", "-q", "train", "--config", str(cfg),
                             "--fold", "0", "--no-progress"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            # two epochs done and checkpointed (the checkpoint is written after the metrics row, atomically)
            ckpt = fold / "checkpoint_latest.pt"
            if ckpt.is_file() and torch.load(ckpt, weights_only=True)["epoch"] >= 1:
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(fold / "checkpoint_latest.pt", weights_only=True)
    assert not killed_at["finished"] and 1 <= killed_at["epoch"] < 7
    res = _medseg("train", "--config", str(cfg), "--fold", "0", "--resume", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert f"resumed from {fold / 'checkpoint_latest.pt'} at epoch {killed_at['epoch'] + 1}" in res.stderr
    final = torch.load(fold / "checkpoint_latest.pt", weights_only=True)
    assert final["finished"] and final["epoch"] == 7
    epochs = [int(r["epoch"]) for r in csv.DictReader((fold / "metrics.csv").open())]
    assert epochs == list(range(8))
    assert json.loads((tmp_path / "run" / "model.json").read_text())["folds"] == [0]


def test_bad_config_is_one_line(tmp_path, demo_data):
    cfg = _config(tmp_path, demo_data, loss="dice_cee")
    res = _medseg("train", "--config", str(cfg), "--fold", "0")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "medseg train: error: train.loss='dice_cee' is invalid; expected one of "
        "ce, weighted_ce, dice, dice_ce, focal, dice_focal, tversky, iou, border_ce"]
    res = _medseg("train", "--config", str(tmp_path / "absent.yaml"), "--fold", "0")
    assert res.returncode == 1 and "absent.yaml: pipeline config not found" in res.stderr
    cfg = _config(tmp_path, demo_data)
    res = _medseg("train", "--config", str(cfg), "--fold", "7")
    assert res.returncode == 1 and "fold 7" in res.stderr and "Traceback" not in res.stderr
