"""The ignore label (issue 15 part 2): unlabelled voxels take no part in the loss, the foreground sampling, the
planner's statistics or the metrics; sparse annotations (datasets/sparsify.py).

What holds exactly, and is tested bitwise (``torch.equal``): for a target whose ignored region is M (target ==
the ignore index there), the loss and its gradient at the logits outside M do not depend on the logits inside M,
and the gradient at the logits inside M is exactly zero. The labels "inside M" are the ignore index by definition,
so the dense labels hidden under M cannot reach the loss. A network's output outside M does depend on the image
inside M through its receptive field, so for a real U-Net image invariance is not exact; it is exact for a
point-wise network (1x1 convolutions), which is tested too.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import check_ignored_logits_change_nothing
from _train_helpers import loss_and_grad as _loss_and_grad

from medseg.errors import ConfigError, InputError
from medseg.io import Volume, read_volume, write_volume
from medseg.losses import IGNORE_LOSSES, build_loss, split_ignore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 3  # classes: background, a, b; the ignore index is K


def _batch(seed: int = 0, shape=(2, 1, 9, 8, 6), frac: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, K, shape, generator=g)
    ignored = torch.rand(shape, generator=g) < frac
    logits = torch.randn((shape[0], K, *shape[2:]), generator=g)
    return logits, torch.where(ignored, K, target), ignored


@pytest.mark.parametrize("name", IGNORE_LOSSES)
def test_logits_at_ignored_voxels_change_neither_loss_nor_gradient(name):
    loss = build_loss(name, num_classes=K, class_counts=[50, 20, 10], ignore_index=K)
    logits, target, ignored = _batch()
    other = check_ignored_logits_change_nothing(loss, logits, target, ignored)
    # the control: the same loss without the ignore index does see those voxels, so the test above can fail
    dense = build_loss(name, num_classes=K + 1, class_counts=[50, 20, 10, 30])
    pad = torch.cat([logits, torch.zeros_like(logits[:, :1])], 1)
    pad2 = torch.cat([other, torch.zeros_like(other[:, :1])], 1)
    assert not torch.equal(dense(pad, target), dense(pad2, target))


@pytest.mark.parametrize("name", ["dice_ce", "ce"])
def test_deep_supervision_keeps_the_ignore_index_at_every_level(name):
    loss = build_loss(name, num_classes=K, deep_supervision=True, ignore_index=K)
    logits, target, ignored = _batch(1, shape=(2, 1, 8, 8, 6))
    low = torch.randn(2, K, 4, 4, 3)
    low_target = torch.nn.functional.interpolate(target.float(), size=(4, 4, 3), mode="nearest-exact").long()
    low_ignored = (low_target == K).expand_as(low)
    assert low_ignored.any() and (~low_ignored).any()
    low2 = low.clone()
    low2[low_ignored] = 77.0
    hi_m = ignored.expand_as(logits)
    hi2 = logits.clone()
    hi2[hi_m] = -55.0
    xs = [t.clone().requires_grad_(True) for t in (logits, low, hi2, low2)]
    a, b = loss(xs[:2], target), loss(xs[2:], target)
    (a + b).backward()
    assert torch.equal(a, b)
    assert torch.equal(xs[0].grad[~hi_m], xs[2].grad[~hi_m]) and torch.equal(xs[1].grad[~low_ignored],
                                                                            xs[3].grad[~low_ignored])
    assert torch.count_nonzero(xs[0].grad[hi_m]) == 0 and torch.count_nonzero(xs[1].grad[low_ignored]) == 0


@pytest.mark.parametrize("name", IGNORE_LOSSES)
def test_a_batch_without_labelled_voxels_gives_zero_loss_and_zero_gradient(name):
    loss = build_loss(name, num_classes=K, class_counts=[50, 20, 10], ignore_index=K, deep_supervision=True)
    logits, target, _ = _batch(2)
    value, grad = _loss_and_grad(loss, logits, torch.full_like(target, K))
    assert value.item() == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("name", IGNORE_LOSSES)
def test_without_ignored_voxels_the_loss_equals_the_dense_loss(name):
    """The masked losses are the same terms as MONAI's (only the mask is new)."""
    logits, target, _ = _batch(3, frac=0.0)
    counts = [50, 20, 10]
    dense = build_loss(name, num_classes=K, class_counts=counts)(logits, target)
    masked = build_loss(name, num_classes=K, class_counts=counts, ignore_index=K)(logits, target)
    torch.testing.assert_close(masked, dense, rtol=1e-6, atol=1e-6)
    opts = {"lambda_dice": 0.3, "lambda_ce": 2.0}
    dense = build_loss("dice_ce", num_classes=K, options=opts)(logits, target)
    torch.testing.assert_close(build_loss("dice_ce", num_classes=K, options=opts, ignore_index=K)(logits, target),
                               dense, rtol=1e-6, atol=1e-6)


