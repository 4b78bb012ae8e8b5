"""Predictor and `medseg predict` on a tiny run folder trained here on synthetic data (oblique, anisotropic).

The run folder follows docs/architecture.md: plan.json (hand-written, minimal), model.json, fold_K/checkpoint_*.pt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.cli.main import main
from medseg.inference import Predictor
from medseg.inference.batch import discover_cases, parse_shard, shard_cases
from medseg.inference.sliding_window import sliding_window_predict_slices
from medseg.io import Volume, read_volume
from medseg.io.nifti import write_nifti
from medseg.planning import ModelRecord, Plan, write_model_record

PLAN = {
    "version": 1, "dataset": "synthetic", "spatial_dims": 3, "in_channels": 1, "num_classes": 3,
    "labels": {"0": "background", "1": "left", "2": "right"},
    "normalization": [{"scheme": "zscore", "mean": 0.0, "std": 1.0, "clip": None, "use_nonzero_mask": False}],
    "configurations": {
        "3d_fullres": {"spacing": [1.5, 1.5, 1.5], "patch_size": [16, 16, 16], "batch_size": 2,
                       "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2],
                                                              "kernel_sizes": [3, 3], "norm": "instance"}},
                       "mirror_axes": [0, 1, 2], "slicewise": False},
        "2d": {"spacing": [1.5, 1.5, None], "patch_size": [16, 16], "batch_size": 4, "slice_axis": 2,
               "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2], "kernel_sizes": [3, 3]}},
               "mirror_axes": [0, 1], "slicewise": True},
    },
}


def _rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def synthetic_case(seed: int, shape=(28, 24, 14), spacing=(1.1, 0.9, 2.5), oblique: bool = True):
    """(image Volume, label Volume): an ellipsoid split in two classes, in noise, with an oblique affine."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing)
    coords = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij"), -1)
    center = np.asarray(shape) * sp / 2 + rng.uniform(-3, 3, 3)
    radii = rng.uniform(7, 10, 3)
    inside = (((coords - center) / radii) ** 2).sum(-1) < 1
    label = np.where(inside, np.where(coords[..., 0] < center[0], 1, 2), 0).astype(np.uint8)
    image = 1.0 + 2.0 * (label == 1) + 4.0 * (label == 2) + rng.normal(0, 0.4, shape)
    affine = np.eye(4)
    affine[:3, :3] = (_rotation(seed) if oblique else np.eye(3)) * sp
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    return (Volume(image[None].astype(np.float32), affine, 3, {"qform_code": 1, "sform_code": 1}),
            Volume(label[None], affine, 3))


