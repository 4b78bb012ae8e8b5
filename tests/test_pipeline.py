"""Pipelined batch prediction (``--workers N``): the same masks and statuses as one case after the other, a bounded
number of cases in memory, and a clean stop on KeyboardInterrupt."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import PLAN, synthetic_case, wait_for_first_output

from medseg.cli.main import main
from medseg.errors import ConfigError
from medseg.inference import Predictor
from medseg.inference.batch import discover_cases, predict_cases
from medseg.inference.pipeline import max_in_flight, run_pipeline, split_workers
from medseg.io.atomic import TMP_MARKER
from medseg.io.nifti import write_nifti
from medseg.planning import ModelRecord, Plan, write_model_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAILS_IN_FINISH = (20, 18, 12)  # the shape of the case whose restore raises


class _Predictor(Predictor):
    """A Predictor whose finish fails for one case (by its shape), whose network may be slowed down or interrupted,
    and which counts the cases between prepare and the end of finish."""

    def __init__(self, *args, delay: float = 0.0, interrupt_at: int | None = None, finish_delay: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.delay, self.interrupt_at, self.finish_delay = delay, interrupt_at, finish_delay
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = self.network_calls = 0

    def prepare(self, volume):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return super().prepare(volume)

    def predict_array(self, image):
        self.network_calls += 1
        if self.interrupt_at is not None and self.network_calls == self.interrupt_at:
            raise KeyboardInterrupt
        time.sleep(self.delay)
        return super().predict_array(image)

    def finish(self, prepared, prob, **kw):
        try:
            time.sleep(self.finish_delay)
            if prepared.volume.shape == FAILS_IN_FINISH:
                raise RuntimeError("restore failed on purpose")
            return super().finish(prepared, prob, **kw)
        finally:
            with self.lock:
                self.in_flight -= 1


def _predictor(**kw) -> _Predictor:
    from medseg.networks import create_model

    plan = Plan.from_dict(PLAN)
    record = ModelRecord.from_plan(plan, "3d_fullres", plan.configuration("3d_fullres"), folds=[0])
    cfg = PLAN["configurations"]["3d_fullres"]
    torch.manual_seed(0)
    net = create_model("unet", spatial_dims=3, in_channels=1, out_channels=3, **cfg["network"]["kwargs"])
    return _Predictor([net], record, device="cpu", options=None, **kw)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Six good cases of different shapes, one corrupt file and one case that fails in finish."""
    root = tmp_path_factory.mktemp("in")
    shapes = [(28, 24, 14), (30, 22, 12), (26, 26, 16), (24, 20, 14), (32, 24, 10), (28, 28, 12)]
    for i, shape in enumerate(shapes):
        write_nifti(synthetic_case(60 + i, shape=shape)[0], root / f"case{i}.nii.gz")
    write_nifti(synthetic_case(70, shape=FAILS_IN_FINISH)[0], root / "case_finish_fails.nii.gz")
    (root / "case_corrupt.nii.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    return root


def _masks(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    res = {}
    for p in sorted(out.glob("*.nii.gz")):
        img = nib.load(p)
        res[p.name] = (np.asarray(img.dataobj), img.affine, str(img.get_data_dtype()))
    return res


@pytest.mark.parametrize("workers", [2, 3])
def test_pipelined_writes_exactly_the_sequential_masks(inputs, tmp_path, workers):
    pred = _predictor()
    cases = discover_cases(inputs)
    seq = predict_cases(pred, cases, tmp_path / "seq", uncertainty=True, workers=1)
    order: list[str] = []
    par = predict_cases(pred, cases, tmp_path / "par", uncertainty=True, workers=workers,
                        on_case=lambda r: order.append(r.case_id))
    assert [(r.case_id, r.status, r.error) for r in par] == [(r.case_id, r.status, r.error) for r in seq]
    assert order == [c.case_id for c in cases]  # reported in order, as they finish
    status = {r.case_id: r.status for r in par}
    assert status.pop("case_corrupt") == "failed" and status.pop("case_finish_fails") == "failed"
    assert set(status.values()) == {"written"} and len(status) == 6
    assert "restore failed on purpose" in next(r.error for r in par if r.case_id == "case_finish_fails")
    a, b = _masks(tmp_path / "seq"), _masks(tmp_path / "par")
    assert sorted(a) == sorted(b) and len(a) == 12  # mask + uncertainty of the six good cases
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
        assert a[name][0].dtype == b[name][0].dtype and a[name][2] == b[name][2]
        np.testing.assert_array_equal(a[name][1], b[name][1])
    assert not [p for p in (tmp_path / "par").iterdir() if p.name.startswith(TMP_MARKER)]
    # the staged path is predict_full: the first good case's mask equals the Predictor's own prediction
    from medseg.io import read_volume

    direct = pred.predict(read_volume(inputs / "case0.nii.gz"))
    np.testing.assert_array_equal(direct.array[0], a["case0.nii.gz"][0])


def test_queue_bound_holds_with_a_slow_network(inputs, tmp_path):
    pred = _predictor(delay=0.15)
    cases = [c for c in discover_cases(inputs) if c.case_id.startswith("case") and c.case_id[4:].isdigit()]
    results = predict_cases(pred, cases, tmp_path / "out", workers=2)
    assert [r.status for r in results] == ["written"] * 6
    # with reads 0.15 s faster than the network, the reader runs ahead until the queue is full: more than one
    # case is in flight (the stages overlap), never more than the bound
    assert 2 <= pred.most_in_flight <= max_in_flight(2)


def test_run_pipeline_bound_order_and_overlap():
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def read(i):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.002)
        return i

    def infer(i):
        time.sleep(0.02)  # the slow stage
        return i * 10

    def write(j):
        time.sleep(0.004 if j % 20 else 0.03)
        with lock:
            state["now"] -= 1
        return j

    for workers in (2, 3, 4):
        state.update(now=0, most=0)
        assert run_pipeline(range(30), read, infer, write, workers=workers) == [i * 10 for i in range(30)]
        assert 3 <= state["most"] <= max_in_flight(workers), (workers, state)
    assert split_workers(2) == (1, 1) and split_workers(3) == (1, 2)
    with pytest.raises(ConfigError, match="workers"):
        run_pipeline([1], read, infer, write, workers=0)


def test_keyboard_interrupt_stops_cleanly_and_leaves_no_temporaries(inputs, tmp_path):
    pred = _predictor(interrupt_at=4, finish_delay=0.3)
    cases = [c for c in discover_cases(inputs) if c.case_id.startswith("case") and c.case_id[4:].isdigit()]
    out = tmp_path / "out"
    done: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        predict_cases(pred, cases, out, workers=2, on_case=lambda r: done.append(r.case_id))
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(TMP_MARKER)], names
    assert 1 <= len(names) <= 3  # cases 0..2 went through the network; what was written is complete
    for n in names:
        assert nib.load(out / n).get_fdata().ndim == 3
    # a rerun predicts the rest and skips what is there
    pred.interrupt_at = None
    res = predict_cases(pred, cases, out, workers=2)
    assert sum(r.status == "skipped" for r in res) == len(names)
    assert sum(r.status == "written" for r in res) == 6 - len(names)