def test_ce_is_the_mean_over_labelled_voxels():
    logits, target, ignored = _batch(4)
    value = build_loss("ce", num_classes=K, ignore_index=K)(logits, target)
    keep = ~ignored[:, 0]
    expected = torch.nn.functional.cross_entropy(logits.movedim(1, -1)[keep], target[:, 0][keep])
    torch.testing.assert_close(value, expected)


def test_point_wise_network_image_at_ignored_voxels_changes_nothing():
    """With 1x1 convolutions the output at a voxel sees only that voxel's image, so changing the image in M changes
    neither the loss nor any parameter gradient (bitwise)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 1), torch.nn.ReLU(), torch.nn.Conv3d(8, K, 1))
    loss = build_loss("dice_ce", num_classes=K, ignore_index=K)
    _, target, ignored = _batch(6)
    image = torch.randn(target.shape)
    other = torch.where(ignored, torch.randn(target.shape) * 100.0, image)
    grads = []
    for x in (image, other):
        net.zero_grad()
        value = loss(net(x), target)
        value.backward()
        grads.append((value.detach(), [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_losses_without_ignore_support_refuse_one_and_split_ignore():
    for name in ("focal", "dice_focal", "border_ce"):
        with pytest.raises(ConfigError) as exc:
            build_loss(name, num_classes=K, ignore_index=K)
        assert "ignore" in str(exc.value) and "dice_ce" in str(exc.value)
    labels, valid = split_ignore(torch.tensor([0, 3, 2, 3]), 3)
    assert labels.tolist() == [0, 0, 2, 0] and valid.tolist() == [True, False, True, False]
    labels, valid = split_ignore(torch.tensor([0, 3]), None)
    assert labels.tolist() == [0, 3] and valid is None


# ------------------------------------------------------------------ dataset.json, planning, preprocessing
def _write_dataset(root: Path, labels: dict, extra: dict | None = None, n: int = 3, ignore_value: int = 3) -> Path:
    """A small MSD data set: class 1 and 2 boxes; the lower half of every case is ignore with bright intensities
    (1000, far above the labelled ones), so a statistic that sees them is visibly wrong."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.0, 1.2, 1.5, 1.0])
    entries = []
    for i in range(n):
        lab = np.zeros((20, 18, 12), np.uint8)
        lab[3:9, 3:9, 2:10] = 1
        lab[11:17, 9:15, 2:10] = 2
        img = rng.normal(10.0, 1.0, lab.shape) + 5.0 * lab
        lab[:, :, :5] = ignore_value
        img[:, :, :5] = 1000.0
        write_volume(Volume(img[None].astype(np.float32), affine, 3), root / "imagesTr" / f"c{i}.nii.gz")
        write_volume(Volume(lab[None], affine, 3), root / "labelsTr" / f"c{i}.nii.gz")
        entries.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    meta = {"name": "ign", "tensorImageSize": "3D", "modality": {"0": "MRI"}, "labels": labels,
            "training": entries, **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("labels, extra", [
    ({"0": "background", "1": "a", "2": "b", "3": "ignore"}, None),           # MSD style, a label named ignore
    ({"background": 0, "a": 1, "b": 2, "ignore": 3}, None),                   # nnU-Net v2 style
    ({"0": "background", "1": "a", "2": "b"}, {"ignore": 3}),                 # top-level "ignore": N
])
def test_dataset_json_ignore_label_is_not_a_class(tmp_path, labels, extra):
    from medseg.data.manifest import load_manifest

    man = load_manifest(_write_dataset(tmp_path / "ds", labels, extra))
    assert man.ignore_label == 3
    assert man.labels == {0: "background", 1: "a", 2: "b"}


@pytest.mark.parametrize("labels, extra, words", [
    ({"0": "background", "1": "ignore", "2": "b"}, None, "highest"),
    ({"0": "background", "1": "a"}, {"ignore": 0}, "highest"),
    ({"0": "background", "1": "a", "3": "ignore"}, {"ignore": 4}, "one ignore value"),
    ({"0": "background", "1": "a"}, {"ignore": "x"}, "'ignore'"),
])
def test_bad_ignore_label_is_one_line_naming_the_file(tmp_path, labels, extra, words):
    from medseg.data.manifest import load_manifest

    root = _write_dataset(tmp_path / "ds", labels, extra, n=1)
    with pytest.raises(InputError) as exc:
        load_manifest(root)
    msg = str(exc.value)
    assert "dataset.json" in msg and words in msg and "\n" not in msg


def test_planner_statistics_skip_ignored_voxels_and_the_plan_carries_it(tmp_path):
    from medseg.data.manifest import load_manifest
    from medseg.planning import Plan, fingerprint, make_plan, plan_hash
    from medseg.transforms.case import load_case
    from medseg.transforms.preprocess import preprocess_volume

    man = load_manifest(_write_dataset(tmp_path / "ds", {"0": "background", "1": "a", "2": "b", "3": "ignore"}))
    fp = fingerprint(man)
    assert fp["label_values"] == [0, 1, 2] and fp["ignore_value"] == 3
    assert fp["ignored_voxels"] == 3 * 20 * 18 * 5
    assert sum(fp["class_voxels"]) == 3 * 20 * 18 * 7  # the labelled voxels only
    assert fp["intensity"][0]["max"] < 100.0  # the 1000-valued ignored voxels are not foreground
    plan = make_plan(fp)
    assert plan.num_classes == 3 and plan.ignore_value == 3 and plan.ignore_index == 3
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.ignore_value == 3
    import dataclasses

    assert plan_hash(plan) != plan_hash(dataclasses.replace(plan, ignore_value=None))  # the cache holds index K
    image, label = load_case(man.cases[0].images, man.cases[0].label)
    _, seg, _ = preprocess_volume(image, plan, next(iter(plan.configurations)), label)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}  # 3 = the ignore index, K


