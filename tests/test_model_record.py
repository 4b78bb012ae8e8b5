"""The typed plan, the model record and the runtime layer: one fact in one place, old run folders still predict."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import ConfigError, InputError
from medseg.io import read_volume
from medseg.planning import ModelRecord, Plan, load_model_record, write_model_record
from medseg.planning.schema import SCHEMA_VERSION

DATA = Path(__file__).parent / "data"
RUN_V1 = DATA / "run_v1"
CASE = DATA / "run_v1_case"


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_first_release_run_folder_predicts_the_same_masks(tmp_path):
    """A run folder written by the first release (v1 plan.json with the trained patch and mirror axes, v1
    model.json, postprocessing.json) predicts exactly the masks that release predicted, and is not modified."""
    from medseg.inference import Predictor

    run = tmp_path / "run_v1"
    shutil.copytree(RUN_V1, run)
    before = _tree_digest(run)
    record = load_model_record(run)
    assert record.config.patch_size == [16, 16, 16] and record.config.mirror_axes == [0]  # from the v1 plan.json
    assert record.folds == [0, 1] and record.network.name == "unet"
    image = read_volume(CASE / "image.nii.gz")
    for tta, name in ((True, "mask_tta.nii.gz"), (False, "mask_notta.nii.gz")):
        got = Predictor.from_run(run, device="cpu", amp="fp32", tta=tta).predict(image)
        ref = read_volume(CASE / name)
        assert got.same_geometry(ref)
        np.testing.assert_array_equal(np.asarray(got.array), np.asarray(ref.array))
    assert _tree_digest(run) == before  # migrated in memory, nothing rewritten


def test_cli_predicts_first_release_folder_identically(tmp_path, capsys):
    from medseg.cli.main import main

    out = tmp_path / "out"
    assert main(["predict", "-i", str(CASE / "image.nii.gz"), "-o", str(out), "-m", str(RUN_V1), "--amp", "fp32",
                 "--device", "cpu"]) == 0
    got = read_volume(next(out.glob("*.nii.gz")))
    np.testing.assert_array_equal(np.asarray(got.array), np.asarray(read_volume(CASE / "mask_tta.nii.gz").array))


def test_record_round_trip_and_is_the_only_source(tmp_path):
    """The Predictor reads model.json alone: plan.json and postprocessing.json may disagree or be absent."""
    from medseg.inference import Predictor

    run = tmp_path / "run"
    shutil.copytree(RUN_V1, run)
    record = load_model_record(run)
    write_model_record(run, record)
    again = load_model_record(run)
    assert again == record and again.schema_version == SCHEMA_VERSION
    assert again.restore == "label"  # the first release's way back onto the input grid travels with the record
    # a v2 record needs neither plan.json nor postprocessing.json; an edited plan.json changes nothing
    plan = json.loads((run / "plan.json").read_text())
    plan["configurations"]["3d_fullres"]["patch_size"] = [8, 8, 8]
    plan["configurations"]["3d_fullres"]["mirror_axes"] = [0, 1, 2]
    (run / "plan.json").write_text(json.dumps(plan))
    (run / "postprocessing.json").unlink()
    pred = Predictor.from_run(run, device="cpu", amp="fp32")
    assert pred.patch_size == (16, 16, 16) and pred.mirror_axes == (0,)
    (run / "plan.json").unlink()
    got = Predictor.from_run(run, device="cpu", amp="fp32").predict(read_volume(CASE / "image.nii.gz"))
    np.testing.assert_array_equal(np.asarray(got.array),
                                  np.asarray(read_volume(CASE / "mask_tta.nii.gz").array))


def test_record_validation_names_the_key(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUN_V1, run)
    write_model_record(run, load_model_record(run))
    data = json.loads((run / "model.json").read_text())
    bad = {**data, "config": {**data["config"], "patch_size": "sixteen"}}
    (run / "model.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"model\.json.*config\.patch_size"):
        load_model_record(run)
    (run / "model.json").write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(InputError, match="newer"):
        load_model_record(run)
    (run / "model.json").write_text(json.dumps({**data, "folds": []}))
    with pytest.raises(InputError, match="folds"):
        load_model_record(run)


def test_plan_migration_from_version_1():
    v1 = json.loads((RUN_V1 / "plan.json").read_text())
    assert v1["version"] == 1 and "schema_version" not in v1
    plan = Plan.from_dict(v1)
    assert plan.schema_version == SCHEMA_VERSION and plan.normalization[0].scheme in ("zscore", "zscore_nonzero")
    assert Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(InputError, match="version"):
        Plan.from_dict({**v1, "version": 7})


def test_crossval_writes_one_complete_record(tmp_path):
    """Training writes model.json once with every fact prediction needs; the run's plan.json stays the planner's."""
    from medseg.data.demo import make_demo_dataset
    from medseg.training.config import pipeline_from_dict
    from medseg.training.crossval import run_crossval

    make_demo_dataset(tmp_path / "data", n_cases=4, seed=0)
    pipeline = pipeline_from_dict({
        "name": "rec", "dataset": str(tmp_path / "data"), "output": str(tmp_path / "run"), "folds": 2,
        "train": {"epochs": 1, "batches_per_epoch": 1, "val_every": 1, "batch_size": 2, "patch_size": [16, 16, 16],
                  "device": "cpu", "amp": "fp32", "augmentation": {"mirror_axes": [1]},
                  "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2]}}}})
    run_crossval(pipeline)
    record = load_model_record(tmp_path / "run")
    raw = json.loads((tmp_path / "run" / "model.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    assert record.folds == [0, 1] and record.config.patch_size == [16, 16, 16]
    assert record.config.mirror_axes == [1] and record.config.batch_size == 2
    assert record.network.kwargs["features"] == [4, 8] and record.network.kwargs["out_channels"] == 3
    post = json.loads((tmp_path / "run" / "postprocessing.json").read_text())["setting"]
    assert record.postprocessing == post
    planner = json.loads((tmp_path / "run" / "plan.json").read_text())["configurations"]["3d_fullres"]
    assert planner["patch_size"] != [16, 16, 16] or planner["mirror_axes"] != [1]  # overrides live in the record


# ------------------------------------------------------------------------------------------------ runtime layer
def test_precision_vocabulary_is_one():
    from medseg.runtime import PRECISIONS, normalize_precision, resolve_precision
    from medseg.training.config import TrainConfig

    assert PRECISIONS == ("auto", "bf16", "fp16", "fp32")
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="CPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="fp32"):
        normalize_precision("half")
    with pytest.warns(FutureWarning, match="deprecated"):
        assert normalize_precision("none") == "fp32"
    with pytest.warns(FutureWarning):
        assert TrainConfig(amp="none").validate().amp == "fp32"


def test_device_resolution():
    from medseg.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")


def test_checkpoint_loader_refusals(tmp_path):
    from medseg.runtime import load_checkpoint, save_checkpoint

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_checkpoint(empty)

    class Payload:  # what a malicious pickle would carry
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"network": {"name": "unet"}, "state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(InputError) as err:
        load_checkpoint(evil)
    assert "refused for safety" in str(err.value) and "weights_only=False" not in str(err.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(InputError, match="not a medseg checkpoint"):
        load_checkpoint(foreign)
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"network": {"name": "unet", "kwargs": {}}, "state_dict": {"w": torch.ones(1)}})
    assert torch.equal(load_checkpoint(good)["state_dict"]["w"], torch.ones(1))


def test_one_definition_each():
    """grep finds one definition each of device resolution, precision resolution, checkpoint loading, valid crop."""
    root = Path(__file__).resolve().parents[1] / "medseg"
    for name in ("def resolve_device", "def resolve_precision", "def load_checkpoint", "def valid_crop",
                 "def build_network"):
        hits = [p for p in root.rglob("*.py") if name + "(" in p.read_text()]
        allowed = {"def valid_crop": 2}.get(name, 1)  # runtime.valid_crop re-exports networks.contract's
        assert 1 <= len(hits) <= allowed, f"{name}: {hits}"


def test_model_record_from_plan_keeps_every_prediction_fact():
    plan = Plan.from_dict(json.loads((RUN_V1 / "plan.json").read_text()))
    conf = plan.configuration("3d_fullres")
    rec = ModelRecord.from_plan(plan, "3d_fullres", conf, folds=[1, 0])
    assert rec.folds == [0, 1] and rec.plan().configuration("3d_fullres") == conf
    assert ModelRecord.from_dict(rec.to_dict()) == rec
