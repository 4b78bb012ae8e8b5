"""Label values as the data has them (0/200/500/600): consecutive classes in training, the original values in every
output; the network has one output per label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.errors import InputError
from medseg.io import Volume, read_volume, write_volume
from medseg.planning import ModelRecord, Plan
from medseg.transforms.labels import decode_labels, encode_labels, label_dtype, value_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VALUES = [0, 200, 500, 600]
PLAN = {
    "schema_version": 2, "dataset": "values", "spatial_dims": 3, "in_channels": 1, "num_classes": 4,
    "labels": {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"}, "label_values": VALUES,
    "normalization": [{"scheme": "zscore", "mean": 0.0, "std": 1.0, "clip": None}],
    "configurations": {"3d_fullres": {
        "spacing": [1.5, 1.5, 1.5], "patch_size": [16, 16, 16], "batch_size": 2,
        "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2], "kernel_sizes": [3, 3],
                                               "deep_supervision": False}},
        "mirror_axes": [], "slicewise": False}},
}


def _case(seed: int, shape=(22, 20, 16)):
    """Three boxes with the values 200, 500, 600 (oblique affine, 1.2 x 1.0 x 1.8 mm), each its own intensity."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int16)
    for value, (x, y) in zip(VALUES[1:], [(2, 2), (12, 2), (6, 11)]):
        dx, dy = rng.integers(0, 3, 2)
        lab[x + dx:x + dx + 7, y + dy:y + dy + 7, 3:12] = value
    img = 1.0 + 2.0 * encode_labels(lab, VALUES) + rng.normal(0, 0.3, shape)
    q, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = q * np.sign(np.linalg.det(q)) * np.array([1.2, 1.0, 1.8])
    return Volume(img[None].astype(np.float32), affine, 3), Volume(lab[None], affine, 3)


def test_encode_decode_and_dtype():
    lab = np.array([[0, 200], [600, 500]])
    classes = encode_labels(lab, VALUES)
    assert classes.dtype == np.int16 and classes.tolist() == [[0, 1], [3, 2]]
    back = decode_labels(classes, VALUES)
    assert back.dtype == np.uint16 and back.tolist() == lab.tolist()
    assert label_dtype([0, 1, 255]) == np.uint8 and label_dtype([0, 256]) == np.uint16
    assert label_dtype([-1, 3]) == np.int16 and label_dtype([0, 70000]) == np.int32
    assert value_names({0: "bg", 1: "a", 3: "c"}, VALUES) == {0: "bg", 200: "a", 600: "c"}


def test_value_not_in_the_plan_names_file_values_found_and_allowed(tmp_path):
    from medseg.transforms.case import load_case
    from medseg.transforms.preprocess import preprocess_volume

    image, label = _case(0)
    arr = np.asarray(label.array).copy()
    arr[0, 0, 0, 0] = 300
    write_volume(image, tmp_path / "img.nii.gz")
    write_volume(label.with_array(arr), tmp_path / "lab.nii.gz")
    image, label = load_case([tmp_path / "img.nii.gz"], tmp_path / "lab.nii.gz")
    with pytest.raises(InputError) as exc:
        preprocess_volume(image, PLAN, "3d_fullres", label)
    msg = str(exc.value)
    assert "lab.nii.gz" in msg and "[0, 200, 300, 500, 600]" in msg and "[300]" in msg and "[0, 200, 500, 600]" in msg
    assert "\n" not in msg


