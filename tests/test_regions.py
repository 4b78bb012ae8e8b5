"""Region-based training (issue 15 parts 1, 3): nnU-Net v2 region labels in dataset.json, one sigmoid output per
region trained with BCE + Dice (ignored voxels left out exactly), predictions painted in regions_class_order,
per-region evaluation (``medseg evaluate --regions``) and the 4D ``nifti-multilabel`` output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import check_ignored_logits_change_nothing
from _train_helpers import loss_and_grad as _loss_and_grad

from medseg.data.regions import Region, parse_regions, read_regions, region_masks
from medseg.errors import ConfigError, InputError
from medseg.io import Volume, read_volume, write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: nested regions over label values 1 (edema), 2 (core), 3 (enhancing): whole (1, 2, 3) > core (2, 3) > enhancing
LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
ORDER = [1, 2, 3]
REGIONS = [Region("whole", (1, 2, 3), 1), Region("core", (2, 3), 2), Region("enhancing", (3,), 3)]


# ------------------------------------------------------------------ dataset.json
def test_parse_region_labels_scalars_lists_and_nested_lists():
    assert parse_regions({"labels": LABELS, "regions_class_order": ORDER}, "x") == REGIONS
    nested = {"labels": {"background": [0], "whole": [1, [2, 3]], "core": [[2], 3], "enhancing": [3]},
              "regions_class_order": [[1], 2, 3]}
    assert parse_regions(nested, "x") == REGIONS
    assert parse_regions({"labels": {"background": 0, "a": 1}}, "x") is None  # plain labels


@pytest.mark.parametrize("meta, words", [
    ({"labels": LABELS}, "regions_class_order"),
    ({"labels": LABELS, "regions_class_order": [1, 2]}, "regions_class_order"),
    ({"labels": LABELS, "regions_class_order": [1, 1, 3]}, "not one of its values"),
    ({"labels": {**LABELS, "bad": [1, "x"]}, "regions_class_order": [1, 2, 3, 1]}, "'bad'"),
    ({"labels": {**LABELS, "neg": [-1]}, "regions_class_order": [1, 2, 3, 1]}, "negative"),
])
def test_bad_region_declarations_name_the_file(meta, words):
    with pytest.raises(InputError, match=words) as info:
        parse_regions(meta, Path("/d/dataset.json"))
    assert "/d/dataset.json" in str(info.value) and "\n" not in str(info.value)


def _volume(arr: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(arr[None], affine, 3, {"qform_code": 1, "sform_code": 1})


def _oblique_affine(seed: int, spacing=(1.2, 0.9, 2.5)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = q * np.sign(np.linalg.det(q)) * np.asarray(spacing)
    affine[:3, 3] = rng.uniform(-40, 40, 3)
    return affine


def nested_case(seed: int, shape=(24, 22, 14)):
    """Two channels and nested spheres: 1 shell (edema), 2 core, 3 enhancing centre; oblique anisotropic grid."""
    rng = np.random.default_rng(seed)
    zz = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    centre = np.asarray(shape) / 2 + rng.uniform(-2, 2, 3)
    r = np.sqrt((((zz - centre) / np.asarray([1.0, 1.0, 0.5])) ** 2).sum(-1))
    label = np.select([r < 2.5, r < 4.5, r < 7.5], [3, 2, 1], 0).astype(np.uint8)
    t2 = 1.0 + 2.0 * (label >= 1) + rng.normal(0, 0.3, shape)       # FLAIR-like: the whole tumour bright
    t1c = 1.0 + 3.0 * (label == 3) + 1.5 * (label == 2) + rng.normal(0, 0.3, shape)
    return np.stack([t2, t1c]).astype(np.float32), label, _oblique_affine(seed)


def write_nested_dataset(root: Path, n: int = 4, regions: bool = True) -> Path:
    """An nnU-Net v2 raw folder of :func:`nested_case` cases with region labels (or plain ones)."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label, affine = nested_case(i)
        for c in range(2):
            write_volume(_volume(image[c], affine), root / "imagesTr" / f"case{i}_{c:04d}.nii.gz")
        write_volume(_volume(label, affine), root / "labelsTr" / f"case{i}.nii.gz")
    meta = {"name": "nested", "channel_names": {"0": "FLAIR", "1": "T1c"}, "file_ending": ".nii.gz", "numTraining": n,
            "labels": LABELS if regions else {"background": 0, "edema": 1, "core": 2, "enhancing": 3}}
    if regions:
        meta["regions_class_order"] = ORDER
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_manifest_fingerprint_and_plan_carry_the_regions(tmp_path):
    from medseg.data import load_manifest
    from medseg.planning import fingerprint, make_plan, plan_hash
    from medseg.planning.schema import Plan

    man = load_manifest(write_nested_dataset(tmp_path / "ds", n=2))
    assert man.regions == REGIONS
    assert man.labels == {0: "background", 1: "label_1", 2: "label_2", 3: "enhancing"}
    plan = make_plan(fingerprint(man))
    assert plan.regions == tuple(REGIONS) and plan.out_channels == 3 and plan.num_classes == 4
    assert plan.region_classes() == [(1, 2, 3), (2, 3), (3,)]
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.regions == plan.regions and plan_hash(again) == plan_hash(plan)
    plain = Plan.from_dict({**plan.to_dict(), "regions": []})
    assert plain.out_channels == 4 and plan_hash(plain) != plan_hash(plan)  # the cache depends on the regions
    with pytest.raises(InputError, match="regions"):
        Plan.from_dict({**plan.to_dict(), "regions": [{"name": "x", "values": [7], "paint": 7}]})