def save_run(run: Path) -> Path:
    """A run folder (model.json, fold_0/checkpoint_best.pt) of :func:`_predictor`'s untrained network."""
    from medseg.networks import model_spec

    pred = _predictor()
    write_model_record(run, pred.record)
    (run / "fold_0").mkdir()
    torch.save({"network": model_spec(pred.networks[0]), "state_dict": pred.networks[0].state_dict(), "epoch": 1},
               run / "fold_0" / "checkpoint_best.pt")
    return run


def test_cli_workers_recorded_in_report(inputs, tmp_path):
    run = save_run(tmp_path / "run")
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        (inp / f"case{i}.nii.gz").symlink_to(inputs / f"case{i}.nii.gz")
    out = tmp_path / "out"
    base = ["predict", "-i", str(inp), "-m", str(run), "--device", "cpu", "--no-tta"]
    assert main([*base, "-o", str(out), "--workers", "2"]) == 0
    report = json.loads((out / "predict_report.json").read_text())
    assert report["workers"] == 2 and report["counts"]["written"] == 2
    assert main([*base, "-o", str(tmp_path / "out1")]) == 0
    assert json.loads((tmp_path / "out1" / "predict_report.json").read_text())["workers"] == 1  # CPU default
    for i in range(2):
        a = np.asarray(nib.load(out / f"case{i}.nii.gz").dataobj)
        np.testing.assert_array_equal(a, np.asarray(nib.load(tmp_path / "out1" / f"case{i}.nii.gz").dataobj))
    assert main([*base, "-o", str(tmp_path / "out2"), "--workers", "0"]) == 1


def test_ctrl_c_stops_a_pipelined_cli_run_cleanly(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    run = save_run(tmp_path / "run")
    inp, out = tmp_path / "in", tmp_path / "out"
    n = 8
    for i in range(n):
        write_nifti(synthetic_case(90 + i, shape=(48, 44, 30))[0], inp / f"k{i}.nii.gz")
    cmd = [sys.executable, "-m", "medseg.cli.main", "predict", "-i", str(inp), "-o", str(out), "-m", str(run),
           "--device", "cpu", "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wait_for_first_output(proc, out, "k")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    names = sorted(p.name for p in out.iterdir())
    assert proc.returncode == 130, err.decode()[-500:]
    assert len(names) < n, "the run finished before it could be interrupted"
    assert not [x for x in names if x.startswith(TMP_MARKER)] and "predict_report.json" not in names
    for x in names:
        assert nib.load(out / x).shape == (48, 44, 30)