def _train(model_dir: Path, config: str, fold: int, steps: int, ckpt_name: str) -> None:
    from medseg.networks import create_model, model_spec
    from medseg.transforms.preprocess import preprocess_volume

    cfg = PLAN["configurations"][config]
    dims = 2 if cfg["slicewise"] else 3
    torch.manual_seed(fold)
    net = create_model(cfg["network"]["name"], spatial_dims=dims, in_channels=1, out_channels=3,
                       **cfg["network"]["kwargs"])
    if steps:
        cases = [synthetic_case(100 + i) for i in range(3)]
        data = [preprocess_volume(img, PLAN, config, lab) for img, lab in cases]
        opt = torch.optim.Adam(net.parameters(), lr=3e-2)
        rng = np.random.default_rng(fold)
        net.train()
        for _ in range(steps):
            xs, ys = [], []
            for _ in range(2):
                img, seg, _ = data[rng.integers(len(data))]
                pads = [(0, 0)] + [(0, max(0, 16 - s)) for s in img.shape[1:]]
                img, seg = np.pad(img, pads, mode="reflect"), np.pad(seg, pads)
                lo = [rng.integers(0, s - 15) for s in img.shape[1:]]
                sl = (slice(None), *[slice(a, a + 16) for a in lo])
                xs.append(img[sl])
                ys.append(seg[sl][0])
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(np.stack(xs))),
                                                     torch.from_numpy(np.stack(ys)).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    (model_dir / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    torch.save({"network": model_spec(net), "state_dict": net.state_dict(), "epoch": steps},
               model_dir / f"fold_{fold}" / ckpt_name)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 3d_fullres run with two trained folds (fold 1 has only checkpoint_latest.pt)."""
    root = tmp_path_factory.mktemp("run")
    plan = Plan.from_dict(PLAN)
    write_model_record(root, ModelRecord.from_plan(plan, "3d_fullres", plan.configuration("3d_fullres"),
                                                   folds=[0, 1]))
    _train(root, "3d_fullres", 0, 25, "checkpoint_best.pt")
    _train(root, "3d_fullres", 1, 5, "checkpoint_latest.pt")
    return root


def _dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_oblique_anisotropic_nifti_geometry_and_overlap(run_dir, tmp_path):
    image, truth = synthetic_case(7)
    write_nifti(image, tmp_path / "case.nii.gz")
    vol = read_volume(tmp_path / "case.nii.gz")
    pred = Predictor.from_run(run_dir, device="cpu").predict(vol)
    assert pred.array.dtype == np.uint8 and pred.shape == vol.shape
    write_nifti(pred, tmp_path / "mask.nii.gz", dtype=pred.array.dtype)
    # nibabel and SimpleITK agree that the mask lies exactly where the input lies
    np.testing.assert_allclose(nib.load(tmp_path / "mask.nii.gz").affine, nib.load(tmp_path / "case.nii.gz").affine,
                               atol=1e-5)
    a, b = sitk.ReadImage(str(tmp_path / "mask.nii.gz")), sitk.ReadImage(str(tmp_path / "case.nii.gz"))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    for c in (1, 2):
        assert _dice(pred.array[0] == c, truth.array[0] == c) > 0.7, c


def test_fold_ensemble_is_the_mean_of_folds(run_dir):
    image = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 20, 18, 17)).astype(np.float32))
    both = Predictor.from_run(run_dir, device="cpu", tta=False).predict_array(image)
    f0 = Predictor.from_run(run_dir, folds=[0], device="cpu", tta=False).predict_array(image)
    f1 = Predictor.from_run(run_dir, folds=[1], device="cpu", tta=False).predict_array(image)
    np.testing.assert_allclose(both.numpy(), ((f0 + f1) / 2).numpy(), atol=1e-6)
    assert not torch.allclose(f0, f1, atol=1e-3)


@pytest.mark.skipif(not __import__("shutil").which("g++"), reason="torch.compile on a CPU needs a C++ compiler (g++)")
def test_compiled_predictor_equals_eager(run_dir):
    """compile=True compiles each fold's network once, at the first prediction, and changes nothing but speed."""
    from medseg.inference.compiled import CompiledNetwork

    image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 21, 18, 11)).astype(np.float32))
    eager = Predictor.from_run(run_dir, device="cpu", amp="fp32").predict_array(image)
    pred = Predictor.from_run(run_dir, device="cpu", amp="fp32", compile=True)
    assert not any(isinstance(n, CompiledNetwork) for n in pred.networks)  # nothing compiled before a case
    out = pred.predict_array(image)
    assert all(isinstance(n, CompiledNetwork) for n in pred.networks) and len(pred.networks) == 2
    np.testing.assert_allclose(out.numpy(), eager.numpy(), atol=1e-5)


def test_uncertainty_and_probabilities(run_dir):
    image, _ = synthetic_case(8, spacing=(1.5, 1.5, 1.5), oblique=False)
    out = Predictor.from_run(run_dir, device="cpu").predict_full(image, probabilities=True, uncertainty=True)
    p = out.probabilities.array
    assert p.shape == (3, *image.shape) and out.uncertainty.shape == image.shape
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-4)
    expected = -(p * np.log(np.clip(p, 1e-12, None))).sum(0)
    np.testing.assert_allclose(out.uncertainty.array[0], expected, atol=2e-3)
    assert out.uncertainty.array.max() <= np.log(3) + 1e-4
    np.testing.assert_array_equal(out.label.array[0], p.argmax(0))


def test_slicewise_2d_configuration(tmp_path):
    plan = Plan.from_dict(PLAN)
    write_model_record(tmp_path, ModelRecord.from_plan(plan, "2d", plan.configuration("2d"), folds=[0]))
    _train(tmp_path, "2d", 0, 0, "checkpoint_best.pt")
    pred = Predictor.from_run(tmp_path, device="cpu", amp="fp32")  # exact comparison below
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 19, 12, 5)).astype(np.float32))
    out = pred.predict_array(image)
    ref = sliding_window_predict_slices(pred.networks[0], image, slice_axis=2, patch_size=(16, 16),
                                        mirror_axes=(0, 1), activation="softmax")
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-6)
    vol, _ = synthetic_case(3)
    assert pred.predict(vol).same_geometry(vol)


