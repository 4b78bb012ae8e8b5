"""`medseg crossval` under torchrun (2 gloo CPU ranks, one thread each, a 4-case synthetic set, 1 epoch of 2 steps):
the ranks share preprocessing, folds and OOF predictions and leave the same run folder as one process; a rank that
raises ends the run with its message; two "nodes" (two torchrun launchers, c10d rendezvous on localhost) train in
lockstep to identical weights."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

TINY = {
    "name": "dist",
    "configuration": "3d_fullres",
    "folds": 2,
    "seed": 0,
    "train": {"epochs": 1, "batches_per_epoch": 2, "val_every": 1, "checkpoint_every": 1, "batch_size": 2,
              "patch_size": [16, 16, 16], "device": "cpu", "amp": "fp32", "threads": 1,
              "augmentation": {"mirror_axes": []},
              "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2]}}},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _config(folder: Path, data: Path, **top) -> Path:
    cfg = {**json.loads(json.dumps(TINY)), "dataset": str(data), "output": str(folder / "run"),
           "cache": str(folder / "cache"), **top}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dist.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "medseg.cli.main", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The data set and its crossval in one process (the reference)."""
    from medseg.cli.main import main
    from medseg.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("dist")
    data = make_demo_dataset(root / "data", n_cases=4, seed=0)
    torch.set_num_threads(1)
    assert main(["-q", "crossval", "--config", str(_config(root / "single", data)), "--no-progress"]) == 0
    return root, data


def _rows(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with path.open() as f:
        return {(r["case"], r["fold"], r["label"]): r for r in csv.DictReader(f)}


def _close(a: str, b: str) -> bool:
    if a == b:
        return True
    fa, fb = float(a), float(b)
    return math.isclose(fa, fb, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(fa) and math.isnan(fb))


def test_two_ranks_give_the_single_process_run(single):
    root, data = single
    ref = root / "single" / "run"
    res = _torchrun("crossval", "--config", str(_config(root / "two", data)), "--no-progress")
    assert res.returncode == 0, res.stderr[-4000:]
    run = root / "two" / "run"
    # the work was spread: each rank preprocessed half the cases into the shared cache and trained one fold
    assert "share 0 of 2" in res.stderr and "share 1 of 2" in res.stderr
    assert "rank 0 of 2 trains folds [0]" in res.stderr and "rank 1 of 2 trains folds [1]" in res.stderr
    assert res.stdout.count("out-of-fold mean foreground Dice") == 1  # rank 0 alone reports
    # same folds, same model record, same post-processing choice
    for name in ("splits.json", "model.json", "postprocessing.json"):
        assert json.loads((run / name).read_text()) == json.loads((ref / name).read_text()), name
    # same out-of-fold metrics (all cases, every class and metric), within float tolerance
    a, b = _rows(ref / "per_case.csv"), _rows(run / "per_case.csv")
    assert a.keys() == b.keys() and len(a) == 8  # 4 cases x 2 classes
    for key, row in a.items():
        bad = [m for m, v in row.items() if not _close(v, b[key][m])]
        assert not bad, (key, bad)
    sa, sb = (json.loads((d / "crossval_summary.json").read_text()) for d in (ref, run))
    for s in (sa, sb):
        for t in s["training"].values():
            t.pop("elapsed_s")
    assert sa == sb and sorted(sb["training"]) == ["0", "1"]
    # the same model folder: the same files per fold and the same fold weights
    def files(d: Path) -> set[str]:  # the tensorboard file is named by its time and process id
        return {p.relative_to(d).as_posix().split(".out.tfevents.")[0] for p in d.rglob("*") if p.is_file()}

    splits = json.loads((run / "splits.json").read_text())
    for fold in (0, 1):
        assert files(ref / f"fold_{fold}") == files(run / f"fold_{fold}")
        assert files(run / f"fold_{fold}") >= {"checkpoint_best.pt", "checkpoint_latest.pt", "metrics.csv",
                                               "per_case.csv", "events",
                                               *(f"validation/{c}.nii.gz" for c in splits[fold]["val"])}
        wa = torch.load(ref / f"fold_{fold}" / "checkpoint_best.pt", weights_only=True)["state_dict"]
        wb = torch.load(run / f"fold_{fold}" / "checkpoint_best.pt", weights_only=True)["state_dict"]
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), (fold, k)
    # the cache the two ranks filled is the one process's, case by case
    ca, cb = next((root / "single" / "cache").glob("*/3d_fullres")), next((root / "two" / "cache").glob("*/3d_fullres"))
    names = sorted(p.name for p in ca.iterdir())
    assert names == sorted(p.name for p in cb.iterdir()) and len(names) == 13  # 4 x (npy, seg, json) + config
    for name in names:
        if name.endswith(".npy"):
            assert np.array_equal(np.load(ca / name), np.load(cb / name)), name


