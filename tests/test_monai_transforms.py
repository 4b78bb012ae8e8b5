"""medseg's MONAI dictionary transforms: loading and preprocessing in a MONAI Compose give medseg's own arrays,
MONAI's Invertd restores like restore_original, every random transform is seeded and keeps image and label
aligned, and ``augmentation.extra`` appends MONAI transforms by name (a misspelt name fails at config load)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from medseg.errors import ConfigError
from medseg.io import Volume, read_volume, write_volume
from medseg.transforms import random as R
from medseg.transforms.augment import augment_batch, make_generator
from medseg.transforms.case import load_case
from medseg.transforms.dictionary import LoadVolumed, PreprocessFromPland
from medseg.transforms.extra import transform_table, validate_extra
from medseg.transforms.preprocess import preprocess_volume, restore_original


def _plan(spacing, channels=1):
    from medseg.planning import Configuration, NetworkSpec, Normalization, Plan

    conf = Configuration(spacing=list(spacing), patch_size=[16, 16, 16], batch_size=2, network=NetworkSpec("unet"))
    return Plan(dataset="t", spatial_dims=3, in_channels=channels, num_classes=3, labels={0: "bg", 1: "a", 2: "b"},
                normalization=[Normalization("zscore")] * channels, configurations={"cfg": conf})


# ------------------------------------------------------------------------ loading + preprocessing in Compose
@pytest.mark.parametrize("case", ["nifti_with_label", "dicom_crop", "dicom_oblique"])
def test_compose_gives_medseg_preprocessing(case, shared_data):
    if case == "nifti_with_label":
        root = shared_data("hippocampus")
        images, label = [root / "imagesTr" / "hippocampus_004.nii.gz"], root / "labelsTr" / "hippocampus_004.nii.gz"
        spacing = (1.3, 0.8, 1.1)
    elif case == "dicom_crop":
        images, label, spacing = [shared_data("dicom", "tcia_pgbm003", "11_HCropVolume")], None, (0.9, 1.2, 1.5)
    else:
        images, label, spacing = [shared_data("dicom", "tcia_pgbm003", "11-T1post-18670")], None, (2.0, 2.0, 6.5)
    plan = _plan(spacing)
    keys = ["image"] + (["label"] if label else [])
    data = {"image": str(images[0])}
    if label:
        data["label"] = str(label)
    out = Compose([LoadVolumed(keys), PreprocessFromPland(plan, "cfg")])(data)

    image, seg = load_case(images, label)
    arr, ref_seg, props = preprocess_volume(image, plan, "cfg", seg)
    assert isinstance(out["image"], MetaTensor)
    assert np.array_equal(out["image"].numpy(), arr) and out["image"].dtype == torch.float32
    assert np.allclose(out["image"].affine.numpy(), props["affine"]) and out["image"].affine.dtype == torch.float64
    assert tuple(props["shape"]) != tuple(props["original_shape"])  # the plan really resampled
    if label:
        assert np.array_equal(out["label"].numpy(), ref_seg)
    raw = read_volume(images[0])
    meta_text = repr(dict(out["image"].meta))
    assert np.allclose(out["image"].meta["original_affine"].numpy(), raw.affine)
    for secret in ("series_uid", "sop_instance_uids", "source_files"):
        assert secret not in out["image"].meta
        if secret in raw.meta:  # DICOM: its identifiers appear nowhere in the metadata
            for value in np.atleast_1d(raw.meta[secret])[:3]:
                assert str(value) not in meta_text.replace(str(images[0]), "")


# ------------------------------------------------------------------------ Invertd == restore_original
def _oblique_case(tmp_path, spacing, angle, flips):
    c, s = np.cos(angle), np.sin(angle)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag(np.array(flips) * np.array(spacing))
    aff[:3, 3] = [10.0, -20.0, 5.0]
    shape = (20, 18, 12)
    rng = np.random.default_rng(0)
    img = np.zeros(shape, np.float32)
    img[2:-2, 3:-1, 1:-1] = rng.normal(100, 20, (16, 14, 10))
    zz = np.indices(shape)
    r = np.sqrt(sum(((z - n / 2) / (n / 4)) ** 2 for z, n in zip(zz, shape)))
    lab = ((r < 1.2).astype(np.int16) + ((r < 1.2) & (zz[0] > 10))).astype(np.int16)
    write_volume(Volume(img[None], aff), tmp_path / "img.nii.gz")
    write_volume(Volume(lab[None], aff), tmp_path / "lab.nii.gz")
    return {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}


@pytest.mark.parametrize("spacing,angle,flips,target", [
    ((1.0, 1.0, 1.0), 0.0, (1, 1, 1), (1.0, 1.0, 1.0)),
    ((0.7, 0.9, 3.0), 0.35, (-1, 1, -1), (1.1, 1.1, 1.5)),  # oblique, anisotropic, flipped axes
    ((1.2, 0.6, 2.5), -0.6, (1, -1, 1), (0.8, 0.9, 2.0)),
])
def test_invertd_restores_like_restore_original(tmp_path, spacing, angle, flips, target):
    files = _oblique_case(tmp_path, spacing, angle, flips)
    plan = _plan(target)
    pipeline = Compose([LoadVolumed(["image", "label"]), PreprocessFromPland(plan, "cfg")])
    d = pipeline(files)
    image, seg = load_case([files["image"]], files["label"])
    _, plan_seg, props = preprocess_volume(image, plan, "cfg", seg)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, *props["shape"])).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    cases = [  # (prediction in plan space, nearest_interp, is_label for restore_original)
        (plan_seg.astype(np.int64), True, True),  # an argmax label map
        (plan_seg.astype(np.float32), True, True),  # AsDiscrete's float label map
        (probs, False, False),  # per-class probabilities
    ]
    for pred, nearest, is_label in cases:
        data = dict(d, pred=MetaTensor(torch.from_numpy(pred)))  # a network's output on a MetaTensor input
        inv = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=nearest)(data)["pred"]
        expected = restore_original(pred, props, is_label=is_label)
        assert inv.shape[1:] == image.shape
        assert np.array_equal(inv.numpy(), expected), (pred.dtype, nearest)
        assert np.allclose(inv.affine.numpy(), image.affine)
    back = Invertd(keys="pred", transform=pipeline, orig_keys="image")(dict(d, pred=d["label"]))["pred"]
    assert (back.numpy() == seg.array).mean() > 0.97  # label -> plan space -> original grid lands on itself


# ------------------------------------------------------------------------ random transforms
def _box(b=3, size=(24, 28, 20)):
    """A box label and an image that is > 0 exactly on it (with a ramp, so gamma and contrast have grey values)."""
    lab = torch.zeros(b, 1, *size, dtype=torch.long)
    lab[:, :, 6:18, 8:22, 5:15] = 1
    ramp = torch.linspace(0, 0.5, size[0]).view(1, 1, -1, 1, 1)
    return (lab.float() * 2.0 - 1.0) * (1.0 + ramp), lab


ALL_ON = {
    "RandSpatiald": dict(keys=["image", "label"], prob_rotation=1.0, prob_scale=1.0, prob_elastic=1.0,
                         rotation_deg=40.0),
    "RandMirrord": dict(keys=["image", "label"], prob=0.5),
    "RandNoised": dict(keys="image", prob=1.0, std=(0.05, 0.1)),
    "RandBlurd": dict(keys="image", prob=1.0),
    "RandBrightnessd": dict(keys="image", prob=1.0),
    "RandContrastd": dict(keys="image", prob=1.0),
    "RandLowResd": dict(keys="image", prob=1.0, zoom=(0.4, 0.6)),
    "RandGammad": dict(keys="image", prob=1.0, prob_invert=0.5),
}


def test_every_medseg_random_transform_is_tested_and_named_in_the_table():
    names = [n for n in R.__all__ if n.startswith("Rand")]
    assert sorted(names) == sorted(ALL_ON)
    table = transform_table()
    assert all(table[n] is getattr(R, n) for n in names)
    assert "RandBiasFieldd" in table and "RandSpatialCropd" not in table  # shape-changing ones are not offered


@pytest.mark.parametrize("name", sorted(ALL_ON))
@pytest.mark.parametrize("batch", [False, True])
def test_random_transform_seeded_aligned_and_batch_capable(name, batch):
    img, lab = _box()
    cls = getattr(R, name)

    def run(seed):
        t = cls(**ALL_ON[name], batch=batch)
        t.set_random_state(seed)
        if batch:
            return t({"image": img, "label": lab})
        outs = [t({"image": MetaTensor(img[i], affine=torch.eye(4) * 2), "label": MetaTensor(lab[i])})
                for i in range(img.shape[0])]
        assert all(isinstance(o["image"], MetaTensor) and torch.equal(o["image"].affine, torch.eye(4) * 2)
                   for o in outs)
        return {k: torch.stack([o[k].as_tensor() for o in outs]) for k in ("image", "label")}

    a, b = run(7), run(7)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])  # seed reproduces
    assert any(not torch.equal(run(s)["image"], a["image"]) for s in (8, 9, 10))  # another seed differs
    assert not torch.equal(a["image"], img)  # the transform did something
    assert a["image"].shape == img.shape and a["image"].dtype == img.dtype and a["label"].dtype == lab.dtype
    assert torch.equal(img, _box()[0])  # inputs untouched
    if "label" not in str(ALL_ON[name]["keys"]):
        assert torch.equal(a["label"], lab)  # intensity steps leave the label alone
        return
    assert not torch.equal(a["label"], lab)  # the structure moved
    for i in range(img.shape[0]):  # label on the structure: Dice against the image-transformed truth
        s, li = (a["image"][i, 0] > 0).numpy(), (a["label"][i, 0] == 1).numpy()
        dice = 2 * (s & li).sum() / (s.sum() + li.sum())
        assert dice > 0.97, f"{name}: image and label disagree (Dice {dice:.3f})"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_batch_transforms_run_on_the_gpu_and_match_seeded_reruns():
    img, lab = (t.cuda() for t in _box())
    chain = Compose(R.augmentation_transforms({"p_rotation": 1.0, "p_noise": 1.0}, batch=True))
    chain.set_random_state(3)
    a = chain({"image": img, "label": lab})
    chain.set_random_state(3)
    b = chain({"image": img, "label": lab})
    assert a["image"].is_cuda and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_augmentation_transforms_follow_the_configuration():
    chain = R.augmentation_transforms({"p_rotation": 0.0, "p_scale": 0.0, "mirror_axes": [], "p_noise": 0,
                                       "p_blur": 0, "p_brightness": 0, "p_contrast": 0, "p_lowres": 0,
                                       "p_gamma": 0})
    img, lab = _box(1)
    out = Compose(chain)({"image": img[0], "label": lab[0]})
    assert torch.equal(out["image"], img[0]) and torch.equal(out["label"], lab[0])  # all off: identity
    chain = R.augmentation_transforms({"p_brightness": 1.0, "brightness": [2.0, 2.0], "p_gamma": 0,
                                       "p_contrast": 0, "p_noise": 0, "p_lowres": 0, "p_blur": 0,
                                       "p_rotation": 0, "p_scale": 0, "mirror_axes": [],
                                       "extra": [{"name": "RandScaleIntensityd",
                                                  "kwargs": {"keys": ["image"], "prob": 1.0, "factors": [1, 1]}}]})
    assert type(chain[-1]).__name__ == "RandScaleIntensityd"
    out = Compose(chain)({"image": img[0], "label": lab[0]})
    assert torch.allclose(out["image"], img[0] * 4)  # brightness x2, then MONAI's scale (1 + 1) x2


# ------------------------------------------------------------------------ augmentation.extra
BIAS = {"name": "RandBiasFieldd", "kwargs": {"keys": ["image"], "prob": 1.0, "coeff_range": [0.3, 0.5]}}
AFFINE = {"name": "RandAffined", "kwargs": {"keys": ["image", "label"], "prob": 1.0,
                                            "rotate_range": [0.5, 0.5, 0.5], "mode": ["bilinear", "nearest"],
                                            "padding_mode": "reflection"}}


def test_extra_monai_transforms_are_applied_seeded_and_aligned():
    img, lab = _box()
    off = {"p_rotation": 0, "p_scale": 0, "mirror_axes": [], "p_noise": 0, "p_blur": 0, "p_brightness": 0,
           "p_contrast": 0, "p_lowres": 0, "p_gamma": 0}
    base, _ = augment_batch(img, lab, off, make_generator(0, 0, 0, 0))
    a = augment_batch(img, lab, {**off, "extra": [BIAS, AFFINE]}, make_generator(0, 0, 0, 0))
    b = augment_batch(img, lab, {**off, "extra": [BIAS, AFFINE]}, make_generator(0, 0, 0, 0))
    c = augment_batch(img, lab, {**off, "extra": [BIAS, AFFINE]}, make_generator(1, 0, 0, 0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the run's seed reproduces the extras
    assert not torch.equal(a[0], c[0])  # and another seed changes them
    assert not torch.equal(a[0], base) and not torch.equal(a[1], lab)  # both transforms ran
    assert a[0].dtype == img.dtype and a[1].dtype == lab.dtype and a[0].shape == img.shape
    for i in range(img.shape[0]):  # the bias field keeps the sign, so image > 0 still marks the structure
        s, li = (a[0][i, 0] > 0).numpy(), (a[1][i, 0] == 1).numpy()
        assert 2 * (s & li).sum() / (s.sum() + li.sum()) > 0.97


@pytest.mark.parametrize("spec,match", [
    ({"name": "RandBiasFeldd", "kwargs": {"keys": ["image"]}}, r"did you mean 'RandBiasFieldd'\?.*RandGammad"),
    ({"name": "RandBiasFieldd", "kwargs": {"keys": ["image"], "coef": 1}}, r"coef"),
    ({"name": "RandBiasFieldd", "kwargs": {}}, r"kwargs\.keys"),
    ({"name": "RandBiasFieldd", "kwargs": {"keys": ["img"]}}, r"kwargs\.keys"),
    ("RandBiasFieldd", r"a mapping"),
])
def test_bad_extra_entries_fail_at_config_load(spec, match):
    from medseg.training.config import pipeline_from_dict

    with pytest.raises(ConfigError, match=match) as err:
        pipeline_from_dict({"name": "x", "dataset": "/d", "train": {"augmentation": {"extra": [spec]}}})
    assert str(err.value).startswith("train.augmentation.extra[0]") and "\n" not in str(err.value)
    assert validate_extra([BIAS, AFFINE])[0]["name"] == "RandBiasFieldd"


def test_pipeline_with_an_extra_monai_transform_trains_an_epoch(tmp_path, monkeypatch):
    import yaml

    import medseg.transforms.extra as extra
    from medseg.cli.main import main
    from medseg.data.demo import make_demo_dataset

    calls = []
    real = extra.apply_extra
    monkeypatch.setattr(extra, "apply_extra", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    data = make_demo_dataset(tmp_path / "data", n_cases=4, seed=0)
    cfg = {"name": "tiny", "dataset": str(data), "output": str(tmp_path / "run"), "configuration": "3d_fullres",
           "folds": 2, "seed": 0,
           "train": {"epochs": 1, "batches_per_epoch": 2, "optimizer": "adamw", "lr": 0.003, "val_every": 1,
                     "checkpoint_every": 1, "batch_size": 2, "patch_size": [16, 16, 16], "device": "cpu",
                     "val_max_cases": 1, "threads": 1, "augmentation": {"extra": [BIAS]},
                     "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2],
                                                            "kernel_sizes": 3}}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "train", "--config", str(path), "--fold", "0", "--no-progress"]) == 0
    assert calls and calls[0] == [BIAS]  # every training batch went through the extra transform
    assert len(calls) == 2
    run_cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run_cfg["train"]["augmentation"]["extra"] == [BIAS]  # the run folder records it
    assert json.loads(json.dumps(run_cfg["train"]["augmentation"]))  # plain data


def test_misspelt_extra_transform_is_a_one_line_cli_error(tmp_path, capsys):
    import yaml

    from medseg.cli.main import main

    cfg = {"name": "x", "dataset": str(tmp_path), "train": {"augmentation": {"extra": [
        {"name": "RandCoarseDropoutD2", "kwargs": {"keys": ["image"]}}]}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--fold", "0"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'RandCoarseDropoutd'?" in lines[0], err
    assert lines[0].startswith("medseg train: error: train.augmentation.extra[0].name='RandCoarseDropoutD2'")


# ------------------------------------------------------------------------ other formats and MONAI's loader
def test_load_volumed_reads_nrrd_mha_and_channel_lists_like_medseg(tmp_path):
    rng = np.random.default_rng(0)
    aff = np.array([[0.0, -1.5, 0, 4], [0.8, 0, 0, -3], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    for i in range(2):
        write_volume(Volume(rng.normal(size=(1, 9, 7, 5)).astype(np.float32), aff), tmp_path / f"c{i}.nrrd")
    write_volume(Volume(rng.integers(0, 3, (1, 9, 7, 5)).astype(np.int16), aff), tmp_path / "lab.mha")
    files = {"image": [str(tmp_path / "c0.nrrd"), str(tmp_path / "c1.nrrd")], "label": str(tmp_path / "lab.mha")}
    d = LoadVolumed(["image", "label"])(files)
    image, label = load_case(files["image"], files["label"])
    assert d["image"].shape == (2, 9, 7, 5) and np.array_equal(d["image"].numpy(), image.array)
    assert np.array_equal(d["label"].numpy(), label.array) and d["label"].dtype == torch.int16
    assert np.allclose(d["image"].affine.numpy(), image.affine) and np.allclose(d["label"].affine.numpy(), aff)
    assert d["image"].meta["filename_or_obj"] == files["image"][0]
    write_volume(Volume(np.zeros((1, 9, 7, 4), np.int16), aff), tmp_path / "bad.mha")
    from medseg.errors import InputError

    with pytest.raises(InputError, match=r"bad\.mha: label grid"):
        LoadVolumed(["image", "label"])({**files, "label": str(tmp_path / "bad.mha")})


def test_preprocess_from_pland_takes_monai_loadimaged_output(shared_data):
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    root = shared_data("hippocampus")
    files = {"image": str(root / "imagesTr" / "hippocampus_004.nii.gz"),
             "label": str(root / "labelsTr" / "hippocampus_004.nii.gz")}
    plan = _plan((1.3, 0.8, 1.1))
    ours = Compose([LoadVolumed(["image", "label"]), PreprocessFromPland(plan, "cfg")])(files)
    theirs = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]),
                      PreprocessFromPland(plan, "cfg")])(files)
    assert np.array_equal(ours["image"].numpy(), theirs["image"].numpy())
    assert np.array_equal(ours["label"].numpy(), theirs["label"].numpy())
    assert np.allclose(ours["image"].affine.numpy(), theirs["image"].affine.numpy())


def test_a_collated_monai_batch_is_augmented_as_a_batch():
    from monai.data import list_data_collate

    img, lab = _box(2)
    batch = list_data_collate([{"image": MetaTensor(img[i]), "label": MetaTensor(lab[i])} for i in range(2)])
    assert batch["image"].is_batch
    t = R.RandSpatiald(["image", "label"], prob_rotation=1.0, rotation_deg=40.0)  # batch=False: the flag decides
    t.set_random_state(0)
    out = t(batch)
    assert out["image"].shape == img.shape and out["image"].is_batch
    assert not torch.equal(out["label"].as_tensor(), lab)
    s, li = out["image"].as_tensor() > 0, out["label"].as_tensor() == 1
    assert 2 * (s & li).sum() / (s.sum() + li.sum()) > 0.97