def test_missing_fold_is_explained(run_dir):
    from medseg.errors import InputError

    with pytest.raises(InputError, match=r"fold.*\[5\]"):
        Predictor.from_run(run_dir, folds=[5], device="cpu")


def test_fold_of_the_record_missing_is_refused(run_dir, tmp_path):
    """A model folder with one fold's folder missing does not quietly predict with the others."""
    import shutil

    from medseg.errors import InputError

    shutil.copytree(run_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "fold_1")
    with pytest.raises(InputError, match=r"lists fold\(s\) \[1\].*missing.*--folds 0"):
        Predictor.from_run(tmp_path / "run", device="cpu")
    assert Predictor.from_run(tmp_path / "run", folds=[0], device="cpu").folds == [0]  # knowingly fewer folds


# ------------------------------------------------------------------------------------------------ batch / CLI
def test_discovery_layouts_and_shards(tmp_path):
    for name in ("b_0000.nii.gz", "a_0000.nii.gz", "c_0000.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    assert [c.case_id for c in discover_cases(tmp_path, 1)] == ["a", "b", "c"]
    assert [c.case_id for c in discover_cases(tmp_path, 2)] == ["a_0000", "b_0000", "c_0000"]
    (tmp_path / "a_0001.nii.gz").write_bytes(b"x")
    (tmp_path / "b_0001.nii.gz").write_bytes(b"x")
    (tmp_path / "c_0001.nii.gz").write_bytes(b"x")
    two = discover_cases(tmp_path, 2)
    assert [len(c.images) for c in two] == [2, 2, 2] and two[0].images[1].name == "a_0001.nii.gz"
    s0, s1 = shard_cases(two, parse_shard("0/2")), shard_cases(two, parse_shard("1/2"))
    assert sorted(c.case_id for c in s0 + s1) == ["a", "b", "c"] and not {c.case_id for c in s0} & {
        c.case_id for c in s1}
    from medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="shard"):
        parse_shard("2/2")