def test_an_ignore_label_next_to_regions_is_no_region(tmp_path):
    from medseg.data import load_manifest

    root = write_nested_dataset(tmp_path / "ds", n=1)
    meta = json.loads((root / "dataset.json").read_text())
    for extra in ({"labels": {**LABELS, "ignore": 4}}, {"ignore": 4}):
        (root / "dataset.json").write_text(json.dumps({**meta, **extra}))
        man = load_manifest(root)
        assert man.regions == REGIONS and man.ignore_label == 4 and 4 not in man.labels


# ------------------------------------------------------------------ the loss
def _region_batch(seed: int = 0, shape=(2, 1, 9, 8, 6), frac: float = 0.4, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, shape, generator=g)
    ignored = torch.rand(shape, generator=g) < frac
    logits = torch.randn((shape[0], 3, *shape[2:]), generator=g)
    return logits, torch.where(ignored, k, target), ignored


def _region_loss(ignore_index=4, deep_supervision=False):
    from medseg.losses import build_loss

    return build_loss("dice_ce", num_classes=4, ignore_index=ignore_index, deep_supervision=deep_supervision,
                      regions=[(1, 2, 3), (2, 3), (3,)])


def test_region_loss_ignored_voxels_change_neither_loss_nor_gradient():
    """The outputs at ignored voxels (whatever the image there made them) change neither the loss nor the gradient
    at other voxels, bitwise, and get zero gradient; the dense labels under the mask are the ignore index, so they
    cannot reach the loss (tests/test_ignore_label.py has the point-wise network check of the image itself)."""
    logits, target, ignored = _region_batch()
    other = check_ignored_logits_change_nothing(_region_loss(), logits, target, ignored)
    m = ignored.expand_as(logits)
    # the control: the region loss without the ignore index sees those logits, so the checks above can fail
    dense = _region_loss(ignore_index=None)
    d1, h1 = _loss_and_grad(dense, logits, torch.where(ignored, 0, target))
    d2, h2 = _loss_and_grad(dense, other, torch.where(ignored, 0, target))
    assert not torch.equal(d1, d2) and not torch.equal(h1[~m], h2[~m])


def test_region_loss_is_bce_plus_dice_of_the_region_masks():
    from monai.losses import DiceLoss

    from medseg.transforms.regions import regions_onehot

    logits, target, _ = _region_batch(seed=3, frac=0.0)
    onehot = regions_onehot(target, [(1, 2, 3), (2, 3), (3,)])
    assert torch.equal(onehot[:, 0].bool(), target[:, 0] > 0) and torch.equal(onehot[:, 2].bool(), target[:, 0] == 3)
    want = (torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot)
            + DiceLoss(sigmoid=True, batch=True)(logits, onehot))
    assert torch.allclose(_region_loss(ignore_index=None)(logits, target), want, atol=1e-6)
    assert torch.allclose(_region_loss()(logits, target), want, atol=1e-6)  # no ignored voxel: the same loss


