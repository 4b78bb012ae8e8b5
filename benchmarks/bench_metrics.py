"""Segmentation metrics: ``medseg.metrics.compute_metrics`` vs MONAI's metric functions on the same masks.

    .venv/bin/python benchmarks/bench_metrics.py [--repeats 3]

Per scenario, one predicted and one reference label map (2 classes; the prediction is the reference shifted by
a voxel and with a blob added, so every distance is non-trivial), anisotropic spacing. medseg computes Dice,
IoU, precision/recall, HD95, ASSD, NSD and volumes for both classes in one call; MONAI computes Dice, HD95,
ASSD and NSD (``compute_dice``, ``compute_hausdorff_distance(percentile=95)``,
``compute_average_surface_distance(symmetric=True)``, ``compute_surface_dice``) on the one-hot maps, the way
its metric classes do. Printed: seconds (best of --repeats), the speed-up, and the largest difference between
the two on the four shared metrics (they agree to 1e-6 in tests/test_metrics.py).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

SCENARIOS = {
    # name: (shape, spacing, structure radius in voxels)
    "hippocampus crop 40x56x40": ((40, 56, 40), (1.0, 1.0, 1.0), 8),
    "CT 256x256x128, large organ": ((256, 256, 128), (0.8, 0.8, 2.5), 60),
    "CT 512x512x96, small lesion": ((512, 512, 96), (0.7, 0.7, 3.0), 6),
}


def _masks(shape, radius, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    centre = [s // 2 for s in shape]
    d2 = sum(((g - c) / (radius * f)) ** 2 for g, c, f in zip(grid, centre, (1.0, 1.2, 0.8)))
    ref = np.zeros(shape, dtype=np.uint8)
    ref[d2 <= 1] = 1
    ref[(d2 <= 1) & (grid[0] > centre[0])] = 2
    pred = np.roll(ref, 1, axis=0)
    lo = [int(c + radius * 1.1) for c in centre]
    r = max(2, radius // 4)
    sl = tuple(slice(min(a, s - r - 1), min(a, s - r - 1) + r) for a, s in zip(lo, shape))
    pred[sl] = 2
    pred[tuple(rng.integers(0, s, 20) for s in shape)] = 1  # scattered false positives
    return pred, ref


def run_medseg(pred, ref, spacing, tol):
    from medseg.metrics import compute_metrics

    res = compute_metrics(pred, ref, spacing, [1, 2], nsd_tolerance_mm=tol)
    return {c: {k: res[c][k] for k in ("dice", "hd95_mm", "assd_mm", "nsd")} for c in (1, 2)}


def run_monai(pred, ref, spacing, tol):
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    def onehot(a):
        return torch.from_numpy(np.stack([a == c for c in (0, 1, 2)])[None].astype(np.float32))

    p, r = onehot(pred), onehot(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = compute_dice(p, r, include_background=False)
        hd = compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing))
        assd = compute_average_surface_distance(p, r, symmetric=True, spacing=list(spacing))
        nsd = compute_surface_dice(p, r, class_thresholds=[tol, tol], spacing=list(spacing))
    return {c: {"dice": float(dice[0, c - 1]), "hd95_mm": float(hd[0, c - 1]), "assd_mm": float(assd[0, c - 1]),
                "nsd": float(nsd[0, c - 1])} for c in (1, 2)}


def _best(fn, repeats, *args):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"{'scenario':<30}{'medseg s':>10}{'MONAI s':>10}{'speed-up':>10}{'max |diff|':>12}")
    for name, (shape, spacing, radius) in SCENARIOS.items():
        pred, ref = _masks(shape, radius)
        tm, ours = _best(run_medseg, a.repeats, pred, ref, spacing, a.tolerance)
        tt, theirs = _best(run_monai, a.repeats, pred, ref, spacing, a.tolerance)
        diff = max(abs(ours[c][k] - theirs[c][k]) for c in (1, 2) for k in ours[c])
        print(f"{name:<30}{tm:>10.3f}{tt:>10.3f}{tt / tm:>9.1f}x{diff:>12.1e}")


if __name__ == "__main__":
    main()