def test_batch_with_corrupt_case(run_dir, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate(("good1", "good2")):
        write_nifti(synthetic_case(20 + i)[0], inp / f"{name}_0000.nii.gz")
    (inp / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b not really a gzip stream")
    args = ["predict", "-i", str(inp), "-o", str(out), "-m", str(run_dir), "--device", "cpu", "--no-tta",
            "--uncertainty", "--save-probabilities"]
    assert main(args) == 1
    err = capsys.readouterr().err
    failed_lines = [ln for ln in err.splitlines() if "FAILED" in ln]
    assert len(failed_lines) == 1 and "broken" in failed_lines[0] and "Traceback" not in err
    report = json.loads((out / "predict_report.json").read_text())
    assert report["counts"] == {"written": 2, "skipped": 0, "failed": 1}
    for name in ("good1", "good2"):
        src, mask = nib.load(inp / f"{name}_0000.nii.gz"), nib.load(out / f"{name}.nii.gz")
        np.testing.assert_allclose(mask.affine, src.affine, atol=1e-5)
        assert mask.get_data_dtype() == np.uint8 and (out / f"{name}_uncertainty.nii.gz").exists()
        prob = nib.load(out / f"{name}_probabilities.nii.gz")
        assert prob.shape == (*mask.shape, 3) and np.allclose(prob.affine, src.affine, atol=1e-5)
    assert not (out / "broken.nii.gz").exists()
    assert main(args) == 1  # rerun: good cases skipped, the broken one still reported
    assert json.loads((out / "predict_report.json").read_text())["counts"] == {"written": 0, "skipped": 2,
                                                                                "failed": 1}


def _write_dicom_series(vol: Volume, folder: Path) -> None:
    """A synthetic MR series of ``vol`` (uint16 with rescale), geometry from its RAS affine."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    from medseg.io.volume import LPS_TO_RAS

    folder.mkdir(parents=True)
    lps = LPS_TO_RAS @ vol.affine
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    r, c, _ = (lps[:3, :3] / sp).T
    arr = vol.array[0]
    slope = float(arr.max() - arr.min()) / 4000
    stored = np.round((arr - arr.min()) / slope).astype(np.uint16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(arr.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "Synthetic^Patient", "SYN0001", "MR"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "", "", "20240101", "120000"
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[0]
        ds.PixelSpacing = [float(sp[1]), float(sp[0])]
        ds.SliceThickness = float(sp[2])
        ds.ImageOrientationPatient = [float(v) for v in (*r, *c)]
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, float(arr.min())
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)


def test_dicom_series_nifti_and_dicom_seg(run_dir, tmp_path, caplog):
    image, truth = synthetic_case(9)
    _write_dicom_series(image, tmp_path / "in" / "series_a")
    out = tmp_path / "out"
    base = ["predict", "-i", str(tmp_path / "in"), "-m", str(run_dir), "--device", "cpu", "--folds", "0"]
    with caplog.at_level("DEBUG", logger="medseg"):
        assert main([*base, "-o", str(out)]) == 0
    assert "Synthetic" not in caplog.text and "SYN0001" not in caplog.text
    mask = read_volume(out / "series_a.nii.gz")
    src = read_volume(tmp_path / "in" / "series_a")
    assert mask.same_geometry(src, atol=1e-3)
    ref = sitk.ReadImage(sorted(str(p) for p in (tmp_path / "in" / "series_a").iterdir()))
    m = sitk.ReadImage(str(out / "series_a.nii.gz"))
    np.testing.assert_allclose(m.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(m.GetDirection(), ref.GetDirection(), atol=1e-4)
    np.testing.assert_allclose(m.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    assert _dice(mask.array[0] > 0, truth.array[0] > 0) > 0.7
    assert main([*base, "-o", str(tmp_path / "seg"), "--output-format", "dicom-seg"]) == 0
    from medseg.io.dicom_seg import read_dicom_seg

    seg, labels = read_dicom_seg(tmp_path / "seg" / "series_a.dcm", tmp_path / "in" / "series_a")
    np.testing.assert_array_equal(seg.array[0], mask.array[0])
    assert set(labels.values()) <= {"left", "right"}


def test_dicom_series_rtstruct_output_reads_back_to_the_mask(run_dir, tmp_path):
    from medseg.io.rtstruct import read_rtstruct_masks

    image, _ = synthetic_case(9)
    series = tmp_path / "in" / "series_a"
    _write_dicom_series(image, series)
    base = ["predict", "-i", str(tmp_path / "in"), "-m", str(run_dir), "--device", "cpu", "--folds", "0", "--no-tta"]
    assert main([*base, "-o", str(tmp_path / "nii")]) == 0
    assert main([*base, "-o", str(tmp_path / "rt"), "--output-format", "rtstruct"]) == 0
    mask = read_volume(tmp_path / "nii" / "series_a.nii.gz").array[0]
    rois, source = read_rtstruct_masks(tmp_path / "rt" / "series_a_rtstruct.dcm", series)
    labels = {v: n for v, n in Predictor.from_run(run_dir, device="cpu").labels.items() if int(v) != 0}
    assert list(rois) == [labels[v] for v in sorted(labels)] and source.shape == mask.shape
    for value, name in labels.items():
        assert (mask == value).any(), name  # the prediction has every label, so each ROI is really compared
        assert _dice(rois[name], mask == value) >= 0.98, name
    nifti_only = tmp_path / "nifti_in"
    write_nifti(image, nifti_only / "case.nii.gz")
    assert main(["predict", "-i", str(nifti_only), *base[3:], "-o", str(tmp_path / "rt2"), "--output-format",
                 "rtstruct"]) == 1  # a NIfTI input has no series to reference: that case fails, reported


def wait_for_first_output(proc: subprocess.Popen, out: Path, prefix: str, timeout: float = 120) -> None:
    """Wait until ``proc`` has written a file named ``prefix...`` into ``out`` (or exited, or ``timeout`` s)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and any(p.name.startswith(prefix) for p in out.iterdir()):
            return
        time.sleep(0.01)


def test_kill_9_leaves_no_partial_file_and_rerun_completes(run_dir, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    n = 6
    for i in range(n):
        write_nifti(synthetic_case(30 + i, shape=(36, 32, 16))[0], inp / f"case{i}.nii.gz")
    cmd = [sys.executable, "-m", "medseg.cli.main", "predict", "-i", str(inp), "-o", str(out), "-m", str(run_dir),
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for_first_output(proc, out, "case")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p for p in out.glob("case*.nii.gz"))
    assert len(done) < n, "the run finished before it could be killed"
    for p in done:  # every final-named file is complete
        assert nib.load(p).get_fdata().shape == (36, 32, 16)
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((out / "predict_report.json").read_text())
    assert report["counts"] == {"written": n - len(done), "skipped": len(done), "failed": 0}
    assert sorted(p.name for p in out.iterdir()) == sorted([f"case{i}.nii.gz" for i in range(n)]
                                                           + ["predict_report.json"])


@pytest.mark.shared_data
def test_real_dicom_series_mask_keeps_geometry(run_dir, tmp_path, shared_data):
    """A real DICOM series (TCIA hippocampus crop): NIfTI mask and DICOM-SEG on the series' exact grid."""
    series = shared_data("dicom", "tcia_pgbm003", "11_HCropVolume")
    base = ["predict", "-i", str(series), "-m", str(run_dir), "--device", "cpu", "--folds", "0", "--no-tta"]
    assert main([*base, "-o", str(tmp_path / "nii")]) == 0
    mask = read_volume(tmp_path / "nii" / "11_HCropVolume.nii.gz")
    assert mask.same_geometry(read_volume(series), atol=1e-3)
    ref = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    m = sitk.ReadImage(str(tmp_path / "nii" / "11_HCropVolume.nii.gz"))
    assert m.GetSize() == ref.GetSize()
    np.testing.assert_allclose(m.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(m.GetDirection(), ref.GetDirection(), atol=1e-4)


@pytest.mark.shared_data
def test_real_dicom_series_dicom_seg(run_dir, tmp_path, shared_data):
    series = shared_data("dicom", "tcia_pgbm003", "11_HCropVolume")
    args = ["predict", "-i", str(series), "-m", str(run_dir), "--device", "cpu", "--folds", "0", "--no-tta",
            "-o", str(tmp_path / "seg"), "--output-format", "dicom-seg"]
    assert main(args) == 0, json.loads((tmp_path / "seg" / "predict_report.json").read_text())["cases"]
    from medseg.io import read_volume
    from medseg.io.dicom_seg import read_dicom_seg

    seg, _ = read_dicom_seg(tmp_path / "seg" / "11_HCropVolume.dcm")
    assert seg.same_geometry(read_volume(series), atol=1e-3)  # the SEG lies on the source series' grid


def test_bare_fold_folder_without_model_json(run_dir, tmp_path):
    """A first-release folder from `medseg train` for one fold (no model.json): migrated in memory, the
    configuration taken from the checkpoint."""
    from medseg.errors import InputError

    ckpt = torch.load(run_dir / "fold_0" / "checkpoint_best.pt", weights_only=True)
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    (tmp_path / "fold_0").mkdir()
    torch.save(ckpt, tmp_path / "fold_0" / "checkpoint_best.pt")
    with pytest.raises(InputError, match="configuration"):
        Predictor.from_run(tmp_path, device="cpu")
    torch.save({**ckpt, "configuration": "3d_fullres"}, tmp_path / "fold_0" / "checkpoint_best.pt")
    image = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 17, 16, 18)).astype(np.float32))
    got = Predictor.from_run(tmp_path, device="cpu", tta=False).predict_array(image)
    ref = Predictor.from_run(run_dir, folds=[0], device="cpu", tta=False).predict_array(image)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-6)


