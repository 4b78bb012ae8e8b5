"""medseg.metrics: agreement with MONAI on random anisotropic masks, hand-computed tiny cases, edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from medseg.metrics import binary_metrics, compute_metrics, metric_names, surface_distances


def _blob(rng: np.random.Generator, shape: tuple[int, ...], fill: float = 0.5) -> np.ndarray:
    """A random, smooth-ish blob mask (noise smoothed and thresholded), never empty."""
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=1.5)
    mask = noise > np.quantile(noise, 1 - fill * 0.5)
    mask[tuple(s // 2 for s in shape)] = True
    return mask


def _monai(pred: np.ndarray, ref: np.ndarray, spacing, tol: float) -> dict[str, float]:
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    r = torch.from_numpy(ref[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "dice": float(compute_dice(p, r, ignore_empty=False)[0, 0]),
            "hd95_mm": float(compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing))[0, 0]),
            "hd_mm": float(compute_hausdorff_distance(p, r, spacing=list(spacing))[0, 0]),
            "assd_mm": float(compute_average_surface_distance(p, r, symmetric=True, spacing=list(spacing))[0, 0]),
            "nsd": float(compute_surface_dice(p, r, class_thresholds=[tol], spacing=list(spacing))[0, 0]),
        }


@pytest.mark.parametrize(
    "shape,spacing,seed",
    [
        ((24, 20, 12), (0.7, 1.1, 3.0), 0),
        ((18, 26, 9), (1.0, 0.45, 5.0), 1),
        ((30, 22, 16), (2.0, 2.0, 0.8), 2),
        ((40, 33), (0.3, 1.7), 3),
        ((25, 25), (1.0, 1.0), 4),
    ],
)
def test_agrees_with_monai_on_random_anisotropic_masks(shape, spacing, seed):
    rng = np.random.default_rng(seed)
    pred, ref = _blob(rng, shape), _blob(rng, shape)
    tol = 1.5
    ours = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=tol)
    theirs = _monai(pred, ref, spacing, tol)
    assert 0.0 < ours["dice"] < 1.0 and ours["hd95_mm"] > 0  # a non-trivial case
    for key in ("dice", "hd95_mm", "assd_mm", "nsd"):
        value = theirs[key]
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("case", ["ref_empty", "pred_empty"])
def test_one_empty_mask_matches_monai_for_distances(case):
    rng = np.random.default_rng(5)
    mask = _blob(rng, (16, 16, 8))
    empty = np.zeros_like(mask)
    pred, ref = (mask, empty) if case == "ref_empty" else (empty, mask)
    ours = binary_metrics(pred, ref, (1.0, 1.0, 2.5))
    theirs = _monai(pred, ref, (1.0, 1.0, 2.5), 1.0)
    # MONAI's HD95 is NaN here only because torch.quantile interpolates between infinities; its plain
    # Hausdorff distance and ASSD are inf, and so is our HD95 (documented in medseg.metrics).
    assert math.isinf(ours["hd95_mm"]) and math.isinf(theirs["hd_mm"])
    assert math.isinf(ours["assd_mm"]) and math.isinf(theirs["assd_mm"])
    assert ours["nsd"] == theirs["nsd"] == 0.0
    assert ours["dice"] == 0.0 and ours["iou"] == 0.0
    if case == "ref_empty":
        assert math.isnan(ours["recall"]) and ours["precision"] == 0.0
    else:
        assert math.isnan(ours["precision"]) and ours["recall"] == 0.0


def test_both_empty_is_nan_for_overlap_and_distance_but_defined_for_counts():
    empty = np.zeros((6, 7, 5), bool)
    m = binary_metrics(empty, empty, (1.0, 2.0, 3.0))
    for key in ("dice", "iou", "precision", "recall", "hd95_mm", "assd_mm", "nsd"):
        assert math.isnan(m[key]), key
    assert m["accuracy"] == 1.0
    assert m["volume_pred_ml"] == m["volume_ref_ml"] == m["volume_diff_ml"] == 0.0
    assert set(m) == set(metric_names(3))


def test_hand_computed_2d_example():
    # ref: a 3x3 square; pred: the same square shifted by one column (spacing 2 mm along axis 1).
    ref = np.zeros((7, 8), bool)
    ref[2:5, 2:5] = True
    pred = np.zeros_like(ref)
    pred[2:5, 3:6] = True
    m = binary_metrics(pred, ref, (1.0, 2.0), nsd_tolerance_mm=1.0)
    # tp = 6, fp = 3, fn = 3
    assert m["dice"] == pytest.approx(12 / 18)
    assert m["iou"] == pytest.approx(6 / 12)
    assert m["precision"] == pytest.approx(6 / 9) and m["recall"] == pytest.approx(6 / 9)
    assert m["accuracy"] == pytest.approx((56 - 6) / 56)
    assert m["area_ref_mm2"] == pytest.approx(9 * 2.0) and m["area_diff_mm2"] == 0.0
    # Surface of a 3x3 square: its 8 border pixels. Pred's surface: 4 pixels on ref's surface (0 mm), its
    # left-middle pixel (3, 3) is ref's centre, 1 mm (one row) from ref's surface, and its column 5 lies 2 mm
    # (one column) from ref's column 4. Symmetric for ref against pred.
    d_pred, d_ref = surface_distances(pred, ref, (1.0, 2.0))
    assert sorted(d_pred.tolist()) == [0.0] * 4 + [1.0] + [2.0] * 3
    assert sorted(d_ref.tolist()) == [0.0] * 4 + [1.0] + [2.0] * 3
    # 95th percentile of [0]*4+[1]+[2]*3 with linear interpolation: position 0.95*7 = 6.65 -> 2.0
    assert m["hd95_mm"] == pytest.approx(2.0)
    assert m["assd_mm"] == pytest.approx(14 / 16)
    assert m["nsd"] == pytest.approx(10 / 16)  # distances <= 1 mm: 5 per side
    assert binary_metrics(pred, ref, (1.0, 2.0), nsd_tolerance_mm=2.0)["nsd"] == pytest.approx(1.0)


def test_hand_computed_3d_volume_and_identity():
    ref = np.zeros((10, 10, 10), bool)
    ref[2:6, 2:6, 2:4] = True  # 32 voxels
    spacing = (0.5, 0.5, 2.0)  # 0.5 mm³ per voxel
    m = binary_metrics(ref, ref, spacing)
    assert m["dice"] == 1.0 and m["hd95_mm"] == 0.0 and m["assd_mm"] == 0.0 and m["nsd"] == 1.0
    assert m["volume_ref_ml"] == pytest.approx(32 * 0.5 / 1000)
    pred = ref.copy()
    pred[2:6, 2:6, 4] = True  # one more slab of 16 voxels, 2 mm away
    m = binary_metrics(pred, ref, spacing)
    assert m["volume_diff_ml"] == pytest.approx(16 * 0.5 / 1000)
    assert m["dice"] == pytest.approx(64 / 80)
    assert m["hd95_mm"] == pytest.approx(2.0)


def test_compute_metrics_multiclass_labels_and_channel_axis():
    ref = np.zeros((1, 8, 8, 4), np.uint8)
    ref[0, 1:4, 1:4, 1:3] = 1
    ref[0, 5:7, 5:7, 1:3] = 2
    pred = ref.copy()
    pred[0, 5:7, 5:7, 1:3] = 0  # class 2 missed entirely
    out = compute_metrics(pred, ref, (1.0, 1.0, 1.0), {1: "a", 2: "b", 3: "absent"})
    assert set(out) == {1, 2, 3}
    assert out[1]["dice"] == 1.0
    assert out[2]["dice"] == 0.0 and math.isinf(out[2]["hd95_mm"])
    assert math.isnan(out[3]["dice"]) and out[3]["accuracy"] == 1.0


def test_compute_metrics_rejects_bad_inputs():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="same"):
        compute_metrics(a, np.zeros((4, 4, 5), np.uint8), (1, 1, 1), [1])
    with pytest.raises(ValueError, match="2 or 3"):
        compute_metrics(a, a, (1, 1, 1, 1), [1])
    with pytest.raises(ValueError, match="labels"):
        compute_metrics(a, a, (1, 1, 1), [])


def test_surface_distances_cropping_matches_uncropped():
    """Cropping to the bounding box must not change any distance (structures far from the origin)."""
    rng = np.random.default_rng(7)
    big = np.zeros((60, 50, 40), bool)
    big2 = np.zeros_like(big)
    big[30:46, 20:40, 10:30] = _blob(rng, (16, 20, 20))
    big2[33:50, 18:38, 12:32] = _blob(rng, (17, 20, 20))
    spacing = (0.8, 1.2, 2.5)
    d1, d2 = surface_distances(big, big2, spacing)
    s1 = big & ~ndimage.binary_erosion(big)
    s2 = big2 & ~ndimage.binary_erosion(big2)
    full1 = ndimage.distance_transform_edt(~s2, sampling=spacing)[s1]
    full2 = ndimage.distance_transform_edt(~s1, sampling=spacing)[s2]
    np.testing.assert_allclose(d1, full1)
    np.testing.assert_allclose(d2, full2)


@pytest.mark.parametrize("spacing", [(0.7, 1.1, 3.0), (1.0, 1.0, 1.0), (0.3, 1.7, 0.45)])
def test_surface_distances_equal_the_euclidean_distance_transform(spacing):
    """The k-d tree distances are the EDT's (to rounding: 1 ulp where two surface voxels tie), also with
    scattered voxels far from the structure."""
    from medseg.metrics import _surface

    rng = np.random.default_rng(7)
    pred, ref = _blob(rng, (30, 26, 14)), _blob(rng, (30, 26, 14))
    pred[tuple(rng.integers(0, s, 6) for s in pred.shape)] = True  # scattered false positives
    d_pred, d_ref = surface_distances(pred, ref, spacing)
    ps, rs = _surface(pred), _surface(ref)
    np.testing.assert_allclose(d_pred, ndimage.distance_transform_edt(~rs, sampling=spacing)[ps], rtol=1e-14, atol=0)
    np.testing.assert_allclose(d_ref, ndimage.distance_transform_edt(~ps, sampling=spacing)[rs], rtol=1e-14, atol=0)
