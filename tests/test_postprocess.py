"""Connected-component post-processing (cc3d) and its cross-validation choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import benchmark_module

from medseg.errors import ConfigError, InputError
from medseg.inference.postprocess import (
    PostprocessSetting,
    choose_postprocessing,
    fill_holes,
    keep_largest_component,
    load_postprocessing,
    postprocess,
    remove_small_components,
    save_postprocessing,
)


def _scene() -> np.ndarray:
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:10, 2:10, 2:10] = 1            # big class-1 cube (512 voxels)
    lab[5:7, 5:7, 5:7] = 0               # an 8-voxel hole inside it
    lab[15:17, 15:17, 15:17] = 1         # small class-1 island (8 voxels)
    lab[12:18, 2:8, 2:8] = 2             # class-2 block (216)
    lab[0, 19, 19] = 2                   # a 1-voxel class-2 speck at the border
    return lab


def test_largest_per_class_keeps_other_classes():
    lab = _scene()
    out = keep_largest_component(lab, [1])
    assert out[15:17, 15:17, 15:17].sum() == 0
    assert (out == 1).sum() == 512 - 8 and (out == 2).sum() == 217


def test_largest_foreground_keeps_one_component_of_the_union():
    lab = np.zeros((10, 12), np.int16)
    lab[1:4, 1:4] = 1
    lab[4:6, 1:4] = 2                    # touches class 1: same foreground component
    lab[8:10, 8:12] = 1
    out = postprocess(lab[None], PostprocessSetting(largest_foreground=True))
    assert out.shape == (1, 10, 12) and out.dtype == np.int16
    assert (out[0, 8:10, 8:12] == 0).all() and (out == 2).sum() == 6 and (out == 1).sum() == 9


@pytest.mark.parametrize("setting, spacing, removed_island, removed_speck", [
    (PostprocessSetting(min_size_voxels=5), None, False, True),
    (PostprocessSetting(min_size_voxels=9), None, True, True),
    (PostprocessSetting(min_size_mm3=15.0), (1.0, 1.0, 2.0), False, True),   # 8 voxels = 16 mm3 kept
    (PostprocessSetting(min_size_mm3=17.0), (1.0, 1.0, 2.0), True, True),    # 16 mm3 < 17 removed
])
def test_remove_small_components(setting, spacing, removed_island, removed_speck):
    lab = _scene()
    out = postprocess(lab, setting, spacing)
    assert (out[15:17, 15:17, 15:17] == 0).all() == removed_island
    assert (out[0, 19, 19] == 0) == removed_speck
    assert (out[2:10, 2:10, 2:10] == lab[2:10, 2:10, 2:10]).all()


def test_fill_holes_only_enclosed_background_of_chosen_class():
    lab = _scene()
    lab[12:18, 2:8, 2:8][2:4, 2:4, 2:4] = 0     # a hole inside class 2 too
    lab[2:10, 2:10, 0:2] = 0
    lab[4:8, 4:8, 0:4] = 0                       # an open pit in class 1 reaching the border: not a hole
    out = fill_holes(lab, [1])
    assert (out[5:7, 5:7, 5:7] == 1).all()
    assert (out[14:16, 4:6, 4:6] == 0).all()     # class 2 not chosen
    assert (out[4:8, 4:8, 0:4] == 0).all()       # touches the border
    both = fill_holes(lab, [1, 2])
    assert (both[14:16, 4:6, 4:6] == 2).all()


def test_hole_between_two_classes_is_not_filled():
    lab = np.zeros((9, 9), np.uint8)
    lab[1:8, 1:5] = 1
    lab[1:8, 5:8] = 2
    lab[4, 4] = 0
    lab[4, 5] = 0                                # hole touching both classes
    out = fill_holes(lab, [1, 2])
    assert out[4, 4] == 0 and out[4, 5] == 0


def test_identity_and_validation():
    lab = _scene()
    np.testing.assert_array_equal(postprocess(lab, None), lab)
    np.testing.assert_array_equal(postprocess(lab, PostprocessSetting()), lab)
    with pytest.raises(ConfigError, match="unknown_key"):
        PostprocessSetting.from_dict({"unknown_key": 1})
    with pytest.raises(ConfigError, match="spacing"):
        postprocess(lab, PostprocessSetting(min_size_mm3=3.0))


def test_choose_adopts_what_helps_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(3):
        ref = _scene()
        ref[15:17, 15:17, 15:17] = 0
        ref[0, 19, 19] = 0
        ref[5:7, 5:7, 5:7] = 1
        pred = ref.copy()
        pred[5:7, 5:7, 5:7] = 0                    # prediction has a hole in class 1
        z, y, x = rng.integers(12, 19, 3)
        pred[z, y, x] = 1                          # and a false-positive speck
        cases.append((pred, ref, (1.0, 1.0, 1.0)))
    setting, report = choose_postprocessing(cases, [1, 2])
    assert 1 in setting.fill_holes
    assert setting.largest_foreground or 1 in setting.largest_per_class
    assert float(np.mean(list(report["dice_after"].values()))) > float(np.mean(list(report["dice_before"].values())))
    save_postprocessing(tmp_path, setting, report)
    assert json.loads((tmp_path / "postprocessing.json").read_text())["version"] == 1
    assert load_postprocessing(tmp_path) == setting
    assert load_postprocessing(tmp_path / "nothing_here") == PostprocessSetting()
    (tmp_path / "postprocessing.json").write_text("{not json")
    with pytest.raises(InputError, match="postprocessing.json"):
        load_postprocessing(tmp_path)


def test_choose_keeps_identity_when_nothing_helps():
    ref = _scene()
    setting, report = choose_postprocessing([(ref.copy(), ref, None)], [1, 2])
    assert setting.is_identity and not any(s["adopted"] for s in report["steps"])


def test_per_class_single_pass_equals_class_by_class():
    from scipy import ndimage

    rng = np.random.default_rng(4)
    noise = ndimage.gaussian_filter(rng.normal(size=(30, 28, 26)), 1.5)
    lab = np.digitize(noise, [-0.1, 0.0, 0.1]).astype(np.uint8)  # classes 0..3, many components
    fast = keep_largest_component(lab, [1, 3], per_class=True)
    slow = keep_largest_component(keep_largest_component(lab, [1]), [3])
    np.testing.assert_array_equal(fast, slow)
    assert (fast == 2).sum() == (lab == 2).sum()


# --------------------------------------------------------------------------------------------- same masks as before
# benchmarks/bench_postprocess.py keeps the implementation that the foreground-index rewrite replaced
# (``previous_*``) and plain scikit-image loops; the current functions must give the very same label maps.
BENCH = benchmark_module("bench_postprocess")


def _random_label(seed: int, shape: tuple[int, ...], classes: int, dtype) -> np.ndarray:
    """Smoothed noise cut into classes 0..classes, single-voxel specks (many equal-size components), a hole."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.2)
    cuts = np.quantile(noise, np.linspace(0.45, 1.0, classes + 1)[:-1])
    lab = np.digitize(noise, cuts).astype(dtype)
    specks = rng.integers(0, lab.size, lab.size // 40)
    lab.reshape(-1)[specks] = rng.integers(0, classes + 1, specks.size)
    lab[(slice(2, 7),) * lab.ndim] = 1               # a class-1 block around a one-voxel hole
    lab[(4,) * lab.ndim] = 0
    return lab


CASES = [(seed, shape, k, dtype) for seed, (shape, k, dtype) in enumerate([
    ((22, 20, 18), 2, np.uint8), ((22, 20, 18), 4, np.int16), ((17, 25, 9), 3, np.uint16),
    ((48, 40), 2, np.uint8), ((41, 37), 4, np.int16), ((30, 52), 3, np.int32)])]


@pytest.mark.parametrize("seed, shape, k, dtype", CASES)
def test_every_step_equals_the_previous_implementation(seed, shape, k, dtype):
    lab = _random_label(seed, shape, k, dtype)
    wanted = (1, k + 1)                              # class k + 1 is absent: an empty class
    pairs = [
        (keep_largest_component(lab, wanted, per_class=True),
         BENCH.previous_keep_largest_component(lab, wanted, per_class=True)),
        (keep_largest_component(lab, per_class=True), BENCH.previous_keep_largest_component(lab, per_class=True)),
        (keep_largest_component(lab), BENCH.previous_keep_largest_component(lab)),
        (keep_largest_component(lab, (2, k)), BENCH.previous_keep_largest_component(lab, (2, k))),
        (fill_holes(lab, range(1, k + 1)), BENCH.previous_fill_holes(lab, range(1, k + 1))),
        (fill_holes(lab, (1,)), BENCH.previous_fill_holes(lab, (1,))),
    ] + [(remove_small_components(lab, n), BENCH.previous_remove_small_components(lab, n)) for n in (1, 2, 5, 30)]
    for i, (new, old) in enumerate(pairs):
        assert new.dtype == lab.dtype and new.shape == lab.shape, i
        np.testing.assert_array_equal(new, old, err_msg=f"pair {i}")
    changed = [not np.array_equal(new, lab) for new, _ in pairs]
    assert all(changed[:4]) and changed[4] and changed[-1]     # the comparison is not between two identities
    np.testing.assert_array_equal(pairs[1][0], BENCH.skimage_largest_per_class(lab, range(1, k + 1)))
    np.testing.assert_array_equal(pairs[2][0], BENCH.skimage_largest_foreground(lab))
    np.testing.assert_array_equal(pairs[-1][0], BENCH.skimage_remove_small(lab, 30))


def test_ties_keep_the_component_met_first_in_c_order():
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[5:7, 5:7, 5:7] = 1           # two 8-voxel class-1 cubes: the later one in C order ...
    lab[0:2, 6:8, 0:2] = 1           # ... and the earlier one (smaller first index)
    lab[0, 0, 8] = 2
    lab[8, 8, 8] = 2                 # two single class-2 voxels
    out = keep_largest_component(lab, (1, 2), per_class=True)
    assert (out[0:2, 6:8, 0:2] == 1).all() and not out[5:7, 5:7, 5:7].any()
    assert out[0, 0, 8] == 2 and out[8, 8, 8] == 0
    np.testing.assert_array_equal(out, BENCH.previous_keep_largest_component(lab, (1, 2), per_class=True))
    fg = keep_largest_component(lab)
    assert (fg[0:2, 6:8, 0:2] == 1).all() and fg.sum() == 8
    np.testing.assert_array_equal(fg, BENCH.previous_keep_largest_component(lab))


@pytest.mark.parametrize("shape", [(7, 6, 5), (8, 9)])
def test_empty_full_and_fortran_ordered_maps(shape):
    setting = PostprocessSetting(largest_foreground=True, largest_per_class=(1, 2), min_size_voxels=3,
                                 fill_holes=(1, 2))
    for lab in (np.zeros(shape, np.uint8), np.full(shape, 2, np.uint8)):
        np.testing.assert_array_equal(postprocess(lab, setting), lab)
    lab = _random_label(9, shape, 2, np.uint8)
    f_order = np.asfortranarray(lab)
    expected = BENCH.previous_fill_holes(BENCH.previous_keep_largest_component(
        BENCH.previous_keep_largest_component(BENCH.previous_remove_small_components(lab, 3)), (1, 2),
        per_class=True), (1, 2))
    np.testing.assert_array_equal(postprocess(f_order, setting), expected)
    np.testing.assert_array_equal(postprocess(lab[None], setting)[0], expected)
