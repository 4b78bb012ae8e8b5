"""Post-processing: medseg (cc3d) vs scikit-image ``measure.label`` + NumPy, on the same label maps.

Two operations, both checked for identical results:

* largest connected component per class (26-connectivity), as ``postprocess(largest_per_class=...)`` does;
* removal of components under N voxels, as ``postprocess(min_size_voxels=N)`` does.

The label map is smoothed noise thresholded into 2 classes: many components of all sizes (a hard case).

    python benchmarks/bench_postprocess.py                  # 192^3
    python benchmarks/bench_postprocess.py --shape 512 512 300
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from scipy import ndimage


def make_label(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    lab = np.zeros(shape, np.uint8)
    lab[noise > 0.05] = 1
    lab[noise < -0.08] = 2
    return lab


def skimage_largest_per_class(lab, classes):
    from skimage.measure import label

    out = lab.copy()
    for c in classes:
        cc = label(lab == c, connectivity=3)
        if cc.max() == 0:
            continue
        sizes = np.bincount(cc.ravel())
        sizes[0] = 0
        out[(cc > 0) & (cc != sizes.argmax())] = 0
    return out


def skimage_remove_small(lab, n):
    from skimage.measure import label

    out = lab.copy()
    for c in np.unique(lab[lab > 0]):
        cc = label(lab == c, connectivity=3)
        sizes = np.bincount(cc.ravel())
        small = sizes < n
        small[0] = False
        out[small[cc]] = 0
    return out


def timed(fn, repeats):
    best, peak, out = float("inf"), 0, None
    for _ in range(repeats):
        tracemalloc.start()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return best, peak / 2**20, out


def main() -> None:
    from medseg.inference.postprocess import PostprocessSetting, postprocess

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[192, 192, 192])
    p.add_argument("--min-size", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    lab = make_label(tuple(a.shape))
    vox = lab.size
    cases = [
        ("largest per class", lambda: postprocess(lab, PostprocessSetting(largest_per_class=(1, 2))),
         lambda: skimage_largest_per_class(lab, (1, 2))),
        (f"remove < {a.min_size} vox", lambda: postprocess(lab, PostprocessSetting(min_size_voxels=a.min_size)),
         lambda: skimage_remove_small(lab, a.min_size)),
    ]
    print(f"label map {a.shape} ({vox / 1e6:.1f} Mvox), best of {a.repeats}; peak = Python-traced allocations")
    print(f"{'operation':<20} {'tool':<9} {'seconds':>8} {'Mvox/s':>8} {'speed-up':>9} {'peak MB':>8} {'same':>5}")
    for name, ours, theirs in cases:
        t1, m1, o1 = timed(ours, a.repeats)
        t2, m2, o2 = timed(theirs, a.repeats)
        same = bool(np.array_equal(o1, o2))
        print(f"{name:<20} {'cc3d':<9} {t1:>8.3f} {vox / t1 / 1e6:>8.1f} {t2 / t1:>8.1f}x {m1:>8.0f} {str(same):>5}")
        print(f"{'':<20} {'skimage':<9} {t2:>8.3f} {vox / t2 / 1e6:>8.1f} {'1.0x':>9} {m2:>8.0f}")


if __name__ == "__main__":
    main()
