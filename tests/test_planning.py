"""Planning: topology rules, target spacing, plan sizing for CPU and GPU, plan files, fingerprint, CLI."""

from __future__ import annotations

import json
from pathlib import Path

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
    small = make_plan(fp, device="cuda", memory_gb=4, memory_model="analytic").configurations["3d_fullres"]
    big = make_plan(fp, device="cuda", memory_gb=24, memory_model="analytic").configurations["3d_fullres"]
    assert np.prod(small.patch_size) * small.batch_size < np.prod(big.patch_size) * big.batch_size
    for cfg, gb in ((small, 4), (big, 24)):
        assert cfg.estimated_memory_gb <= gb
        assert cfg.network.kwargs["features"][0] == 32 and max(cfg.network.kwargs["features"]) <= 320
    norm = make_plan(fp, device="cuda", memory_model="analytic").normalization[0]
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
    changed_frame = load_plan(path)
    changed_frame.configurations["3d_fullres"].frame = "acquisition"
    assert plan_hash(changed_frame) != h  # preprocessing depends on the frame
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**plan.to_dict(), "schema_version": 99}))
    with pytest.raises(InputError, match="version"):
        load_plan(bad)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_plan(tmp_path / "junk.json")


def _write_msd(root, n=4, modality="MRI", swap_sides=False, values=(1, 2), ct=False, declare=True):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    training = []
    for i in range(n):
        img = np.full((20, 24, 10), -1000.0 if ct else 0.0, np.float32)
        img[2:18, 3:21, 1:9] = rng.normal(40 if ct else 100, 10, (16, 18, 8))
        lab = np.zeros((20, 24, 10), np.int16)
        first, second = (values[1], values[0]) if swap_sides and i % 2 else values
        lab[6:12, 8:14, 3:7] = first  # the first label below the second along axis 0, centred on axes 1 and 2
        lab[12:15, 8:14, 3:7] = second
        img[lab == first] += 50
        aff = np.diag([0.9, 0.9, 3.0, 1.0])
        nib.save(nib.Nifti1Image(img, aff), root / "imagesTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), root / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    meta = {"name": "Tiny", "labels": {"0": "background", str(values[0]): "a", str(values[1]): "b"},
            "numTraining": n, "training": training}
    if modality is not None:
        meta["modality"] = {"0": modality}
    if not declare:
        del meta["labels"]
    (root / "dataset.json").write_text(json.dumps(meta))
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
    assert "3d_lowres" not in plan.configurations
    assert plan.configurations["3d_fullres"].mirror_axes == [0]  # anterior/posterior fixed along axes 1 and 2
    assert "NOT mirrored" in plan.explain["mirror_axes"]


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


def _ct_fp(**kw):
    fp = _fp(**kw)
    fp["image_ranges"] = [[[-1024.0, 1200.0]] * fp["num_cases"]]
    return fp


@pytest.mark.parametrize("how", ["name", "dicom", "intensities", "mr_name"])
def test_ct_detected_with_and_without_the_modality_name(how):
    fp = _ct_fp(modality="CT" if how == "name" else "T2" if how == "mr_name" else "unknown", n=20)
    if how == "dicom":
        fp["dicom_modalities"] = ["CT"] * 20
        fp["image_ranges"] = [[[0.0, 3000.0]] * 20]  # not HU-like: only the tag can say CT
    plan = make_plan(fp)
    norm = plan.normalization[0]
    if how == "mr_name":  # the name wins over HU-like intensities
        assert norm.scheme == "zscore" and "'T2'" in plan.explain["normalization[0]"]
        return
    assert norm.scheme == "ct" and norm.clip == [-900.0, 1500.0] and (norm.mean, norm.std) == (40.0, 300.0)
    assert {"name": "dataset.json", "dicom": "DICOM Modality", "intensities": "HU-like"}[how] in \
        plan.explain["normalization[0]"]
    fp["image_ranges"] = [[[0.0, 800.0]] * 20]
    if how == "intensities":  # the same unnamed data with MR-like intensities is z-scored
        assert make_plan(fp).normalization[0].scheme == "zscore"