def test_region_loss_deep_supervision_and_an_all_ignored_batch():
    logits, target, _ = _region_batch()
    loss = _region_loss(deep_supervision=True)
    low = torch.nn.functional.avg_pool3d(logits, 2)
    assert torch.isfinite(loss([logits, low], target))
    x = logits.clone().requires_grad_(True)
    value = _region_loss()(x, torch.full_like(target, 4))
    value.backward()
    assert value == 0 and torch.count_nonzero(x.grad) == 0
    with pytest.raises(ConfigError, match="dice_ce"):
        from medseg.losses import build_loss

        build_loss("focal", num_classes=4, regions=[(1,)])


def test_paint_regions_later_regions_overwrite_earlier_ones():
    from medseg.transforms.regions import paint_regions

    prob = torch.tensor([[0.9, 0.9, 0.9, 0.2], [0.1, 0.8, 0.7, 0.9], [0.0, 0.0, 0.6, 0.1]])
    assert paint_regions(prob, [1, 2, 3]).tolist() == [1, 2, 3, 2]
    assert paint_regions(prob.logit(), [1, 2, 3], logits=True).tolist() == [1, 2, 3, 2]


# ------------------------------------------------------------------ evaluation
def test_evaluate_regions_equals_scoring_the_unions_by_hand(tmp_path):
    from medseg.cli.main import main
    from medseg.metrics import compute_metrics

    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    affine = _oblique_affine(7)
    cases = {}
    for i in range(3):
        _, ref, _ = nested_case(10 + i)
        rng = np.random.default_rng(i)
        pred = np.where(rng.random(ref.shape) < 0.15, rng.integers(0, 4, ref.shape), ref).astype(np.uint8)
        write_volume(_volume(pred, affine), tmp_path / "pred" / f"c{i}.nii.gz")
        write_volume(_volume(ref, affine), tmp_path / "ref" / f"c{i}.nii.gz")
        cases[f"c{i}"] = (pred, ref)
    spec = tmp_path / "dataset.json"
    spec.write_text(json.dumps({"labels": LABELS, "regions_class_order": ORDER}))
    assert main(["-q", "evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--regions", str(spec), "-o", str(tmp_path / "ev"), "--bootstrap", "20"]) == 0
    with (tmp_path / "ev" / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows} == {"1", "2", "3"}
    for cid, (pred, ref) in cases.items():
        for k, region in enumerate(REGIONS, start=1):  # by hand: the union of the region's values, as label 1
            p, r = np.isin(pred, region.values).astype(np.uint8), np.isin(ref, region.values).astype(np.uint8)
            want = compute_metrics(p, r, read_volume(tmp_path / "ref" / f"{cid}.nii.gz").spacing, [1])[1]
            row = next(x for x in rows if x["case"] == cid and x["label"] == str(k))
            assert {m: float(row[m]) for m in want} == pytest.approx(want, rel=1e-9, nan_ok=True)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert [r["name"] for r in summary["regions"]] == ["whole", "core", "enhancing"]
    # a region dataset.json beside the references (here: their parent folder) is used without --regions
    from medseg.evaluation import evaluate_folder

    auto = evaluate_folder(tmp_path / "pred", tmp_path / "ref", n_boot=20)
    assert auto.label_names == {1: "whole", 2: "core", 3: "enhancing"}
    for row in rows:
        assert auto.per_case[row["case"]][int(row["label"])]["dice"] == pytest.approx(float(row["dice"]))
    # the nnU-Net "labels_as_regions_for_evaluation" form (the shared BraTS set's) gives the same regions
    alt = tmp_path / "alt.json"
    alt.write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "c": 3},
                               "labels_as_regions_for_evaluation": {"whole": [1, 2, 3], "core": [2, 3], "enh": [3]}}))
    assert [r.values for r in read_regions(alt)] == [r.values for r in REGIONS]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    with pytest.raises(InputError, match="declares no regions"):
        read_regions(plain)


