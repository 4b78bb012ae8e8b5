"""Data-parallel training through torchrun: two CPU processes with the gloo backend stay in lockstep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    worker = Path(__file__).with_name("_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(worker), str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["epochs"] == r1["epochs"] == 2
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), k  # all-reduced gradients: identical weights on both ranks
    # the weights moved away from a fresh initialisation: training really happened
    sys.path.insert(0, str(Path(__file__).parent))
    from _train_helpers import tiny_net

    fresh = tiny_net(seed=0)[0].state_dict()
    assert any(not torch.allclose(fresh[k].float(), v.float()) for k, v in r0["state_dict"].items())
    # rank 0 alone wrote the fold record
    assert (tmp_path / "fold_0" / "metrics.csv").is_file() and (tmp_path / "fold_0" / "checkpoint_best.pt").is_file()


def test_ddp_ranks_hold_a_time_budget_mid_epoch_in_lockstep(tmp_path):
    """An epoch of 100,000 steps under a 6-second budget: the ranks stop at the same step within the budget (before,
    DDP ranks only looked at the clock between epochs and would have trained the whole epoch)."""
    worker = Path(__file__).with_name("_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(worker), str(tmp_path), "budget"], capture_output=True, text=True, timeout=150,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["wall_s"] < 60 and r1["wall_s"] < 60, (r0["wall_s"], r1["wall_s"])  # 6 s budget + validation
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), k  # same steps at the same learning rate on both ranks