def test_model_record_carries_the_ignore_value():
    from test_label_values import PLAN  # a valid plan dict, label values 0/200/500/600

    from medseg.planning import ModelRecord, Plan

    plan = Plan.from_dict({**PLAN, "ignore_value": 700})
    cfg = plan.configuration("3d_fullres")
    rec = ModelRecord.from_plan(plan, "3d_fullres", cfg, folds=[0])
    back = ModelRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back.ignore_value == 700 and back.plan().ignore_value == 700
    with pytest.raises(InputError):
        Plan.from_dict({**PLAN, "ignore_value": 200})  # a class value cannot be the ignore label


def test_foreground_oversampling_never_picks_ignored_voxels():
    from medseg.data.loader import _class_locations

    seg = np.zeros((1, 10, 10, 10), np.int16)
    seg[0, :5] = K
    seg[0, 6:8, 6:8, 6:8] = 1
    locs = _class_locations(seg, range(1, K), seed=0)
    assert set(locs) == {"1", "2"} and locs["2"] == []
    assert all(seg[0][tuple(p)] == 1 for p in locs["1"]) and len(locs["1"]) == 8


# ------------------------------------------------------------------ metrics
def test_metrics_leave_out_voxels_whose_reference_is_ignore():
    from medseg.inference.postprocess import _dice_per_class
    from medseg.metrics import compute_metrics
    from medseg.training.trainer import dice_per_class

    ref = np.zeros((12, 12, 12), np.int64)
    ref[2:6, 2:6, 2:6] = 1
    ref[:, :, 8:] = 3  # ignore
    pred = np.where(ref == 3, 1, ref)  # right wherever labelled, class 1 all over the ignored block
    with_ignore = compute_metrics(pred, ref, (1.0, 1.0, 1.0), [1], ignore=3)[1]
    assert with_ignore["dice"] == 1.0 and with_ignore["accuracy"] == 1.0 and with_ignore["hd95_mm"] == 0.0
    assert compute_metrics(pred, ref, (1.0, 1.0, 1.0), [1])[1]["dice"] < 0.2
    assert dice_per_class(pred, ref, 3) == [1.0, pytest.approx(float("nan"), nan_ok=True)]
    assert _dice_per_class(pred, ref, [1], ignore=3)[1] == 1.0 and _dice_per_class(pred, ref, [1])[1] < 0.2


