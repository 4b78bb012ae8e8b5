"""Model packages, export and runtimes (medseg.deploy) on a small run folder built here from demo data.

The run folder is written by hand in the layout `medseg crossval` writes (plan.json, model.json, splits.json,
config.yaml with a `card:` block, crossval_summary.json, environment.json, fold_K/checkpoint_best.pt with
optimiser state), with two folds trained for a few dozen steps, so these tests take seconds, not a crossval.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install medseg[onnx]) is not installed")

from medseg.cli.main import main  # noqa: E402
from medseg.errors import ConfigError, InputError  # noqa: E402

PLAN = {
    "version": 1, "dataset": "MedsegDemo", "spatial_dims": 3, "in_channels": 1, "num_classes": 3,
    "labels": {"0": "background", "1": "bright", "2": "dark"},
    "normalization": [{"scheme": "zscore", "mean": 0.0, "std": 1.0, "clip": None, "use_nonzero_mask": False}],
    "fingerprint": {"dataset": "MedsegDemo", "manifest_hash": "ab" * 32, "num_cases": 6, "spatial_dims": 3,
                    "channels": 1, "median_spacing": [1.5, 1.5, 1.5], "median_shape": [30, 30, 30]},
    "configurations": {
        "3d_fullres": {"spacing": [1.5, 1.5, 1.5], "patch_size": [16, 16, 16], "batch_size": 2,
                       "network": {"name": "unet", "kwargs": {"features": [8, 16, 32], "strides": [1, 2, 2],
                                                              "kernel_sizes": [3, 3, 3], "norm": "instance",
                                                              "deep_supervision": True}},
                       "mirror_axes": [0], "slicewise": False},
    },
}
CARD = {"intended_use": "Testing medseg's packaging only.", "limitations": "Synthetic blobs; not for patients.",
        "contact": "medseg developers"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's cores are shared: one torch thread avoids spin-wait contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _normalise_plan(data_dir: Path) -> None:
    """The plan's z-score statistics from the demo images (as the planner would fingerprint them)."""
    import nibabel as nib

    vals = np.concatenate([np.asarray(nib.load(p).dataobj, np.float32).ravel()
                           for p in sorted((data_dir / "imagesTr").glob("*.nii.gz"))])
    PLAN["normalization"][0].update(mean=float(vals.mean()), std=float(vals.std()))