# ------------------------------------------------------------------ train -> predict, end to end
@pytest.fixture(scope="module")
def region_run(tmp_path_factory):
    """Crossval (2 folds x 2 epochs, tiny) on a nested-region data set through the CLI."""
    import yaml

    from medseg.cli.main import main

    tmp = tmp_path_factory.mktemp("regions")
    data = write_nested_dataset(tmp / "data", n=4)
    cfg = {"name": "regions", "configuration": "3d_fullres", "folds": 2, "seed": 0, "dataset": str(data),
           "output": str(tmp / "run"), "cache": str(tmp / "cache"),
           "train": {"epochs": 2, "batches_per_epoch": 2, "optimizer": "adamw", "lr": 0.01, "val_every": 1,
                     "batch_size": 2, "patch_size": [16, 16, 16], "device": "cpu", "val_max_cases": 1, "threads": 1,
                     "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2]}}}}
    (tmp / "regions.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["-q", "crossval", "--config", str(tmp / "regions.yaml"), "--no-progress"]) == 0
    return tmp


def test_region_crossval_records_regions_and_scores_per_region(region_run):
    from medseg.data.regions import region_masks as masks
    from medseg.metrics import compute_metrics
    from medseg.planning import load_model_record

    run = region_run / "run"
    record = load_model_record(run)
    assert record.regions == tuple(REGIONS) and record.out_channels == 3 and record.label_values == [0, 1, 2, 3]
    segs = list((region_run / "cache").rglob("*_seg.npy"))
    assert segs and all(set(np.unique(np.load(p))) <= {0, 1, 2, 3} for p in segs)  # the cache keeps integers
    with (run / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows} == {"1", "2", "3"}
    for path in sorted(run.glob("fold_*/validation/*.nii.gz")):
        pred = np.asarray(read_volume(path).array[0])
        ref = read_volume(region_run / "data" / "labelsTr" / path.name)
        for k, (p, r) in enumerate(zip(masks(pred, REGIONS), masks(np.asarray(ref.array[0]), REGIONS)), start=1):
            want = compute_metrics(p.astype(np.uint8), r.astype(np.uint8), ref.spacing, [1])[1]["dice"]
            got = next(float(x["dice"]) for x in rows if x["case"] == path.name[:-7] and x["label"] == str(k))
            assert got == pytest.approx(want, nan_ok=True)
    summary = json.loads((run / "crossval_summary.json").read_text())
    assert set(summary["postprocessing"]) <= {"largest_foreground", "largest_per_class", "min_size_voxels",
                                              "min_size_mm3", "fill_holes", "largest_per_region"}
    assert not summary["postprocessing"]["largest_per_class"] and not summary["postprocessing"]["fill_holes"]


def test_region_prediction_paints_nested_regions_with_one_probability_per_region(region_run, tmp_path):
    from medseg.cli.main import main
    from medseg.transforms.regions import paint_regions

    image, _, affine = nested_case(50)
    image[:, :3] = 0  # outside the image's nonzero crop: background, every region probability 0
    (tmp_path / "in").mkdir()
    for c in range(2):
        write_volume(_volume(image[c], affine), tmp_path / "in" / f"new_{c:04d}.nii.gz")
    assert main(["-q", "predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m",
                 str(region_run / "run"), "--device", "cpu", "--save-probabilities", "--no-postprocessing"]) == 0
    label = read_volume(tmp_path / "out" / "new.nii.gz")
    prob = read_volume(tmp_path / "out" / "new_probabilities.nii.gz")
    assert prob.array.shape == (3, *image.shape[1:])  # one channel per region, no background channel
    assert np.allclose(label.affine, affine, atol=1e-5) and np.allclose(prob.affine, affine, atol=1e-5)
    p = np.asarray(prob.array, dtype=np.float32)
    assert p.min() >= 0 and p.max() <= 1
    lab = np.asarray(label.array[0])
    assert set(np.unique(lab)) <= {0, 1, 2, 3} and len(np.unique(lab)) > 1
    assert not lab[:3].any() and not p[:, :3].any()
    # the label is the probabilities painted in regions_class_order (later regions overwrite earlier ones) ...
    painted = paint_regions(torch.from_numpy(p), ORDER).numpy()
    assert np.array_equal(painted, lab)
    # ... so its regions nest: enhancing inside core inside whole
    whole, core, enh = region_masks(lab, REGIONS)
    assert not (core & ~whole).any() and not (enh & ~core).any()


def test_nifti_multilabel_output_keeps_an_oblique_anisotropic_affine(region_run, tmp_path):
    from medseg.cli.main import main

    image, _, _ = nested_case(51)
    affine = _oblique_affine(99, spacing=(0.8, 1.3, 3.1))
    (tmp_path / "in").mkdir()
    for c in range(2):
        write_volume(_volume(image[c], affine), tmp_path / "in" / f"obl_{c:04d}.nii.gz")
    args = ["-q", "predict", "-i", str(tmp_path / "in"), "-m", str(region_run / "run"), "--device", "cpu"]
    assert main([*args, "-o", str(tmp_path / "label")]) == 0
    assert main([*args, "-o", str(tmp_path / "multi"), "--output-format", "nifti-multilabel"]) == 0
    import nibabel as nib

    img = nib.load(str(tmp_path / "multi" / "obl.nii.gz"))
    src = nib.load(str(tmp_path / "in" / "obl_0000.nii.gz"))
    assert img.shape == (*src.shape, 3) and img.get_data_dtype() == np.uint8
    assert np.array_equal(img.affine, src.affine) and np.array_equal(img.get_qform(), src.get_qform())
    assert not list((tmp_path / "multi").glob("*.tmp*"))  # written atomically: no temporaries left
    label = np.asarray(read_volume(tmp_path / "label" / "obl.nii.gz").array[0])
    multi = np.moveaxis(np.asarray(img.dataobj), -1, 0)
    assert np.array_equal(multi, region_masks(label, REGIONS).astype(np.uint8))


def test_multilabel_volume_without_regions_has_one_channel_per_foreground_class():
    from medseg.inference.regions import multilabel_volume

    affine = _oblique_affine(3)
    lab = np.zeros((5, 4, 3), np.uint16)
    lab[1, 1, 1], lab[2, 2, 2] = 200, 500
    out = multilabel_volume(Volume(lab[None], affine, 3), (), [0, 200, 500])
    assert out.array.shape == (2, 5, 4, 3) and out.array.dtype == np.uint8
    assert out.array[0].sum() == 1 and out.array[1][2, 2, 2] == 1 and np.array_equal(out.affine, affine)


def test_post_processing_is_chosen_and_applied_per_region():
    from medseg.inference.postprocess import PostprocessSetting, choose_postprocessing, postprocess

    ref = np.zeros((20, 20, 10), np.uint8)
    ref[4:12, 4:12, 2:8] = 1
    ref[6:10, 6:10, 3:7] = 2
    ref[7:9, 7:9, 4:6] = 3
    pred = ref.copy()
    pred[4, 4, 2] = 3  # a stray enhancing voxel in the edema, apart from the core (so also a stray core piece)
    setting = PostprocessSetting(largest_per_region=(3,))
    out = postprocess(pred, setting, regions=REGIONS)
    want = ref.copy()
    want[4, 4, 2] = 0  # the region's voxels outside its largest component become background (nnU-Net's rule)
    assert np.array_equal(out, want)
    assert PostprocessSetting.from_dict(setting.to_dict()) == setting
    assert "largest_per_region" not in PostprocessSetting().to_dict()  # settings without regions keep their form
    chosen, report = choose_postprocessing([(pred, ref, None)], [1, 2, 3], regions=REGIONS)
    assert chosen == PostprocessSetting(largest_per_region=(2,))  # the whole tumour is one piece: only the core
    assert report["dice_after"]["2"] == 1.0 > report["dice_before"]["2"]
    with pytest.raises(ConfigError, match="regions 1..3"):
        postprocess(pred, PostprocessSetting(largest_per_region=(4,)), regions=REGIONS)