# ------------------------------------------------------------------ sparse annotations
def _sparsify():
    folder = Path(__file__).resolve().parents[1] / "datasets"
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("medseg_datasets_sparsify", folder / "sparsify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kept_slices_are_evenly_spaced_and_deterministic():
    sp = _sparsify()
    assert sp.kept_slices(10, 0.3) == [1, 5, 8]
    assert sp.kept_slices(10, 1.0) == list(range(10))
    assert sp.kept_slices(7, 0.01) == [3]


def test_sparsify_writes_a_copy_and_never_touches_the_source(tmp_path):
    import hashlib

    from medseg.data.manifest import load_manifest

    sp = _sparsify()
    src = _write_dataset(tmp_path / "src", {"0": "background", "1": "a", "2": "b"}, n=2, ignore_value=0)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.rglob("*") if p.is_file()}
    man = sp.sparsify_dataset(src, tmp_path / "out", 0.25, axis=2)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.rglob("*") if p.is_file()} == before
    assert man.ignore_label == 3
    again = load_manifest(tmp_path / "out")
    assert again.ignore_label == 3 and again.labels == {0: "background", 1: "a", 2: "b"}
    keep = sp.kept_slices(12, 0.25)
    for case in again.cases:
        assert case.images[0].is_symlink()
        dense, sparse = read_volume(src / "labelsTr" / case.label.name), read_volume(case.label)
        assert sparse.same_geometry(dense)
        d, s = np.asarray(dense.array)[0], np.asarray(sparse.array)[0]
        np.testing.assert_array_equal(s[:, :, keep], d[:, :, keep])
        assert (np.delete(s, keep, axis=2) == 3).all()
    with pytest.raises(InputError):
        sp.sparsify_dataset(src, src / "inside", 0.3)
    with pytest.raises(InputError):
        sp.sparsify_dataset(src, tmp_path / "o2", 0.0)


@pytest.mark.slow
def test_sparse_hippocampus_plans_and_keeps_the_dense_labels_on_kept_slices(tmp_path, shared_data):
    from medseg.data.manifest import load_manifest

    src = shared_data("hippocampus")
    sp = _sparsify()
    man = sp.sparsify_dataset(src, tmp_path / "h30", 0.3)
    assert man.ignore_label == 3 and len(man.cases) == 200
    info = json.loads((tmp_path / "h30" / "sparsify.json").read_text())
    dense = load_manifest(src)
    for case in man.cases[:5]:
        d = np.asarray(read_volume(dense.case(case.case_id).label).array)[0]
        s = np.asarray(read_volume(case.label).array)[0]
        keep = info["kept_slices"][case.case_id]
        np.testing.assert_array_equal(s[..., keep], d[..., keep])
        assert len(keep) == round(0.3 * d.shape[-1]) and (np.delete(s, keep, axis=-1) == 3).all()