def _train_fold(data_dir: Path, cases: list[str], fold: int, steps: int) -> dict:
    from medseg.networks import create_model, model_spec
    from medseg.transforms.case import load_case
    from medseg.transforms.preprocess import preprocess_volume

    net_spec = PLAN["configurations"]["3d_fullres"]["network"]
    torch.manual_seed(fold)
    net = create_model(net_spec["name"], spatial_dims=3, in_channels=1, out_channels=3, **net_spec["kwargs"])
    data = []
    for c in cases:
        img, lab = load_case([data_dir / "imagesTr" / f"{c}.nii.gz"], data_dir / "labelsTr" / f"{c}.nii.gz")
        data.append(preprocess_volume(img, PLAN, "3d_fullres", lab)[:2])
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    rng = np.random.default_rng(fold)
    net.train()
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(2):
            img, seg = data[rng.integers(len(data))]
            fg = np.argwhere(seg[0] > 0)
            if len(fg) and rng.random() < 0.7:  # foreground-centred windows most of the time
                c = fg[rng.integers(len(fg))]
                lo = [int(np.clip(ci - 8, 0, max(s - 16, 0))) for ci, s in zip(c, img.shape[1:])]
            else:
                lo = [rng.integers(0, max(s - 15, 1)) for s in img.shape[1:]]
            sl = (slice(None), *[slice(a, a + 16) for a in lo])
            xs.append(np.pad(img[sl], [(0, 0)] + [(0, 16 - s) for s in img[sl].shape[1:]]))
            ys.append(np.pad(seg[sl], [(0, 0)] + [(0, 16 - s) for s in seg[sl].shape[1:]])[0])
        out = net(torch.from_numpy(np.stack(xs)))
        loss = torch.nn.functional.cross_entropy(out[0] if isinstance(out, list) else out,
                                                 torch.from_numpy(np.stack(ys)).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return {"network": model_spec(net), "state_dict": net.state_dict(), "optimizer": opt.state_dict(),
            "epoch": steps, "configuration": "3d_fullres"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from medseg.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("deploy")
    data = make_demo_dataset(root / "data", n_cases=6, seed=3)
    _normalise_plan(data)
    ids = [f"demo_{i:03d}" for i in range(6)]
    run = root / "run"
    run.mkdir()
    splits = [{"train": ids[2:], "val": ids[:2], "train_patients": ["patient_001", "patient_002"],
               "val_patients": ["patient_000"]},
              {"train": ids[:2] + ids[4:], "val": ids[2:4], "train_patients": ["patient_000", "patient_002"],
               "val_patients": ["patient_001"]}]
    (run / "plan.json").write_text(json.dumps(PLAN))
    (run / "splits.json").write_text(json.dumps(splits))
    (run / "model.json").write_text(json.dumps({"configuration": "3d_fullres", "folds": [0, 1], "num_classes": 3,
                                                "network": PLAN["configurations"]["3d_fullres"]["network"],
                                                "labels": PLAN["labels"], "pipeline": "deploytest"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "deploytest", "dataset": str(data), "card": CARD}))
    (run / "environment.json").write_text(json.dumps({"packages": {"medseg": "0.1.0", "torch": torch.__version__},
                                                      "python": "3.11", "processor": "x86_64", "cuda": None,
                                                      "torch_threads": 1}))
    summary = {"folds": [0, 1], "n_cases": 4, "mean_foreground_dice": 0.81234, "ci": 0.95, "n_boot": 2000,
               "mean_foreground_dice_postprocessed": 0.8125, "training": {"0": {"elapsed_s": 61.5},
                                                                          "1": {"elapsed_s": 58.25}},
               "classes": {"1": {"name": "bright", "metrics": {"dice": {"mean": 0.8712, "ci_low": 0.8301,
                                                                         "ci_high": 0.9011, "n": 4}}},
                           "2": {"name": "dark", "metrics": {"dice": {"mean": 0.7534, "ci_low": 0.7002,
                                                                       "ci_high": 0.8123, "n": 4}}}}}
    (run / "crossval_summary.json").write_text(json.dumps(summary))
    for k, split in enumerate(splits):
        (run / f"fold_{k}").mkdir()
        torch.save(_train_fold(data, split["train"], k, 60), run / f"fold_{k}" / "checkpoint_best.pt")
    return run


@pytest.fixture
def homes(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A models folder and a package cache of this test only."""
    models, cache = tmp_path / "models", tmp_path / "cache"
    monkeypatch.setenv("MEDSEG_MODELS", str(models))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return models, cache


@pytest.fixture(scope="module")
def package(run, tmp_path_factory) -> Path:
    """model.zip with fp32 ONNX files."""
    out = tmp_path_factory.mktemp("pkg") / "model.zip"
    assert main(["-q", "export-model", str(run), "-o", str(out), "--onnx"]) == 0
    return out


def _inputs(run: Path, tmp: Path) -> Path:
    from medseg.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp / "new", n_cases=2, seed=11)  # cases the model never saw
    return data / "imagesTr"


def _masks(folder: Path) -> dict[str, np.ndarray]:
    from medseg.io import read_volume

    return {p.name: read_volume(p).array for p in sorted(folder.glob("*.nii.gz"))}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in either mask (1.0 when both are empty)."""
    present = [c for c in (1, 2) if (a == c).any() or (b == c).any()]
    return float(np.mean([2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in present])
                 if present else 1.0)


def test_model_card_numbers_equal_the_crossval_summary(run, package):
    with zipfile.ZipFile(package) as zf:
        card = json.loads(zf.read("model_card.json"))
        md = zf.read("MODEL_CARD.md").decode()
        names = set(zf.namelist())
    summary = json.loads((run / "crossval_summary.json").read_text())
    for k, entry in summary["classes"].items():
        dice = entry["metrics"]["dice"]
        got = card["cross_validation"]["classes"][k]
        assert (got["dice_mean"], got["dice_ci_low"], got["dice_ci_high"], got["n"]) == (
            dice["mean"], dice["ci_low"], dice["ci_high"], dice["n"])
        assert got["name"] == entry["name"]
        assert f"| {dice['mean']:.3f} | {dice['ci_low']:.3f} | {dice['ci_high']:.3f} |" in md
    cv = card["cross_validation"]
    assert cv["mean_foreground_dice"] == summary["mean_foreground_dice"] and cv["n_cases"] == summary["n_cases"]
    assert card["dataset"]["num_patients"] == 3 and card["dataset"]["num_cases"] == 4
    assert card["dataset"]["name"] == "MedsegDemo" and card["dataset"]["manifest_hash"] == "ab" * 32
    assert card["intended_use"] == CARD["intended_use"] and card["limitations"] == CARD["limitations"]
    assert CARD["intended_use"] in md and CARD["limitations"] in md and "medseg developers" in md
    assert card["training"]["seconds_per_fold"] == {"0": 61.5, "1": 58.25}
    assert card["software"]["trained_with"]["torch"] == torch.__version__
    # the chosen folds' weights only: no optimiser state, no cache, no splits or data paths
    ckpt = torch.load(io.BytesIO(zipfile.ZipFile(package).read("fold_0/checkpoint_best.pt")), weights_only=True)
    assert set(ckpt) == {"network", "state_dict", "configuration"}
    assert not any(n.startswith(("cache", "splits", "config")) for n in names)
    manifest = json.loads(zipfile.ZipFile(package).read("MANIFEST.json"))
    assert set(manifest["files"]) == names - {"MANIFEST.json"}
    for name, meta in manifest["files"].items():
        assert hashlib.sha256(zipfile.ZipFile(package).read(name)).hexdigest() == meta["sha256"]


def test_package_predicts_the_same_masks_as_the_run(run, package, homes, tmp_path):
    models, cache = homes
    images = _inputs(run, tmp_path)
    elsewhere = tmp_path / "elsewhere" / "model.zip"  # the package alone, in another folder
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(package.read_bytes())
    assert main(["-q", "install-model", str(elsewhere)]) == 0
    assert (models / "deploytest" / "model.json").is_file()
    outs = {}
    for key, model, extra in [("run", run, []), ("zip", elsewhere, []), ("name", "deploytest", []),
                              ("ort", "deploytest", ["--runtime", "onnxruntime"])]:
        assert main(["-q", "predict", "-i", str(images), "-o", str(tmp_path / key), "-m", str(model),
                     "--device", "cpu", "--precision", "fp32", *extra]) == 0, key
        outs[key] = _masks(tmp_path / key)
    assert len(outs["run"]) == 2
    truth = _masks(images.parent / "labelsTr")
    bright = [_dice(outs["run"][c] == 1, truth[c] == 1) for c in truth]
    assert np.mean(bright) > 0.55, bright  # a model that finds the bright class, worth comparing runtimes on
    assert list(cache.glob("medseg/packages/deploytest-*/fold_0/checkpoint_best.pt"))
    assert json.loads((tmp_path / "ort" / "predict_report.json").read_text())["runtime"] == "onnxruntime-fp32"
    for key in ("zip", "name", "ort"):  # fp32 runtimes: identical masks
        for case, mask in outs["run"].items():
            assert np.array_equal(outs[key][case], mask), (key, case)


def test_int8_package_stays_within_dice_of_fp32(run, homes, tmp_path):
    import onnx

    pkg = tmp_path / "int8.zip"
    assert main(["-q", "export-model", str(run), "-o", str(pkg), "--int8", "--calibration-cases", "3"]) == 0
    with zipfile.ZipFile(pkg) as zf:  # the INT8 graph really is quantised (not the fp32 file under another name)
        ops = {n.op_type for n in onnx.load_from_string(zf.read("onnx/fold_0.int8.onnx")).graph.node}
        assert {"fold_0.onnx", "fold_1.int8.onnx"} <= {Path(n).name for n in zf.namelist()}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    images = _inputs(run, tmp_path)
    outs = {}
    for prec in ("fp32", "int8"):
        assert main(["-q", "predict", "-i", str(images), "-o", str(tmp_path / prec), "-m", str(pkg), "--device", "cpu",
                     "--runtime", "onnxruntime", "--precision", prec]) == 0
        outs[prec] = _masks(tmp_path / prec)
    for case, mask in outs["fp32"].items():  # INT8: Dice >= 0.99 against fp32
        assert mask.any() and _dice(outs["int8"][case], mask) >= 0.99, case


def test_onnx_runtime_network_stands_in_the_predictor(package, homes):
    from medseg.deploy import OnnxNetwork, load_predictor

    pred = load_predictor(package, runtime="onnxruntime", precision="fp32", device="cpu", tta=False)
    assert all(isinstance(n, OnnxNetwork) for n in pred.networks) and len(pred.networks) == 2
    ref = load_predictor(package, runtime="torch", precision="fp32", device="cpu", tta=False)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        for a, b in zip(pred.networks, ref.networks):
            y = b(x)
            assert torch.allclose(a(x), y[0] if isinstance(y, (list, tuple)) else y, atol=1e-4)
    with pytest.raises(ConfigError, match="onnxruntime"):
        load_predictor(package, runtime="torch", precision="int8")
    with pytest.raises(ConfigError, match="--runtime"):
        load_predictor(package, runtime="tensorrt")


def _rewrite(src: Path, dst: Path, change=None, extra: list[tuple[zipfile.ZipInfo, bytes]] = (),
             list_extra: bool = True) -> None:
    """Copy a package, optionally changing entries (``change(name, data) -> data``) and adding entries that the
    manifest lists with their true hashes (so that only the path/type checks can refuse them)."""
    with zipfile.ZipFile(src) as zin:
        files = {n: zin.read(n) for n in zin.namelist()}
    manifest = json.loads(files.pop("MANIFEST.json"))
    if change:
        files = {n: change(n, d) for n, d in files.items()}
    if list_extra:
        for info, data in extra:
            manifest["files"][info.filename] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with zipfile.ZipFile(dst, "w") as zout:
        for n, d in files.items():
            zout.writestr(n, d)
        for info, data in extra:
            zout.writestr(info, data)
        zout.writestr("MANIFEST.json", json.dumps(manifest))


def _flip_byte(name: str, data: bytes) -> bytes:
    if name != "fold_0/checkpoint_best.pt":
        return data
    b = bytearray(data)
    b[len(b) // 2] ^= 0x01
    return bytes(b)


def _symlink_entry() -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo("fold_0/link.pt")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, b"/etc/passwd"


BAD = {
    "tampered-weight": (lambda: {"change": _flip_byte}, "SHA-256 does not match"),
    "zip-slip": (lambda: {"extra": [(zipfile.ZipInfo("../../evil.txt"), b"owned")]}, "'..'"),
    "absolute": (lambda: {"extra": [(zipfile.ZipInfo("/tmp/medseg-evil-abs.txt"), b"owned")]}, "absolute"),
    "symlink": (lambda: {"extra": [_symlink_entry()]}, "symbolic link"),
    "unlisted": (lambda: {"extra": [(zipfile.ZipInfo("extra.txt"), b"x")], "list_extra": False}, "not in the manifest"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_unsafe_or_altered_package_is_refused_and_nothing_is_written(kind, package, homes, tmp_path, capsys):
    models, cache = homes
    make, message = BAD[kind]
    bad = tmp_path / "bad" / "model.zip"
    bad.parent.mkdir()
    _rewrite(package, bad, **make())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for argv in (["install-model", str(bad)],
                 ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(bad)]):
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
        assert "nothing unpacked" in err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before  # no model, no cache folder, no temporary folder, no output folder
    assert not Path("/tmp/medseg-evil-abs.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_a_byte_flipped_inside_the_zip_is_refused(package, homes, tmp_path):
    """A raw change in the zip's bytes (not a rewritten entry) is caught before anything is unpacked."""
    from medseg.deploy import install_package

    data = bytearray(package.read_bytes())
    with zipfile.ZipFile(package) as zf:
        info = zf.getinfo("fold_0/checkpoint_best.pt")
    data[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
    bad = tmp_path / "flipped.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match="fold_0/checkpoint_best.pt"):
        install_package(bad)
    assert not homes[0].exists()


def test_size_limit_refuses_before_unpacking(package, homes):
    from medseg.deploy import install_package, verify_package

    total = sum(m["size"] for m in verify_package(package)["files"].values())
    with pytest.raises(InputError, match="over the limit"):
        install_package(package, size_limit=total // 2)
    assert not homes[0].exists()
    assert install_package(package, size_limit=2 * total).is_dir()
    with pytest.raises(InputError, match="already exists"):
        install_package(package)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_cli_writes_one_file_per_fold_and_reports_parity(run, fmt, tmp_path, capsys):
    out = tmp_path / fmt
    assert main(["export", str(run), "--format", fmt, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "export_report.json").read_text())
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    for k in (0, 1):
        rep = report["folds"][str(k)]
        assert (out / f"fold_{k}{suffix}").stat().st_size > 1000
        assert 0 <= rep["max_abs_diff"] <= 1e-4 and rep["dynamic_spatial"], rep
        assert [1, 1, 32, 16, 16] in rep["parity_shapes"]  # checked at a second window size too
    assert "parity max abs logit diff" in printed


def test_int8_without_the_training_data_says_so(run, tmp_path):
    import shutil

    from medseg.deploy import load_predictor

    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    (moved / "config.yaml").write_text(yaml.safe_dump({"name": "x", "dataset": str(tmp_path / "gone")}))
    with pytest.raises(InputError, match="INT8 calibration"):
        load_predictor(moved, runtime="onnxruntime", precision="int8", device="cpu")


TINY = {
    "unet": (3, {"features": [4, 8]}, 16),
    "unet3d": (3, {"features": [4, 8], "strides": [1, 2]}, 16),
    "attention_unet": (2, {"features": [4, 8, 16]}, 16),
    "res_unet": (2, {"features": [4, 8, 16]}, 16),
    "classic_unet": (2, {"features": [4, 8, 16, 32, 64]}, 188),
    "unetpp": (2, {"features": [4, 4, 8, 8, 16, 4]}, 32),
    "swin_unetr": (2, {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}, 64),
}
MUST_EXPORT = ("unet", "unet3d", "attention_unet", "res_unet", "unetpp")


def test_tiny_table_covers_every_registered_network():
    from medseg.networks import list_models

    assert set(TINY) == set(list_models())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n == "swin_unetr" else [])
                                  for n in sorted(TINY)])
def test_every_registered_network_exports_or_says_why(name, fmt, tmp_path):
    from medseg.deploy.export import ExportError, export_network
    from medseg.networks import create_model

    if name == "swin_unetr":
        pytest.importorskip("einops", reason="swin_unetr needs einops")
    dims, kwargs, edge = TINY[name]
    torch.manual_seed(0)
    net = create_model(name, spatial_dims=dims, in_channels=1, out_channels=2, **kwargs).eval()
    out = tmp_path / ("net.onnx" if fmt == "onnx" else "net.pt")
    try:
        res = export_network(net, out, fmt, (edge,) * dims, 1, batch_size=1)
    except ExportError as exc:
        assert name not in MUST_EXPORT, str(exc)
        assert f"cannot be exported to {fmt}: " in str(exc) and len(str(exc).split(": ", 1)[1]) > 10
        assert not out.exists()
        return
    assert res.max_abs_diff <= 1e-4 and out.is_file()
    assert res.dynamic_spatial or res.note  # fixed spatial axes always come with the reason


def test_pipeline_card_block_is_kept_and_checked():
    from medseg.training.config import pipeline_from_dict

    cfg = pipeline_from_dict({"name": "x", "dataset": "/data", "card": CARD})
    assert cfg.card == CARD and cfg.to_dict()["card"] == CARD
    assert pipeline_from_dict({"name": "x", "dataset": "/data"}).card is None
    with pytest.raises(ConfigError, match="card"):
        pipeline_from_dict({"name": "x", "dataset": "/data", "card": "for research"})
