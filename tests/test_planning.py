"""Planning: topology rules, target spacing, plan sizing for CPU and GPU, plan files, fingerprint, CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import ConfigError, InputError
from medseg.planning import fingerprint, load_plan, make_plan, plan_hash, save_plan
from medseg.planning.plan import estimate_training_memory, target_spacing
from medseg.planning.topology import pool_and_conv_props


def test_topology_isotropic_hippocampus_like():
    topo = pool_and_conv_props([1.0, 1.0, 1.0], [35, 50, 36])
    assert topo.pools_per_axis == [3, 3, 3]
    assert topo.patch_size == [40, 56, 40]
    assert topo.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert len(topo.kernel_sizes) == len(topo.strides)
    assert all(k == [3, 3, 3] for k in topo.kernel_sizes)


def test_topology_anisotropic_pools_inplane_first():
    topo = pool_and_conv_props([0.8, 0.8, 4.0], [256, 256, 20])
    # z (4 mm) may only pool once in-plane spacing has caught up to within 2x
    assert topo.strides[1] == [2, 2, 1] and topo.strides[2] == [2, 2, 1]
    assert topo.kernel_sizes[0] == [3, 3, 1]
    assert topo.pools_per_axis[2] < topo.pools_per_axis[0]
    bottleneck = [p // d for p, d in zip(topo.patch_size, topo.divisible_by)]
    assert all(b >= 4 for b in bottleneck[:2])
    assert all(p % d == 0 for p, d in zip(topo.patch_size, topo.divisible_by))


def test_target_spacing_keeps_coarse_axis_coarser():
    rng = np.random.default_rng(0)
    sp = np.column_stack([np.full(20, 0.7), np.full(20, 0.7), rng.uniform(3.0, 6.0, 20)])
    shapes = np.tile([512, 512, 30], (20, 1))
    t = target_spacing(sp, shapes)
    assert t[0] == pytest.approx(0.7)
    assert t[2] == pytest.approx(np.percentile(sp[:, 2], 10))
    assert t[2] < np.median(sp[:, 2])
    iso = target_spacing(np.ones((5, 3)), np.tile([40, 50, 40], (5, 1)))
    assert iso == [1.0, 1.0, 1.0]


def _fp(spacing=(1.0, 1.0, 1.0), shape=(35, 50, 36), n=200, modality="MRI", dims=3):
    return {
        "dataset": "Synthetic", "manifest_hash": "abc", "num_cases": n, "spatial_dims": dims, "channels": 1,
        "modalities": [modality], "labels": {"0": "background", "1": "a", "2": "b"},
        "case_ids": [f"c{i}" for i in range(n)], "spacings": [list(spacing)] * n, "shapes": [list(shape)] * n,
        "cropped_shapes": [list(shape)] * n, "median_crop_fraction": 1.0,
        "intensity": [{"mean": 40.0, "std": 300.0, "median": 40.0, "min": -1000.0, "max": 2000.0,
                       "percentile_00_5": -900.0, "percentile_99_5": 1500.0}],
        "class_voxels": [100, 10, 10], "class_frequency": [0.83, 0.085, 0.085],
    }


def test_make_plan_cpu_hippocampus_like():
    plan = make_plan(_fp(), device="cpu")
    cfg = plan.configurations["3d_fullres"]
    assert cfg.spacing == [1.0, 1.0, 1.0]
    assert cfg.patch_size == [40, 56, 40]
    assert cfg.batch_size == 8
    kw = cfg.network.kwargs
    assert plan.configurations["3d_fullres"].network.name == "unet"
    assert kw["features"] == [16, 32, 64, 128] and kw["strides"][0] == [1, 1, 1]
    assert plan.normalization[0].scheme == "zscore"
    two = plan.configurations["2d"]
    assert two.slicewise and len(two.patch_size) == 2 and two.spacing[two.slice_axis] is None
    assert plan.num_classes == 3


def test_make_plan_gpu_budget_and_ct_normalisation():
    fp = _fp(spacing=(0.8, 0.8, 2.5), shape=(400, 400, 120), modality="CT")
    small = make_plan(fp, device="cuda", memory_gb=4).configurations["3d_fullres"]
    big = make_plan(fp, device="cuda", memory_gb=24).configurations["3d_fullres"]
    assert np.prod(small.patch_size) * small.batch_size < np.prod(big.patch_size) * big.batch_size
    for cfg, gb in ((small, 4), (big, 24)):
        assert cfg.estimated_memory_gb <= gb
        assert cfg.network.kwargs["features"][0] == 32 and max(cfg.network.kwargs["features"]) <= 320
    norm = make_plan(fp, device="cuda").normalization[0]
    assert norm.scheme == "ct" and norm.clip == [-900.0, 1500.0] and norm.mean == 40.0
    # a CPU plan for the same data is much cheaper per batch than the GPU plan
    cpu = make_plan(fp, device="cpu").configurations["3d_fullres"]
    assert np.prod(cpu.patch_size) * cpu.batch_size <= 750_000


def test_make_plan_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="device"):
        make_plan(_fp(), device="tpu")
    with pytest.raises(ConfigError, match="memory_gb"):
        make_plan(_fp(), device="cuda", memory_gb=0)


def test_estimate_memory_grows_with_batch():
    topo = pool_and_conv_props([1.0] * 3, [128, 128, 128])
    feats = [32, 64, 128, 256, 320, 320]
    one = estimate_training_memory(topo.patch_size, topo, feats, 1)
    assert estimate_training_memory(topo.patch_size, topo, feats, 2) == pytest.approx(2 * one)
    assert 6 * 1024**3 < 2 * one < 10 * 1024**3  # nnU-Net default 128^3 x 2 fits about 8 GB


def test_plan_save_load_hash(tmp_path):
    plan = make_plan(_fp())
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    assert load_plan(path) == plan
    h = plan_hash(plan)
    changed_batch = load_plan(path)
    changed_batch.configurations["3d_fullres"].batch_size = 2
    assert plan_hash(changed_batch) == h  # preprocessing does not depend on batch size
    changed_spacing = load_plan(path)
    changed_spacing.configurations["3d_fullres"].spacing = [1.5, 1.5, 1.5]
    assert plan_hash(changed_spacing) != h
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**plan.to_dict(), "schema_version": 99}))
    with pytest.raises(InputError, match="version"):
        load_plan(bad)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_plan(tmp_path / "junk.json")


def _write_msd(root, n=4, modality="MRI"):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    training = []
    for i in range(n):
        img = np.zeros((20, 24, 10), np.float32)
        img[2:18, 3:21, 1:9] = rng.normal(100, 10, (16, 18, 8))
        lab = np.zeros((20, 24, 10), np.uint8)
        lab[6:12, 8:14, 3:7] = 1
        lab[12:15, 8:14, 3:7] = 2
        img[lab == 1] += 50
        aff = np.diag([0.9, 0.9, 3.0, 1.0])
        nib.save(nib.Nifti1Image(img, aff), root / "imagesTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), root / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": modality}, "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": n, "training": training}))
    return root


def test_fingerprint_synthetic_msd(tmp_path):
    from medseg.data.manifest import load_manifest

    m = load_manifest(_write_msd(tmp_path / "ds"))
    fp = fingerprint(m)
    assert fp["num_cases"] == 4 and fp["spatial_dims"] == 3 and fp["modalities"] == ["MRI"]
    assert fp["spacings"][0] == pytest.approx([0.9, 0.9, 3.0])
    assert fp["cropped_shapes"][0] == [16, 18, 8]
    assert fp["class_voxels"] == [4 * (20 * 24 * 10 - 144 - 72), 4 * 144, 4 * 72]
    assert 130 < fp["intensity"][0]["mean"] < 140  # foreground: 2/3 at ~150, 1/3 at ~100
    assert fp["manifest_hash"] == m.hash()
    plan = make_plan(fp)
    assert plan.configurations["2d"].slice_axis == 2  # slices across the coarse 3 mm axis


def test_cli_plan_prints_and_writes(tmp_path, capsys):
    from medseg.cli.main import main

    ds = _write_msd(tmp_path / "ds")
    out = tmp_path / "plan.json"
    assert main(["plan", str(ds), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3d_fullres" in text and "patch" in text and "batch" in text
    assert load_plan(out).dataset == "Tiny"
    assert main(["plan", str(tmp_path / "missing"), "-o", str(out)]) == 1
    assert "error" in capsys.readouterr().err


@pytest.mark.shared_data
def test_plan_hippocampus_is_sensible(shared_data):
    from medseg.data.manifest import load_manifest

    plan = make_plan(fingerprint(load_manifest(shared_data("hippocampus"))), device="cpu")
    cfg = plan.configurations["3d_fullres"]
    assert cfg.spacing == pytest.approx([1.0, 1.0, 1.0])
    med = plan.fingerprint["median_shape"]
    assert all(p >= m for p, m in zip(cfg.patch_size, med))  # the patch covers a whole (median) case
    assert cfg.patch_size == [40, 56, 40] and cfg.batch_size == 8
    assert max(cfg.network.kwargs["features"]) <= 128
    assert plan.num_classes == 3 and plan.normalization[0].scheme == "zscore"


def test_cli_preprocess_writes_cache(tmp_path, capsys):
    from medseg.cli.main import main

    ds = _write_msd(tmp_path / "ds", n=2)
    plan = tmp_path / "plan.json"
    assert main(["plan", str(ds), "-o", str(plan)]) == 0
    cache = tmp_path / "cache"
    assert main(["preprocess", str(ds), "--plan", str(plan), "-c", "3d_fullres", "--cache", str(cache)]) == 0
    out = cache / plan_hash(load_plan(plan)) / "3d_fullres"
    assert sorted(p.name for p in out.glob("*.npy")) == ["case_000.npy", "case_000_seg.npy", "case_001.npy",
                                                          "case_001_seg.npy"]
    capsys.readouterr()
    assert main(["preprocess", str(ds), "--plan", str(plan), "-c", "3d_lowres", "--cache", str(cache)]) == 1
    assert "3d_lowres" in capsys.readouterr().err


def test_make_plan_for_2d_data_has_only_2d_configuration():
    plan = make_plan(_fp(spacing=(0.2, 0.2), shape=(540, 800), dims=2, n=50), device="cpu")
    assert list(plan.configurations) == ["2d"]
    cfg = plan.configurations["2d"]
    assert not cfg.slicewise and len(cfg.patch_size) == 2 and cfg.mirror_axes == [0, 1]
    assert np.prod(cfg.patch_size) * cfg.batch_size <= 2_000_000 and cfg.batch_size >= 2
    assert all(p % d == 0 for p, d in zip(cfg.patch_size, [2**k for k in cfg.pools_per_axis]))