def test_ct_detected_from_intensities_of_real_files(tmp_path):
    from medseg.data.manifest import load_manifest

    fp = fingerprint(load_manifest(_write_msd(tmp_path / "ds", ct=True, modality=None)))
    assert fp["modalities"] == ["unknown"]
    plan = make_plan(fp)
    assert plan.normalization[0].scheme == "ct" and "HU-like" in plan.explain["normalization[0]"]
    mr = make_plan(fingerprint(load_manifest(_write_msd(tmp_path / "mr", modality=None))))
    assert mr.normalization[0].scheme != "ct"


def test_each_channel_normalised_separately_and_brain_background_nonzero():
    fp = _fp(modality="CT")
    fp["channels"] = 3
    fp["modalities"] = ["CT", "FLAIR", "T1"]
    fp["intensity"] = [fp["intensity"][0], {**fp["intensity"][0], "percentile_00_5": 0.0},
                       {**fp["intensity"][0], "mean": 7.0}]
    fp["channel_crop_fraction"] = [1.0, 0.35, 0.9]  # FLAIR: skull-stripped brain on a zero background
    plan = make_plan(fp)
    assert [n.scheme for n in plan.normalization] == ["ct", "zscore_nonzero", "zscore"]
    assert plan.normalization[0].clip == [-900.0, 1500.0]
    assert "35%" in plan.explain["normalization[1]"] and "FLAIR" in plan.explain["normalization[1]"]
    assert all(f"normalization[{c}]" in plan.explain for c in range(3))


def test_brain_like_files_get_zscore_nonzero(tmp_path):
    from medseg.data.manifest import load_manifest

    root = _write_msd(tmp_path / "ds", n=3)
    rng = np.random.default_rng(0)
    for f in (root / "imagesTr").glob("*.nii.gz"):  # a small "brain" on a zero background
        brain = np.zeros((20, 24, 10), np.float32)
        brain[5:15, 6:18, 2:8] = rng.normal(100, 10, (10, 12, 6))  # its nonzero box: 15% of the image
        nib.save(nib.Nifti1Image(brain, nib.load(f).affine), f)
    plan = make_plan(fingerprint(load_manifest(root)))
    assert plan.normalization[0].scheme == "zscore_nonzero" and "15%" in plan.explain["normalization[0]"]


def test_lowres_for_big_volumes_and_none_for_small():
    big = make_plan(_fp(shape=(512, 512, 300), n=20), device="cuda", memory_gb=11, memory_model="analytic")
    assert "3d_lowres" in big.configurations
    full, low = big.configurations["3d_fullres"], big.configurations["3d_lowres"]
    assert np.prod(full.patch_size) < np.prod(full.median_shape) / 8
    assert all(lo > fu for lo, fu in zip(low.spacing, full.spacing))
    assert np.prod(low.patch_size) >= np.prod(low.median_shape) / 8 * 0.9
    assert "planned" in big.explain["3d_lowres"]
    cascade = big.configurations["3d_cascade_fullres"]  # nnU-Net's cascade: 3d_fullres plus the low-res prediction
    assert cascade.previous_stage == "3d_lowres" and "planned with 3d_lowres" in big.explain["3d_cascade_fullres"]
    assert (cascade.spacing, cascade.patch_size, cascade.network) == (full.spacing, full.patch_size, full.network)
    assert cascade.network_in_channels(1, big.num_classes) == big.num_classes  # image + K-1 one-hot channels
    assert big.data_configuration("3d_cascade_fullres") == "3d_fullres"  # trains on 3d_fullres's cache
    assert list(big.configurations).index("3d_cascade_fullres") > list(big.configurations).index("3d_lowres")
    again = type(big).from_dict(json.loads(json.dumps(big.to_dict())))
    assert again.configurations["3d_cascade_fullres"].previous_stage == "3d_lowres"
    assert "previous_stage" not in big.to_dict()["configurations"]["3d_fullres"]  # plans without one unchanged
    cpu = make_plan(_fp(shape=(512, 512, 300), n=20))
    assert "3d_lowres" in cpu.configurations
    small = make_plan(_fp())
    assert "3d_lowres" not in small.configurations and "not planned" in small.explain["3d_lowres"]


