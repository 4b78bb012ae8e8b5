"""`medseg report`: HTML report of prediction folders and run folders, PNG overlay, headless Chromium check."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medseg.cli.main import main
from medseg.errors import InputError
from medseg.evaluation.attention import has_attention_gates
from medseg.evaluation.figures import to_ras
from medseg.evaluation.report import build_report, worst_first
from medseg.io import Volume, write_volume

AFFINE = np.array([[-1.2, 0.0, 0.0, 20.0], [0.0, 0.0, 3.0, -5.0], [0.0, 0.9, 0.0, 7.0], [0, 0, 0, 1]])
CHROMIUM = Path("/usr/bin/chromium")


def _case(rng, shape=(24, 20, 12), quality=0):
    """(image, reference, prediction) with the prediction shrunk by ``quality`` voxels."""
    ref = np.zeros(shape, np.uint8)
    ref[6:18, 5:15, 3:9] = 1
    ref[12:18, 5:15, 3:9] = 2
    pred = ref.copy()
    if quality:
        pred[:, :, : 3 + quality] = 0
    image = rng.normal(100, 10, shape).astype(np.float32) + 50 * (ref > 0)
    return image, ref, pred


def _write_cases(root: Path, n: int, rng, fold_dirs=None):
    ids = [f"case_{i:02d}" for i in range(n)]
    for i, cid in enumerate(ids):
        image, ref, pred = _case(rng, quality=i % 4)
        write_volume(Volume(image[None], AFFINE), root / "images" / f"{cid}_0000.nii.gz")
        write_volume(Volume(ref[None], AFFINE), root / "labels" / f"{cid}.nii.gz")
        pdir = root / "pred" if fold_dirs is None else fold_dirs[i % len(fold_dirs)]
        write_volume(Volume(pred[None], AFFINE), pdir / f"{cid}.nii.gz")
    return ids


def _pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html_text)]


def test_prediction_folder_report_is_self_contained_and_worst_first(tmp_path):
    rng = np.random.default_rng(0)
    ids = _write_cases(tmp_path, 5, rng)
    out = build_report(tmp_path / "pred", ref_dir=tmp_path / "labels", image_dir=tmp_path / "images",
                       out_path=tmp_path / "r" / "report.html", max_cases=3, n_boot=100)
    text = out.read_text()
    assert "<script" not in text and "src='http" not in text and 'src="http' not in text
    pngs = _pngs(text)
    assert len(pngs) == 1 + 3 and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)  # distributions + panels
    panel_ids = re.findall(r"id='case-([^']+)'", text)
    assert len(panel_ids) == 3 and set(panel_ids) <= set(ids)
    # case_03 (quality 3) is the worst, then case_02
    assert panel_ids[:2] == ["case_03", "case_02"]
    assert "Showing the 3 worst of 5 cases" in text and "Summary" in text


def test_worst_first_puts_undefined_last():
    per_case = {"a": {1: {"dice": 0.9}}, "b": {1: {"dice": float("nan")}}, "c": {1: {"dice": 0.2}}}
    assert worst_first(per_case) == ["c", "a", "b"]


def test_run_folder_report_has_curves_and_says_no_attention(tmp_path):
    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    folds = [run / "fold_0" / "validation", run / "fold_1" / "validation"]
    _write_cases(tmp_path, 4, rng, fold_dirs=folds)
    (run / "model.json").write_text(json.dumps({"network": {"name": "unet", "kwargs": {}}, "folds": [0, 1],
                                                "labels": {"0": "background", "1": "front", "2": "back"}}))
    for k in (0, 1):
        lines = ["epoch,train_loss,val_dice,lr"] + [f"{e},{1.0 / (e + 1):.4f},{0.5 + 0.05 * e:.3f},{0.01 * 0.9 ** e}"
                                                    for e in range(6)]
        (run / f"fold_{k}" / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert main(["report", str(run), "--ref", str(tmp_path / "labels"), "--images", str(tmp_path / "images"),
                 "--max-cases", "2"]) == 0
    text = (run / "report.html").read_text()
    assert "Training curves" in text and "front" in text and "(fold_1)" in text
    assert "has no attention gates" in text
    assert len(_pngs(text)) == 1 + 1 + 2  # distributions, curves, 2 panels


def test_prediction_folder_without_ref_is_a_clear_error(tmp_path, capsys):
    _write_cases(tmp_path, 1, np.random.default_rng(2))
    with pytest.raises(InputError, match="--ref"):
        build_report(tmp_path / "pred")
    assert main(["report", str(tmp_path / "pred")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_png_overlay_of_one_case(tmp_path):
    _write_cases(tmp_path, 1, np.random.default_rng(3))
    out = tmp_path / "one.png"
    assert main(["report", str(tmp_path / "pred" / "case_00.nii.gz"), "--ref", str(tmp_path / "labels" /
                 "case_00.nii.gz"), "--images", str(tmp_path / "images" / "case_00_0000.nii.gz"), "-o",
                 str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 300


def test_to_ras_reorders_axes_and_spacing():
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    out, sp = to_ras(arr, AFFINE)
    # AFFINE: axis0 -> -x (L, 1.2 mm), axis1 -> +z (S, 0.9 mm), axis2 -> +y (A, 3 mm)
    assert out.shape == (2, 4, 3) and sp == pytest.approx((1.2, 3.0, 0.9))
    assert out[0, 0, 0] == arr[1, 0, 0]  # x flipped


def test_has_attention_gates():
    assert has_attention_gates({"name": "attention_unet", "kwargs": {}})
    assert has_attention_gates({"name": "unet", "kwargs": {"attention": True}})
    assert not has_attention_gates({"name": "unet", "kwargs": {"attention": False}})


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless screenshot needs /usr/bin/chromium (apt-get install "
                    "chromium); not installed here")
def test_report_renders_in_headless_chromium(tmp_path):
    _write_cases(tmp_path, 3, np.random.default_rng(4))
    out = build_report(tmp_path / "pred", ref_dir=tmp_path / "labels", image_dir=tmp_path / "images",
                       out_path=tmp_path / "report.html", n_boot=50)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), *flags, "--window-size=1200,1600", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (1600, 1200)
    # the panels are there: many distinct colours (not a blank or error page)
    assert len(np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert dom.count("<figure class=\"case\"") == 3 and "data:image/png;base64," in dom


def test_run_with_attention_unet_shows_gate_maps(tmp_path):
    """A (untrained) Attention U-Net run folder: the report embeds the gate maps of the chosen case."""
    torch = pytest.importorskip("torch")
    from medseg import networks
    spec = {"name": "attention_unet", "kwargs": {"features": [4, 8], "strides": [1, 2], "kernel_sizes": [3, 3]}}
    plan = {"version": 1, "dataset": "synthetic", "spatial_dims": 3, "in_channels": 1, "num_classes": 3,
            "labels": {"0": "background", "1": "front", "2": "back"},
            "normalization": [{"scheme": "zscore", "mean": 100.0, "std": 10.0, "clip": None,
                               "use_nonzero_mask": False}],
            "configurations": {"3d_fullres": {"spacing": [1.5, 1.5, 1.5], "patch_size": [16, 16, 16],
                                              "batch_size": 2, "network": spec, "mirror_axes": [],
                                              "slicewise": False}}}
    run = tmp_path / "run"
    _write_cases(tmp_path, 2, np.random.default_rng(5), fold_dirs=[run / "fold_0" / "validation"])
    (run / "plan.json").write_text(json.dumps(plan))
    (run / "model.json").write_text(json.dumps({"configuration": "3d_fullres", "folds": [0], "num_classes": 3,
                                                "network": spec, "labels": plan["labels"]}))
    torch.manual_seed(0)
    net = networks.create_model("attention_unet", spatial_dims=3, in_channels=1, out_channels=3, **spec["kwargs"])
    torch.save({"network": networks.model_spec(net), "state_dict": net.state_dict(), "epoch": 0},
               run / "fold_0" / "checkpoint_best.pt")
    out = build_report(run, ref_dir=tmp_path / "labels", image_dir=tmp_path / "images", attention_case="case_01",
                       n_boot=20)
    text = out.read_text()
    section = text[text.index("id='attention-gates'"):]
    pngs = _pngs(section)
    assert len(pngs) == 1 and "Gate coefficients (0 to 1) of 1 gates on a 16x16x16 patch" in section
    Path(tmp_path / "gates.png").write_bytes(pngs[0])
    import matplotlib.image as mpimg

    assert mpimg.imread(tmp_path / "gates.png").shape[1] >= 2 * 200  # input + one gate panel


def test_2d_png_overlay_and_evaluation(tmp_path):
    """2D label maps (e.g. ultrasound/EM slices): one panel row, areas in mm², same CLI."""
    rng = np.random.default_rng(6)
    aff = np.diag([0.5, 0.25, 1.0, 1.0])
    ref = np.zeros((40, 60), np.uint8)
    ref[10:30, 20:45] = 1
    pred = np.roll(ref, 3, axis=1)
    image = rng.normal(0, 1, ref.shape).astype(np.float32) + 3 * ref
    for folder, arr in (("pred", pred), ("labels", ref), ("images", image)):
        write_volume(Volume(arr[None], aff, 2), tmp_path / folder / "slice_1.nii.gz")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "labels"), "-o",
                 str(tmp_path / "ev"), "--bootstrap", "20"]) == 0
    header = (tmp_path / "ev" / "per_case.csv").read_text().splitlines()[0]
    assert "area_ref_mm2" in header and "volume_ref_ml" not in header
    out = build_report(tmp_path / "pred", ref_dir=tmp_path / "labels", image_dir=tmp_path / "images",
                       out_path=tmp_path / "r.html", n_boot=20)
    assert len(_pngs(out.read_text())) == 2