def test_values_0_200_500_600_end_to_end(tmp_path):
    """Preprocessing gives class indices 0..3, the network has 4 outputs, predicted masks hold only the data's
    values (in a dtype that holds 600), and they score against the original label files."""
    from medseg.inference import Predictor
    from medseg.metrics import compute_metrics
    from medseg.networks import create_model
    from medseg.transforms.preprocess import preprocess_volume

    plan = Plan.from_dict(PLAN)
    cfg = plan.configuration("3d_fullres")
    cases = [_case(s) for s in range(3)]
    data = [preprocess_volume(img, plan, "3d_fullres", lab) for img, lab in cases]
    for _, seg, _ in data:
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}  # consecutive classes, never 200/500/600
    torch.manual_seed(0)
    net = create_model("unet", spatial_dims=3, in_channels=1, out_channels=plan.num_classes,
                       **cfg.network.kwargs)
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape[1] == 4  # one output per label, not 601
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    rng = np.random.default_rng(0)
    net.train()
    for _ in range(60):
        xs, ys = [], []
        for _ in range(2):
            img, seg, _ = data[rng.integers(len(data))]
            lo = [rng.integers(0, max(1, s - 15)) for s in img.shape[1:]]
            sl = (slice(None), *[slice(a, a + 16) for a in lo])
            pads = [(0, 0)] + [(0, 16 - n) for n in img[sl].shape[1:]]
            xs.append(np.pad(img[sl], pads, mode="reflect"))
            ys.append(np.pad(seg[sl], pads)[0])
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(np.stack(xs))),
                                                 torch.from_numpy(np.stack(ys)).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    record = ModelRecord.from_plan(plan, "3d_fullres", cfg, folds=[0])
    predictor = Predictor([net.eval()], record, device="cpu", options=None)
    assert predictor.output_labels == {0: "background", 200: "liver", 500: "kidney", 600: "spleen"}
    image, ref = _case(10)
    for restore in ("probabilities", "label"):
        predictor.restore = restore
        pred = predictor.predict(image)
        assert pred.array.dtype == np.uint16 and pred.same_geometry(image)
        assert set(np.unique(pred.array).tolist()) <= set(VALUES)
        assert {200, 500, 600} <= set(np.unique(pred.array).tolist())
        write_volume(pred, tmp_path / "pred.nii.gz")  # written and read back with the values intact
        again = read_volume(tmp_path / "pred.nii.gz")
        np.testing.assert_array_equal(np.asarray(again.array), np.asarray(pred.array))
        scores = compute_metrics(np.asarray(pred.array), np.asarray(ref.array), image.spacing, VALUES[1:])
        assert min(scores[v]["dice"] for v in VALUES[1:]) > 0.5, {v: scores[v]["dice"] for v in VALUES[1:]}


def test_crossval_writes_and_scores_out_of_fold_predictions_in_the_data_values(tmp_path):
    """A crossval on data labelled 0/200/500 (a plan with label_values [0, 200, 500]): the cache holds classes, the
    out-of-fold predictions hold the data's values, and per_case.csv / the summary score them by value."""
    import csv
    import json

    import yaml

    from medseg.cli.main import main
    from medseg.data.demo import make_demo_dataset
    from medseg.data.manifest import load_manifest
    from medseg.planning import fingerprint, load_model_record, make_plan, save_plan

    data = make_demo_dataset(tmp_path / "data", n_cases=4, seed=0)
    plan = make_plan(fingerprint(load_manifest(data)), device="cpu")
    values = [0, 200, 500]
    plan.label_values = values
    save_plan(plan, tmp_path / "plan.json")
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):  # relabel the files 1 -> 200, 2 -> 500
        lab = read_volume(path)
        write_volume(lab.with_array(np.asarray(values, np.int16)[np.asarray(lab.array)]), path)
    cfg = {"name": "values", "configuration": "3d_fullres", "folds": 2, "seed": 0, "dataset": str(data),
           "output": str(tmp_path / "run"), "cache": str(tmp_path / "cache"), "plan": str(tmp_path / "plan.json"),
           "train": {"epochs": 1, "batches_per_epoch": 2, "optimizer": "adamw", "lr": 0.003, "val_every": 1,
                     "batch_size": 2, "patch_size": [16, 16, 16], "device": "cpu", "val_max_cases": 1, "threads": 1,
                     "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2]}}}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["-q", "crossval", "--config", str(tmp_path / "values.yaml"), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert load_model_record(run).label_values == values and load_model_record(run).num_classes == 3
    segs = list((tmp_path / "cache").rglob("*_seg.npy"))
    assert segs and all(set(np.unique(np.load(p)).tolist()) <= {0, 1, 2} for p in segs)
    oof = sorted(run.glob("fold_*/validation/*.nii.gz"))
    assert len(oof) == 4 and all(set(np.unique(read_volume(p).array).tolist()) <= set(values) for p in oof)
    with (run / "per_case.csv").open() as f:
        assert {row["label"] for row in csv.DictReader(f)} == {"200", "500"}
    assert set(json.loads((run / "crossval_summary.json").read_text())["classes"]) == {"200", "500"}