@pytest.mark.parametrize("swap", [False, True])
def test_mirror_axes_from_label_sides(tmp_path, swap):
    from medseg.data.manifest import load_manifest

    fp = fingerprint(load_manifest(_write_msd(tmp_path / "ds", n=6, swap_sides=swap)))
    plan = make_plan(fp)
    full = plan.configurations["3d_fullres"]
    if swap:  # the two labels swap sides from case to case: flipping axis 0 is seen in the data
        assert full.mirror_axes == [0, 1, 2]
    else:
        assert full.mirror_axes == [1, 2]
        assert "axis 0 NOT mirrored" in plan.explain["mirror_axes"] and "'a'" in plan.explain["mirror_axes"]
    two = plan.configurations["2d"]  # slices across axis 2: patch axes 0, 1 are data axes 0, 1
    assert two.mirror_axes == ([0, 1] if swap else [1])


@pytest.mark.parametrize("declare", [True, False])
def test_non_consecutive_label_values(tmp_path, declare):
    from medseg.data.manifest import load_manifest
    from medseg.networks import create_model

    root = _write_msd(tmp_path / "ds", n=3, values=(200, 500), declare=declare)
    lab = root / "labelsTr" / "case_000.nii.gz"
    arr = np.asarray(nib.load(lab).dataobj).copy()
    arr[1:3, 1:3, 1:3] = 600
    nib.save(nib.Nifti1Image(arr, nib.load(lab).affine), lab)
    if declare:
        meta = json.loads((root / "dataset.json").read_text())
        meta["labels"]["600"] = "c"
        (root / "dataset.json").write_text(json.dumps(meta))
    fp = fingerprint(load_manifest(root))
    plan = make_plan(fp)
    assert plan.label_values == [0, 200, 500, 600] and plan.num_classes == 4
    assert plan.labels == ({0: "background", 1: "a", 2: "b", 3: "c"} if declare else
                           {0: "background", 1: "label_200", 2: "label_500", 3: "label_600"})
    assert len(fp["class_voxels"]) == 4 and fp["class_voxels"][3] == 8
    spec = plan.configurations["3d_fullres"].network
    net = create_model(spec.name, spatial_dims=3, in_channels=1, out_channels=plan.num_classes,
                       **{**spec.kwargs, "deep_supervision": False})
    import torch

    with torch.no_grad():
        out = net(torch.zeros(1, 1, *plan.configurations["3d_fullres"].patch_size))
    assert out.shape[1] == 4  # one output per label, not 601
    assert load_plan_roundtrip(plan, tmp_path).label_values == [0, 200, 500, 600]


def load_plan_roundtrip(plan, tmp_path):
    save_plan(plan, tmp_path / "p.json")
    return load_plan(tmp_path / "p.json")


def test_undeclared_label_value_is_refused(tmp_path):
    from medseg.data.manifest import load_manifest

    root = _write_msd(tmp_path / "ds", n=2)
    lab = root / "labelsTr" / "case_001.nii.gz"
    arr = np.asarray(nib.load(lab).dataobj).copy()
    arr[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(arr, nib.load(lab).affine), lab)
    with pytest.raises(InputError, match=r"case_001.*\[7\]"):
        fingerprint(load_manifest(root))