def test_chunked_argmax_and_entropy_equal_direct(monkeypatch):
    import medseg.inference.predictor as P

    orig = P._chunks
    monkeypatch.setattr(P, "_chunks", lambda n, per: orig(n, per, budget=per * 3))  # 3 slices per chunk
    prob = torch.softmax(torch.randn(4, 10, 6, 5), 0)
    np.testing.assert_array_equal(P.argmax_label(prob)[0].numpy(), prob.argmax(0).numpy())
    np.testing.assert_allclose(P.entropy(prob)[0].numpy(), -(prob * prob.log()).sum(0).numpy(), atol=1e-6)


def test_shards_split_a_folder_without_coordination(run_dir, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_nifti(synthetic_case(40 + i)[0], inp / f"c{i}.nii.gz")
    base = ["predict", "-i", str(inp), "-o", str(out), "-m", str(run_dir), "--device", "cpu", "--no-tta"]
    assert main([*base, "--shard", "1/2"]) == 0
    assert sorted(p.name for p in out.glob("c*.nii.gz")) == ["c1.nii.gz"]
    assert main([*base, "--shard", "0/2"]) == 0
    assert sorted(p.name for p in out.glob("c*.nii.gz")) == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"]
    r0 = json.loads((out / "predict_report.shard-0-of-2.json").read_text())
    r1 = json.loads((out / "predict_report.shard-1-of-2.json").read_text())
    assert r0["counts"]["written"] == 2 and r1["counts"]["written"] == 1
    # the shards' reports merge into one report, without -i/-m
    assert main(["predict", "--merge-reports", str(out)]) == 0
    merged = json.loads((out / "predict_report.json").read_text())
    assert merged["counts"] == {"written": 3, "skipped": 0, "failed": 0} and merged["shards"] == 2
    assert [c["case_id"] for c in merged["cases"]] == ["c0", "c1", "c2"]
    assert merged["input_counts"] == {"predicted": 3, "skipped": 0, "failed": 0}
    assert merged["shard_reports"] == ["predict_report.shard-0-of-2.json", "predict_report.shard-1-of-2.json"]
    assert not [p for p in out.iterdir() if p.name.startswith(".medseg-tmp-")]


def test_merge_reports_refuses_incomplete_or_mixed_shards(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["predict", "--merge-reports", str(out)]) == 1
    assert "holds no shard reports" in capsys.readouterr().err
    report = {"version": 1, "model_dir": "m", "input": "i", "counts": {"written": 1, "skipped": 0, "failed": 0},
              "cases": [{"case_id": "a", "status": "written"}]}
    (out / "predict_report.shard-0-of-3.json").write_text(json.dumps(report))
    (out / "predict_report.shard-2-of-3.json").write_text(json.dumps({**report, "cases": [{"case_id": "b"}]}))
    assert main(["predict", "--merge-reports", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "lacks the report of shard(s) [1] of 3" in err and len(err.splitlines()) == 1
    (out / "predict_report.shard-1-of-3.json").write_text(json.dumps({**report, "cases": [{"case_id": "c"}]}))
    (out / "predict_report.shard-0-of-2.json").write_text(json.dumps(report))
    assert main(["predict", "--merge-reports", str(out)]) == 1
    assert "several shard counts" in capsys.readouterr().err
    (out / "predict_report.shard-0-of-2.json").unlink()
    (out / "predict_report.shard-1-of-3.json").write_text(json.dumps({**report, "model_dir": "other"}))
    assert main(["predict", "--merge-reports", str(out)]) == 1
    assert "another run" in capsys.readouterr().err
    (out / "predict_report.shard-1-of-3.json").write_text(json.dumps({**report, "cases": [{"case_id": "c"}]}))
    assert main(["predict", "--merge-reports", str(out)]) == 0
    merged = json.loads((out / "predict_report.json").read_text())
    assert [c["case_id"] for c in merged["cases"]] == ["a", "b", "c"] and merged["counts"]["written"] == 3
    assert main(["predict", "-o", str(out)]) == 1  # without --merge-reports, -i and -m are required
    assert "-i -m" in capsys.readouterr().err


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, (3, 4)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (0, 8)),
    ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"}, (7, 8)),
    ({"SLURM_ARRAY_TASK_ID": "10", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "5",
      "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),
    ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),
    ({"RANK": "0", "WORLD_SIZE": "1"}, None),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "0", "WORLD_SIZE": "2"}, (2, 3)),
])
def test_shard_auto_from_slurm_or_torchrun(env, expected):
    from medseg.inference.discovery import resolve_shard

    shard, source = resolve_shard("auto", env)
    assert shard == expected, source
    assert resolve_shard("1/4", env)[0] == (1, 4) and resolve_shard(None, env) == (None, "none")


@pytest.mark.parametrize("env", [
    {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"},  # 1,3,7 list
    {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"},
    {"SLURM_ARRAY_TASK_ID": "2"},
    {"RANK": "2", "WORLD_SIZE": "2"},
])
def test_shard_auto_refuses_what_names_no_shard(env):
    from medseg.errors import ConfigError
    from medseg.inference.discovery import resolve_shard

    with pytest.raises(ConfigError, match="--shard auto|SLURM_ARRAY_TASK_ID"):
        resolve_shard("auto", env)


def test_shard_auto_cli_records_the_resolved_shard(run_dir, tmp_path, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_nifti(synthetic_case(40 + i)[0], inp / f"c{i}.nii.gz")
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")  # --array=1-2: the second task is shard 1 of 2
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    args = ["predict", "-i", str(inp), "-o", str(out), "-m", str(run_dir), "--device", "cpu", "--no-tta",
            "--shard", "auto"]
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("c*.nii.gz")) == ["c1.nii.gz"]
    report = json.loads((out / "predict_report.shard-1-of-2.json").read_text())
    assert report["shard"] == "1/2" and "SLURM_ARRAY_TASK_ID=2" in report["shard_source"]