def test_a_rank_that_raises_stops_the_run_with_its_message(single, tmp_path):
    """Rank 1's share of the preprocessing holds a corrupt image: rank 0, waiting at the cache barrier (a timeout
    of minutes), stops within seconds with rank 1's message, and the run exits non-zero."""
    from medseg.data.manifest import load_manifest

    root, data = single
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    case = load_manifest(broken).cases[1]  # preprocess_dataset(shard=(1, 2)) takes cases 1, 3
    image = Path(case.images[0])
    image.write_bytes(image.read_bytes()[:200])  # a truncated gzip stream
    cfg = _config(tmp_path / "out", broken, plan=str(root / "single" / "run" / "plan.json"))
    t0 = time.monotonic()
    res = _torchrun("crossval", "--config", str(cfg), "--no-progress")
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    # rank 1's own one-line error, and rank 0 stopping with it (not a hang, not a traceback)
    assert f"medseg crossval: error: {image}" in res.stderr, res.stderr[-4000:]
    assert "medseg crossval: error: rank 1 (" in res.stderr and image.name in res.stderr.split("error: rank 1 (")[1]
    assert not [line for line in res.stderr.splitlines() if line.strip().startswith("File") and "/medseg/" in line]
    assert elapsed < 120  # the cache barrier would have waited 300 s and more
    assert not (tmp_path / "out" / "run" / "model.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_to_identical_weights(tmp_path):
    """Two torchrun launchers (`--nnodes 2`, one gloo process each) meet through the c10d rendezvous and train one
    fold data-parallel: both nodes end with the same weights, which moved from the initialisation."""
    worker = Path(__file__).with_name("_ddp_worker.py")
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "medseg-test"]
    nodes = [subprocess.Popen([*cmd, "--node-rank", str(i), str(worker), str(tmp_path)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[1][-2000:] for o in outs)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["epochs"] == r1["epochs"] == 2
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), k
    sys.path.insert(0, str(Path(__file__).parent))
    from _train_helpers import tiny_net

    fresh = tiny_net(seed=0)[0].state_dict()
    assert any(not torch.allclose(fresh[k].float(), v.float()) for k, v in r0["state_dict"].items())


def _two_nodes(args: list[str], timeout: float = 300) -> list[tuple[int, str]]:
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "medseg-crossval"]
    nodes = [subprocess.Popen([*cmd, "--node-rank", str(i), "-m", "medseg.cli.main", *args], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    return [(p.returncode, out + err) for p in nodes for out, err in [p.communicate(timeout=timeout)]]


@pytest.mark.slow
@pytest.mark.parametrize("ddp", [False, True], ids=["fold-per-node", "ddp"])
def test_two_node_crossval(single, ddp):
    """`medseg crossval` on two "nodes": one fold per node gives the one-process metrics; with --ddp both nodes
    train every fold together and the run folder is complete."""
    root, data = single
    out = root / f"nodes-{ddp}"
    results = _two_nodes(["crossval", "--config", str(_config(out, data)), "--no-progress",
                          *(["--ddp"] if ddp else [])])
    assert [rc for rc, _ in results] == [0, 0], "\n".join(o[-3000:] for _, o in results)
    run = out / "run"
    assert json.loads((run / "model.json").read_text())["folds"] == [0, 1]
    a, b = _rows(root / "single" / "run" / "per_case.csv"), _rows(run / "per_case.csv")
    assert a.keys() == b.keys()
    if not ddp:
        for key, row in a.items():
            assert all(_close(v, b[key][m]) for m, v in row.items()), key
    else:
        assert "world 2" in "".join(o for _, o in results)  # the folds were trained data-parallel


@pytest.mark.slow
def test_a_node_stopped_mid_training_stops_the_other_node(single):
    """SIGTERM to one node's torchrun (scancel, preemption) while both nodes train a fold of a 3-minute budget:
    the other node stops within seconds with that rank's reason instead of training on (a real-time test of the
    watchdog, which a single torchrun cannot show: it stops its own processes itself)."""
    import signal

    root, data = single
    out = root / "stopped"
    cfg = _config(out, data)
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "medseg-stop"]
    args = ["-m", "medseg.cli.main", "crossval", "--config", str(cfg), "--no-progress", "--epochs", "1000",
            "--time-budget", "3"]
    nodes = []
    for i in range(2):  # node 0 first: it hosts the rendezvous store
        nodes.append(subprocess.Popen([*cmd, "--node-rank", str(i), *args], env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        time.sleep(3)
    deadline = time.monotonic() + 180
    while not all((out / "run" / f"fold_{k}").is_dir() for k in (0, 1)):  # both ranks are training
        assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), "training did not start"
        time.sleep(0.5)
    time.sleep(2)
    nodes[1].send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    survivor = nodes[0].communicate(timeout=120)[0]
    stopped_after = time.monotonic() - t0
    print(f"survivor stopped {stopped_after:.1f} s after the SIGTERM")
    stopped = nodes[1].communicate(timeout=60)[0]
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert "failed: terminated (SIGTERM)" in survivor, survivor[-3000:] + stopped[-2000:]
    assert "medseg crossval: error: rank " in survivor
    assert stopped_after < 60  # not the rest of a 3-minute budget


@pytest.mark.slow
def test_train_under_torchrun_shares_the_preprocessing(single):
    """`torchrun medseg train`: rank 0 plans while rank 1 waits at a store barrier (not an NCCL/gloo one), each
    rank preprocesses half the cases, both train the fold data-parallel, rank 0 writes the record."""
    root, data = single
    out = root / "train"
    res = _torchrun("train", "--config", str(_config(out, data)), "--fold", "0", "--no-progress")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "share 0 of 2" in res.stderr and "share 1 of 2" in res.stderr and "world 2" in res.stderr
    assert json.loads((out / "run" / "model.json").read_text())["folds"] == [0]
    assert len(list((out / "cache").glob("*/3d_fullres/*_seg.npy"))) == 4