def _rotation(axis, deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def test_anisotropic_cases_in_different_orientations_keep_the_coarse_spacing(tmp_path):
    """The same 1x1x6 mm stack acquired axially, sagittally and coronally (each slightly oblique)."""
    from medseg.data.manifest import load_manifest

    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    stack = rng.normal(100, 10, (48, 40, 8)).astype(np.float32)
    lab = np.zeros((48, 40, 8), np.int16)
    lab[10:30, 10:30, 2:6] = 1
    # voxel axis 2 (6 mm) along world z, x, y; the fine axes fill the others
    layouts = [(0, 1, 2), (1, 2, 0), (2, 0, 1)]
    training = []
    for i, world in enumerate(layouts):
        aff = np.eye(4)
        cols = np.zeros((3, 3))
        for v, w in enumerate(world):
            cols[w, v] = [1.0, 1.0, 6.0][v]
        aff[:3, :3] = _rotation(world[2], 8.0 + i) @ cols
        for sub, arr in (("imagesTr", stack), ("labelsTr", lab)):
            nib.save(nib.Nifti1Image(arr, aff), root / sub / f"case_{i}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Oblique", "modality": {"0": "MRI"},
                                                   "labels": {"0": "background", "1": "x"}, "training": training}))
    fp = fingerprint(load_manifest(root))
    coarse = [int(np.argmax(s)) for s in fp["spacings"]]
    assert len(set(coarse)) == 3  # after RAS reorientation each case is coarse along another axis
    plan = make_plan(fp)
    full = plan.configurations["3d_fullres"]
    assert full.frame == "acquisition" and "acquisition" in plan.explain["frame"]
    assert full.spacing == pytest.approx([1.0, 1.0, 6.0], abs=0.05)  # not resampled to 1 mm
    assert full.network.kwargs["kernel_sizes"][0] == [3, 3, 1]
    assert plan.configurations["2d"].slice_axis == 2
    # the same physical stack stored in three voxel orders: reorientation alone lines them up, the RAS frame stays
    for i, order in enumerate([(0, 1, 2), (2, 0, 1), (1, 2, 0)]):
        aff = np.eye(4)
        aff[:3, :3] = _rotation(2, 8.0) @ np.diag([1.0, 1.0, 6.0])[:, list(order)]
        for sub, arr in (("imagesTr", stack), ("labelsTr", lab)):
            nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.transpose(order)), aff), root / sub / f"case_{i}.nii.gz")
    same = make_plan(fingerprint(load_manifest(root)))
    assert same.configurations["3d_fullres"].frame == "ras" and "axis 2" in same.explain["frame"]
    assert same.configurations["3d_fullres"].spacing == pytest.approx([1.0, 1.0, 6.0], abs=0.05)


def test_gpu_plan_sizes_batch_from_the_step_estimator(monkeypatch):
    import torch

    import medseg.networks.memory as memory

    calls = []

    def fake_step(name, kwargs, spatial_dims, in_channels, out_channels, patch_size, batch_size, dtype, **kw):
        calls.append((list(patch_size), batch_size, in_channels, out_channels, dtype))
        return int(0.1 * 1024**3 + batch_size * np.prod(patch_size) * 2000)  # 0.1 GB fixed + 2 kB per voxel

    monkeypatch.setattr(memory, "estimate_memory", fake_step)
    fp = _fp(spacing=(1.0, 1.0), shape=(96, 96), dims=2, n=40_000)  # many cases: the 5% cap does not bind
    plan = make_plan(fp, device="cuda", memory_gb=2.0, memory_model="step")
    cfg = plan.configurations["2d"]
    assert calls and all(c[2:] == (1, 3, torch.bfloat16) for c in calls)
    budget = 2.0 * 0.85 * 1024**3
    assert cfg.batch_size == int((budget - 0.1 * 1024**3) // (np.prod(cfg.patch_size) * 2000))
    assert cfg.estimated_memory_gb <= 2.0 * 0.85
    assert "step-memory estimator" in plan.explain["2d.patch"]
    analytic = make_plan(fp, device="cuda", memory_gb=2.0, memory_model="analytic").configurations["2d"]
    assert analytic.batch_size != cfg.batch_size
    default = make_plan(_fp(), device="cuda", memory_model="analytic")
    if not torch.cuda.is_available():
        assert default.memory_gb == 11.0 and "default" in default.explain["memory"]
    else:
        assert "measured" in default.explain["memory"]


def test_cli_plan_explain_and_json(tmp_path, capsys):
    from medseg.cli.main import main

    ds = _write_msd(tmp_path / "ds")
    out = tmp_path / "plan.json"
    assert main(["plan", str(ds), "-o", str(out), "--explain"]) == 0
    text = capsys.readouterr().out
    for key in ("spacing", "normalization[0]", "3d_fullres.patch", "3d_fullres.batch", "3d_fullres.topology",
                "mirror_axes", "configurations"):
        assert key in text
    assert main(["plan", str(ds), "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [n["scheme"] for n in data["normalization"]] == ["zscore_nonzero"]  # the 16x18x8 box of 20x24x10
    assert data["explain"]["mirror_axes"] and "3d_fullres" in captured.err


def test_dicom_modality_tag_reaches_the_fingerprint():
    import pydicom

    from medseg.planning.fingerprint import case_fingerprint

    ct5n = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    assert case_fingerprint([ct5n], None)["dicom_modality"] == "CT"


def test_placeholder_channel_name_is_no_modality():
    fp = _ct_fp(modality="channel_0", n=20)  # what a plain images/labels folder without dataset.json gives
    assert make_plan(fp).normalization[0].scheme == "ct"
