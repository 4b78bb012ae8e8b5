"""Connected-component post-processing (cc3d) and its cross-validation choice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import ConfigError, InputError
from medseg.inference.postprocess import (
    PostprocessSetting,
    choose_postprocessing,
    fill_holes,
    keep_largest_component,
    load_postprocessing,
    postprocess,
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
