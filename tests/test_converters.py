"""datasets/ converters: HC18 outline filling and subject grouping; ISBI 2012 membrane labels."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from skimage.draw import ellipse, ellipse_perimeter

from medseg.data.manifest import load_manifest
from medseg.data.splits import check_no_leakage, make_splits
from medseg.errors import InputError

DATASETS = Path(__file__).resolve().parents[1] / "datasets"


def _load(name: str):
    sys.path.insert(0, str(DATASETS))
    spec = importlib.util.spec_from_file_location(f"medseg_datasets_{name}", DATASETS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hc18 = _load("hc18")
isbi = _load("isbi2012")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _outline(shape, r, c, rr_, cr_, rotation=0.0) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    pr, pc = ellipse_perimeter(r, c, rr_, cr_, orientation=rotation, shape=shape)
    out[pr, pc] = 255
    return out


def _truth(shape, r, c, rr_, cr_, rotation=0.0) -> np.ndarray:
    out = np.zeros(shape, bool)
    fr, fc = ellipse(r, c, rr_, cr_, shape=shape, rotation=rotation)
    out[fr, fc] = True
    return out


@pytest.mark.parametrize("case", ["closed", "open", "clipped_by_border"])
def test_fill_outline(case):
    shape = (120, 160)
    if case == "clipped_by_border":
        outline, truth = _outline(shape, 60, 20, 40, 30), _truth(shape, 60, 20, 40, 30)
    else:
        outline, truth = _outline(shape, 60, 80, 40, 55), _truth(shape, 60, 80, 40, 55)
    if case == "open":
        outline[:, 130:] = 0  # cut the outline's right end away: hole filling alone would leave it empty
        truth[:, 130:] = False
    mask, method = hc18.fill_outline(outline)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert method == ("filled" if case == "closed" else "hull")
    assert _iou(mask.astype(bool), truth) > 0.95, _iou(mask.astype(bool), truth)


def test_fill_outline_refuses_empty():
    with pytest.raises(ValueError):
        hc18.fill_outline(np.zeros((5, 5)))


def _fake_hc18(folder: Path, names=("000_HC", "001_HC", "001_2HC", "002_HC", "003_HC", "003_2HC", "003_3HC",
                                    "004_HC")) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        iio.imwrite(folder / f"{name}.png", rng.integers(0, 255, (54, 80), dtype=np.uint8))
        iio.imwrite(folder / f"{name}_Annotation.png", _outline((54, 80), 27, 40, 15 + i, 25))
    return folder


def test_convert_hc18_synthetic(tmp_path):
    src = _fake_hc18(tmp_path / "training_set")
    before = sorted((p.name, p.read_bytes()) for p in src.iterdir())
    man = hc18.convert_hc18(src, tmp_path / "out")
    assert sorted((p.name, p.read_bytes()) for p in src.iterdir()) == before, "the source must not change"
    assert man.patients() == {"000": ["000_HC"], "001": ["001_2HC", "001_HC"], "002": ["002_HC"],
                              "003": ["003_2HC", "003_3HC", "003_HC"], "004": ["004_HC"]}
    again = load_manifest(tmp_path / "out")
    assert again.patients() == man.patients() and again.labels == {0: "background", 1: "head"}
    assert again.spatial_dims == 2
    assert (tmp_path / "out" / "images" / "001_2HC.png").read_bytes() == (src / "001_2HC.png").read_bytes()
    label = iio.imread(tmp_path / "out" / "labels" / "003_HC.png")
    assert _iou(label.astype(bool), _truth((54, 80), 27, 40, 19, 25)) > 0.95
    splits = make_splits(again, 3, seed=0, stratify=False)
    check_no_leakage(splits, again)
    for fold in splits:
        subjects = {c[:3] for c in fold["val"]}
        assert not subjects & {c[:3] for c in fold["train"]}


def test_convert_hc18_errors(tmp_path):
    src = _fake_hc18(tmp_path / "ts", names=("000_HC", "001_HC"))
    (src / "001_HC_Annotation.png").unlink()
    with pytest.raises(InputError, match="001_HC.png: has no annotation"):
        hc18.convert_hc18(src, tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no NNN_HC.png images"):
        hc18.convert_hc18(tmp_path / "empty", tmp_path / "o2")
    good = _fake_hc18(tmp_path / "ts2", names=("000_HC",))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(InputError, match="is not empty"):
        hc18.convert_hc18(good, tmp_path / "busy")
    assert hc18.main([str(good), str(tmp_path / "busy")]) == 1


def _fake_isbi(root: Path, n=3) -> Path:
    rng = np.random.default_rng(1)
    for sub in ("train/image", "train/label", "test/image"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        iio.imwrite(root / "train/image" / f"{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
        lab = np.full((16, 16), 255, np.uint8)
        lab[:, 5 + i] = 0  # one membrane column
        iio.imwrite(root / "train/label" / f"{i}.png", lab)
        iio.imwrite(root / "test/image" / f"{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    return root


def test_convert_isbi_synthetic(tmp_path):
    src = _fake_isbi(tmp_path / "isbi")
    man = isbi.convert_isbi2012(src, tmp_path / "out")
    assert [c.case_id for c in man.cases] == ["slice_00", "slice_01", "slice_02"]
    assert all(c.patient_id == c.case_id for c in man.cases)
    lab = iio.imread(tmp_path / "out" / "labels" / "slice_02.png")
    expected = np.zeros((16, 16), np.uint8)
    expected[:, 7] = 1
    np.testing.assert_array_equal(lab, expected)
    assert sorted(p.name for p in (tmp_path / "out" / "imagesTs").iterdir()) == ["slice_00.png", "slice_01.png",
                                                                                 "slice_02.png"]
    assert load_manifest(tmp_path / "out").labels == {0: "background", 1: "membrane"}


def test_convert_isbi_errors(tmp_path):
    with pytest.raises(InputError, match="lacks train/image"):
        isbi.convert_isbi2012(tmp_path, tmp_path / "o")
    src = _fake_isbi(tmp_path / "isbi")
    (src / "train/label/1.png").unlink()
    with pytest.raises(InputError, match="1.png: has no label"):
        isbi.convert_isbi2012(src, tmp_path / "o")


def test_real_hc18_subset(shared_data, tmp_path):
    folder = shared_data("hc18", "training_set")
    src = tmp_path / "ts"
    src.mkdir()
    for stem in ("010_HC", "010_2HC", "186_HC"):  # 186_HC's released outline is open
        for suffix in (".png", "_Annotation.png"):
            shutil.copy(folder / f"{stem}{suffix}", src)
    man = hc18.convert_hc18(src, tmp_path / "out")
    assert man.patients() == {"010": ["010_2HC", "010_HC"], "186": ["186_HC"]}
    for stem in ("010_HC", "010_2HC", "186_HC"):
        mask = iio.imread(tmp_path / "out" / "labels" / f"{stem}.png")
        outline = iio.imread(folder / f"{stem}_Annotation.png") > 0
        assert mask.shape == outline.shape and mask[outline].all()
        assert mask.sum() > 20 * outline.sum(), stem  # the inside is filled, not just the outline


def test_real_isbi(shared_data, tmp_path):
    from medseg.data.checks import check_dataset

    man = isbi.convert_isbi2012(shared_data("isbi2012_em"), tmp_path / "out")
    assert len(man.cases) == 30 and len(man.patients()) == 30
    lab = iio.imread(tmp_path / "out" / "labels" / "slice_00.png")
    src = iio.imread(shared_data("isbi2012_em") / "train" / "label" / "0.png")
    np.testing.assert_array_equal(lab == 1, src == 0)
    assert 0.1 < lab.mean() < 0.4  # membranes are the minority class
    report = check_dataset(load_manifest(tmp_path / "out"))
    assert report.ok, [str(p) for p in report.problems]
