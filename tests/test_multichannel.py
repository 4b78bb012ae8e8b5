"""Multi-channel end to end: a two-channel set where only channel 1 carries the structure, trained through the
preprocessed cache and patch loader, predicted from nnU-Net ``_0000/_0001`` files and from one MSD 4D NIfTI, and
evaluated. Channel order is kept from training to prediction: swapping the channels breaks the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.io import Volume, write_volume
from medseg.planning import ModelRecord, Plan, write_model_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (20, 20, 16)
PLAN = {
    "schema_version": 2, "dataset": "two_channels", "spatial_dims": 3, "in_channels": 2, "num_classes": 2,
    "labels": {"0": "background", "1": "ball"},
    "normalization": [{"scheme": "zscore", "mean": 0.0, "std": 1.0, "clip": None}] * 2,
    "configurations": {"3d_fullres": {
        "spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16], "batch_size": 2,
        "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2], "deep_supervision": False}},
        "mirror_axes": [], "slicewise": False}},
}


def _case(seed: int):
    """(channels (2, *SHAPE), label): channel 0 noise with a decoy bright box, channel 1 the ball."""
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).transpose(1, 2, 3, 0)
    center = rng.uniform(6, 10, 3)
    lab = (np.linalg.norm(idx - center, axis=-1) < rng.uniform(3.5, 5)).astype(np.uint8)
    ch0 = rng.normal(0, 1, SHAPE)
    ch0[15:20, 15:20, 0:6] += 3.0  # a decoy away from the ball: reading the wrong channel finds a box, not the ball
    ch1 = 3.0 * lab + rng.normal(0, 0.5, SHAPE)
    return np.stack([ch0, ch1]).astype(np.float32), lab


def _write_sets(root: Path, n: int) -> tuple[Path, Path]:
    """The same cases as an nnU-Net v2 raw folder and as an MSD folder (4D images)."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nn_root, msd_root = root / "nnunet", root / "msd"
    for d in (nn_root / "imagesTr", nn_root / "labelsTr", msd_root / "imagesTr", msd_root / "labelsTr"):
        d.mkdir(parents=True)
    training = []
    for i in range(n):
        img, lab = _case(i)
        cid = f"c_{i:03d}"
        for ch in range(2):
            write_volume(Volume(img[ch:ch + 1], affine, 3), nn_root / "imagesTr" / f"{cid}_{ch:04d}.nii.gz")
        write_volume(Volume(img, affine, 3), msd_root / "imagesTr" / f"{cid}.nii.gz")
        for r in (nn_root, msd_root):
            write_volume(Volume(lab[None], affine, 3), r / "labelsTr" / f"{cid}.nii.gz")
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    (nn_root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "noise", "1": "signal"}, "labels": {"background": 0, "ball": 1},
        "numTraining": n, "file_ending": ".nii.gz"}))
    (msd_root / "dataset.json").write_text(json.dumps({
        "name": "two_channels", "modality": {"0": "noise", "1": "signal"}, "labels": {"0": "background", "1": "ball"},
        "numTraining": n, "training": training}))
    return nn_root, msd_root


def _dice(a, b) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def test_two_channels_keep_their_order_from_training_to_prediction(tmp_path):
    from medseg.cli.main import main
    from medseg.data.loader import PatchLoader, preprocess_dataset
    from medseg.data.manifest import load_manifest
    from medseg.evaluation import evaluate_folder
    from medseg.inference import Predictor
    from medseg.networks import create_model, model_spec
    from medseg.transforms.case import load_case

    nn_root, msd_root = _write_sets(tmp_path, 5)
    manifests = {"nnunet": load_manifest(nn_root), "msd": load_manifest(msd_root)}
    assert manifests["nnunet"].channel_names == manifests["msd"].channel_names == {0: "noise", 1: "signal"}
    first = manifests["nnunet"].case("c_000")
    assert [p.name for p in first.images] == ["c_000_0000.nii.gz", "c_000_0001.nii.gz"]

    # train on the nnU-Net set through the cache and the patch loader (the training data path)
    plan = Plan.from_dict(PLAN)
    cfg = plan.configuration("3d_fullres")
    train_ids = [f"c_{i:03d}" for i in range(4)]
    cache = preprocess_dataset(manifests["nnunet"], plan, "3d_fullres", tmp_path / "cache")
    loader = PatchLoader(cache, train_ids, patch_size=cfg.patch_size, batch_size=2, spatial_dims=3,
                         seed=0, fold=0, num_batches=40)
    torch.manual_seed(0)
    net = create_model("unet", spatial_dims=3, in_channels=2, out_channels=2, **cfg.network.kwargs)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    net.train()
    for batch in loader.epoch(0):
        assert batch["image"].shape[1] == 2
        loss = torch.nn.functional.cross_entropy(net(batch["image"]), batch["label"][:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    run = tmp_path / "run"
    record = ModelRecord.from_plan(plan, "3d_fullres", cfg, folds=[0])
    write_model_record(run, record)
    (run / "fold_0").mkdir()
    torch.save({"network": model_spec(net), "state_dict": net.state_dict()}, run / "fold_0" / "checkpoint_best.pt")

    # predict the held-out case: the right order finds the ball, swapped channels do not
    predictor = Predictor.from_run(run, device="cpu", amp="fp32")
    held = manifests["nnunet"].case("c_004")
    image, ref = load_case(held.images, held.label)
    right = np.asarray(predictor.predict(image).array[0]) == 1
    swapped, _ = load_case(held.images[::-1])
    wrong = np.asarray(predictor.predict(swapped).array[0]) == 1
    truth = np.asarray(ref.array[0]) == 1
    assert _dice(right, truth) > 0.8 and _dice(wrong, truth) < 0.2, (_dice(right, truth), _dice(wrong, truth))
    msd_image, _ = load_case(manifests["msd"].case("c_004").images)  # one 4D file
    assert msd_image.channels == 2
    np.testing.assert_array_equal(np.asarray(predictor.predict(msd_image).array[0]) == 1, right)

    # both layouts predict through `medseg predict` (channel files grouped, the 4D file read as 2 channels)
    # and evaluate against the labels
    inputs = {"nnunet": tmp_path / "in_nnunet", "msd": tmp_path / "in_msd"}
    for name, folder in inputs.items():
        folder.mkdir()
        for p in manifests[name].case("c_004").images:
            (folder / p.name).symlink_to(p)
        out = tmp_path / f"out_{name}"
        assert main(["predict", "-i", str(folder), "-o", str(out), "-m", str(run), "--device", "cpu",
                     "--amp", "fp32"]) == 0
        ref_dir = tmp_path / f"ref_{name}"
        ref_dir.mkdir()
        (ref_dir / "c_004.nii.gz").symlink_to(held.label)
        ev = evaluate_folder(out, ref_dir)
        assert list(ev.per_case) == ["c_004"]
        assert ev.per_case["c_004"][1]["dice"] == pytest.approx(_dice(right, truth), abs=1e-6)
