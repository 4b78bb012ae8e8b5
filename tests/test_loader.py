"""Preprocessed cache and PatchLoader: reuse, shapes, oversampling, seeds and workers, 2D slices, real data."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.loader import PatchLoader, _crop, preprocess_dataset
from medseg.data.manifest import Case, Manifest
from medseg.errors import InputError
from medseg.planning import fingerprint, make_plan


def _dataset(root, n=5, shape=(30, 26, 18)):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        img = rng.normal(100, 10, shape).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        lab[10:13, 10:12, 8:10] = 1  # tiny foreground: random patches rarely hit it
        lab[20:22, 5:7, 3:5] = 2
        aff = np.diag([1.0, 1.0, 1.0, 1.0])
        ip, lp = root / f"c{i}_img.nii.gz", root / f"c{i}_seg.nii.gz"
        nib.save(nib.Nifti1Image(img, aff), ip)
        nib.save(nib.Nifti1Image(lab, aff), lp)
        cases.append(Case(f"c{i}", f"p{i}", [ip], lp))
    return Manifest(root, "Tiny", cases, {0: "bg", 1: "a", 2: "b"}, {0: "MRI"}, 3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    m = _dataset(root / "ds")
    plan = make_plan(fingerprint(m))
    out3 = preprocess_dataset(m, plan, "3d_fullres", root / "cache")
    out2 = preprocess_dataset(m, plan, "2d", root / "cache")
    return m, plan, out3, out2


def test_cache_layout_and_reuse(cache):
    m, plan, out, _ = cache
    for c in m.cases:
        img = np.load(out / f"{c.case_id}.npy", mmap_mode="r")
        seg = np.load(out / f"{c.case_id}_seg.npy", mmap_mode="r")
        props = json.loads((out / f"{c.case_id}.json").read_text())
        assert isinstance(img, np.memmap) and img.dtype == np.float32 and seg.dtype == np.int16
        assert img.shape[1:] == seg.shape[1:] == tuple(props["shape"])
        assert set(props["foreground"]) == {"1", "2"} and len(props["foreground"]["1"]) == 3 * 2 * 2
        for loc in props["foreground"]["2"]:
            assert seg[(0, *loc)] == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = preprocess_dataset(m, plan, "3d_fullres", out.parents[1])
    assert again == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # nothing rewritten


def _loader(out, **kw):
    args = {"patch_size": [16, 16, 16], "batch_size": 6, "spatial_dims": 3, "num_batches": 4, "seed": 7}
    args.update(kw)
    return PatchLoader(out, [f"c{i}" for i in range(5)], **args)


def test_batches_shapes_and_foreground_oversampling(cache):
    _, _, out, _ = cache
    loader = _loader(out, num_batches=10)
    batches = list(loader.epoch(0))
    assert len(batches) == 10
    for b in batches:
        assert b["image"].shape == (6, 1, 16, 16, 16) and b["image"].dtype == torch.float32
        assert b["label"].shape == (6, 1, 16, 16, 16) and b["label"].dtype == torch.int64
        forced = b["label"][4:]  # last third of each batch is centred on foreground
        assert all(bool((forced[i] > 0).any()) for i in range(forced.shape[0]))
    none = _loader(out, num_batches=10, oversample_foreground=0.0)
    hits = sum(int((b["label"] > 0).flatten(1).any(1).sum()) for b in none.epoch(0))
    forced_hits = sum(int((b["label"] > 0).flatten(1).any(1).sum()) for b in batches)
    assert forced_hits > hits


def test_same_seed_same_batches_and_workers_differ(cache):
    _, _, out, _ = cache
    aug = {"p_rotation": 0.5, "p_elastic": 0.2}
    a = list(_loader(out, augmentation=aug).epoch(3))
    b = list(_loader(out, augmentation=aug).epoch(3))
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) for x, y in zip(a, b))
    c = list(_loader(out, augmentation=aug).epoch(4))
    assert not torch.equal(a[0]["image"], c[0]["image"])
    loader = _loader(out, augmentation=aug)
    w0 = next(loader.iter_worker(3, 0, 2))
    w1 = next(loader.iter_worker(3, 1, 2))
    assert not torch.equal(w0["image"], w1["image"])
    other_fold = next(_loader(out, augmentation=aug, fold=1).iter_worker(3, 0, 1))
    assert not torch.equal(other_fold["image"], a[0]["image"])


def test_worker_processes_reproduce_in_process_batches(cache):
    _, _, out, _ = cache
    loader = _loader(out, num_workers=2, augmentation={})
    got = list(loader.epoch(1))
    w0, w1 = list(loader.iter_worker(1, 0, 2)), list(loader.iter_worker(1, 1, 2))
    expected = [w0[0], w1[0], w0[1], w1[1]]
    assert len(got) == 4
    assert all(torch.equal(g["image"], e["image"]) for g, e in zip(got, expected))


def test_2d_slices_from_3d_cases(cache):
    _, plan, _, out2 = cache
    cfg = plan.configuration("2d")
    loader = PatchLoader(out2, [f"c{i}" for i in range(5)], patch_size=[16, 16], batch_size=6, spatial_dims=2,
                         num_batches=3, seed=1, slice_axis=cfg.slice_axis)
    assert loader.slice_axis == cfg.slice_axis
    with pytest.raises(InputError, match="slice_axis"):  # 2D patches of 3D cases need the configuration's axis
        PatchLoader(out2, ["c0"], patch_size=[16, 16], batch_size=2, spatial_dims=2)
    for b in loader.epoch(0):
        assert b["image"].shape == (6, 1, 16, 16) and b["label"].shape == (6, 1, 16, 16)
        assert all(bool((b["label"][i] > 0).any()) for i in range(4, 6))


def test_crop_mirrors_outside_the_case():
    arr = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    out = _crop(arr, [-2, 1], (8, 4))
    assert out.shape == (2, 8, 4)
    ref = np.pad(arr, ((0, 0), (2, 1), (0, 0)), mode="reflect")[:, :, 1:5]
    assert np.array_equal(out, ref)


def test_loader_errors(cache):
    _, _, out, _ = cache
    with pytest.raises(InputError, match="missing from the preprocessed cache"):
        PatchLoader(out, ["nope"], patch_size=[8, 8, 8], batch_size=2, spatial_dims=3)
    with pytest.raises(InputError, match="axes"):
        PatchLoader(out, ["c0"], patch_size=[8, 8], batch_size=2, spatial_dims=3)


@pytest.mark.shared_data
def test_hippocampus_cache_inverts_to_original_labels(shared_data, tmp_path):
    from medseg.data.manifest import load_manifest
    from medseg.transforms.case import load_case
    from medseg.transforms.preprocess import restore_original

    full = load_manifest(shared_data("hippocampus"))
    m = Manifest(full.root, full.name, full.cases[:3], full.labels, full.channel_names, full.spatial_dims)
    plan = make_plan(fingerprint(m))
    out = preprocess_dataset(m, plan, "3d_fullres", tmp_path)
    for case in m.cases:
        seg = np.load(out / f"{case.case_id}_seg.npy")
        props = json.loads((out / f"{case.case_id}.json").read_text())
        _, label = load_case(case.images, case.label)
        assert np.array_equal(restore_original(seg, props, is_label=True), label.array)
    b = next(iter(PatchLoader(out, [c.case_id for c in m.cases], patch_size=[40, 56, 40], batch_size=4,
                              spatial_dims=3, augmentation={}, num_batches=1).epoch(0)))
    assert b["image"].shape == (4, 1, 40, 56, 40) and set(b["label"].unique().tolist()) <= {0, 1, 2}


def test_device_augmentation_path_equals_loader_path(cache):
    """The trainer's GPU path (raw crops, whole batches augmented on the device) gives the loader's batches."""
    from medseg.training.fold import _device_augmented

    out = cache[2]
    kw = {"augmentation": {}, "fold": 1, "num_batches": 3}
    in_loader = list(_loader(out, **kw).epoch(2))
    on_device = list(_device_augmented(_loader(out, augment_in_loader=False, **kw), torch.device("cpu"))(2))
    assert len(in_loader) == len(on_device) == 3
    for x, y in zip(in_loader, on_device):
        torch.testing.assert_close(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])
    raw = list(_loader(out, **{**kw, "augmentation": None}).epoch(2))
    assert not torch.allclose(raw[0]["image"], on_device[0]["image"])  # it really augments