def test_medseg_evaluate_leaves_out_the_ignore_label_of_the_references(tmp_path):
    from medseg.evaluation import evaluate_folder

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    ref = np.zeros((10, 10, 8), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[:, :, 6:] = 3
    pred = np.where(ref == 3, 2, ref).astype(np.uint8)  # class 2 only where the reference is unlabelled
    for folder, arr in (("pred", pred), ("ref/labelsTr", ref)):
        write_volume(Volume(arr[None], affine, 3), tmp_path / folder / "c0.nii.gz")
    (tmp_path / "ref" / "dataset.json").write_text(json.dumps(
        {"labels": {"0": "background", "1": "a", "2": "b", "3": "ignore"}}))
    ev = evaluate_folder(tmp_path / "pred", tmp_path / "ref" / "labelsTr", n_boot=10)
    assert sorted(ev.label_names) == [1, 2] and ev.summary["ignore_label"] == 3
    assert ev.per_case["c0"][1]["dice"] == 1.0 and ev.per_case["c0"][2]["n_pred"] == 0.0
    (tmp_path / "ref" / "dataset.json").unlink()
    plain = evaluate_folder(tmp_path / "pred", tmp_path / "ref" / "labelsTr", n_boot=10)
    assert plain.per_case["c0"][2]["n_pred"] > 0  # without the ignore label the voxels count
    again = evaluate_folder(tmp_path / "pred", tmp_path / "ref" / "labelsTr", [1, 2], n_boot=10, ignore=3)
    assert again.per_case["c0"][2]["n_pred"] == 0.0


def test_check_dataset_accepts_the_declared_ignore_value(tmp_path):
    from medseg.data.checks import check_dataset
    from medseg.data.manifest import load_manifest

    root = _write_dataset(tmp_path / "ds", {"0": "background", "1": "a", "2": "b"}, {"ignore": 3}, n=1)
    assert not [p for p in check_dataset(load_manifest(root)).errors if "not declared" in p.problem]
    meta = json.loads((root / "dataset.json").read_text())
    del meta["ignore"]
    (root / "dataset.json").write_text(json.dumps(meta))
    assert [p for p in check_dataset(load_manifest(root)).errors if "not declared" in p.problem]


def test_crossval_on_a_sparse_copy_trains_and_scores_labelled_voxels_only(tmp_path):
    """End to end: demo data -> sparsify (30 %) -> crossval. The record and plan carry the ignore value, the cache
    holds it as index K, predictions never contain it, and the out-of-fold metrics leave it out."""
    import csv

    import yaml

    from medseg.cli.main import main
    from medseg.data.demo import make_demo_dataset
    from medseg.metrics import compute_metrics
    from medseg.planning import load_model_record

    data = make_demo_dataset(tmp_path / "data", n_cases=4, seed=0)
    _sparsify().sparsify_dataset(data, tmp_path / "sparse", 0.3)
    cfg = {"name": "sparse", "configuration": "3d_fullres", "folds": 2, "seed": 0, "dataset": str(tmp_path / "sparse"),
           "output": str(tmp_path / "run"), "cache": str(tmp_path / "cache"),
           "train": {"epochs": 1, "batches_per_epoch": 2, "optimizer": "adamw", "lr": 0.003, "val_every": 1,
                     "batch_size": 2, "patch_size": [16, 16, 16], "device": "cpu", "val_max_cases": 1, "threads": 1,
                     "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2]}}}}
    (tmp_path / "sparse.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["-q", "crossval", "--config", str(tmp_path / "sparse.yaml"), "--no-progress"]) == 0
    run = tmp_path / "run"
    record = load_model_record(run)
    assert record.ignore_value == 3 and record.num_classes == 3 and record.label_values == [0, 1, 2]
    segs = list((tmp_path / "cache").rglob("*_seg.npy"))
    assert segs and all(3 in np.unique(np.load(p)) for p in segs)
    with (run / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {row["label"] for row in rows} == {"1", "2"}
    for path in sorted(run.glob("fold_*/validation/*.nii.gz")):
        pred = np.asarray(read_volume(path).array)
        assert 3 not in np.unique(pred)
        ref = read_volume(tmp_path / "sparse" / "labelsTr" / path.name)
        want = compute_metrics(pred, np.asarray(ref.array), ref.spacing, [1, 2], ignore=3)
        got = {int(r["label"]): float(r["dice"]) for r in rows if r["case"] == path.name[:-7]}
        assert got == pytest.approx({k: v["dice"] for k, v in want.items()}, nan_ok=True)
