"""Post-processing at CT scale: medseg vs the implementation it replaced vs a plain scikit-image loop.

Four operations, each checked for identical label maps across the tools that run it:

* largest connected component per class (full connectivity), as ``postprocess(largest_per_class=...)``;
* removal of components under N voxels (per class), as ``postprocess(min_size_voxels=N)``;
* largest component of all foreground together, as ``postprocess(largest_foreground=True)``;
* filling of holes enclosed by one class, as ``postprocess(fill_holes=...)`` (no scikit-image row: it has no
  function with these semantics, so the row compares medseg with the implementation it replaced).

Scenes (``--scene``): ``ct`` (default) is a two-class label map of CT size with realistic blobs: a large organ,
two kidney-sized blobs of class 2 (so "largest per class" removes a large component too), 40 medium islands
and 20,000 scattered specks of 1-27 voxels, with enclosed holes; ``noise`` is smoothed noise thresholded into
two classes (components of all sizes everywhere, the hard case of earlier versions of this script).

The tools run in interleaved rounds in one process (medseg, previous, scikit-image, then again), best of
``--rounds``, so the ratios hold on a loaded machine where absolute times do not.

    python benchmarks/bench_postprocess.py                               # 300x512x512, the CT scene
    python benchmarks/bench_postprocess.py --scene noise --shape 192 192 192

``previous_*`` below are the functions of medseg/inference/postprocess.py before the foreground-index rewrite,
frozen here as the reference that tests/test_postprocess.py compares the current ones with.
"""

from __future__ import annotations

import argparse
import platform
import time
import tracemalloc
from collections.abc import Callable, Iterable

import numpy as np
from scipy import ndimage


# --------------------------------------------------------------------------------------------- scenes
def _blob(lab: np.ndarray, rng: np.random.Generator, center, radii, value: int, wobble: float = 0.15) -> None:
    """Paint an ellipsoid with a low-frequency bumpy surface (in its bounding box only)."""
    lo = [max(0, int(c - r * (1 + wobble)) - 1) for c, r in zip(center, radii)]
    hi = [min(n, int(c + r * (1 + wobble)) + 2) for c, r, n in zip(center, radii, lab.shape)]
    if any(b - a < 1 for a, b in zip(lo, hi)):
        return
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.ogrid[box]
    d = sum((((g - c) / r) ** 2).astype(np.float32) for g, c, r in zip(grids, center, radii))
    coarse = ndimage.gaussian_filter(rng.normal(size=[max(2, (b - a) // 16) for a, b in zip(lo, hi)]), 1.0)
    coarse /= np.abs(coarse).max() + 1e-9
    bump = ndimage.zoom(coarse.astype(np.float32), [(b - a) / c for a, b, c in zip(lo, hi, coarse.shape)], order=1)
    bump = bump[tuple(slice(0, b - a) for a, b in zip(lo, hi))]
    lab[box][d < (1 + wobble * bump) ** 2] = value


def make_ct_label(shape=(300, 512, 512), seed: int = 0, specks: int = 20000) -> np.ndarray:
    """A two-class CT-like label map: organs, islands, scattered specks and enclosed holes (see the docstring)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    s = np.asarray(shape, float)
    _blob(lab, rng, s * [0.5, 0.45, 0.35], s * [0.3, 0.25, 0.22], 1)      # a liver-sized organ
    _blob(lab, rng, s * [0.5, 0.7, 0.72], s * [0.12, 0.08, 0.07], 2)      # a kidney ...
    _blob(lab, rng, s * [0.45, 0.7, 0.28], s * [0.11, 0.07, 0.06], 2)     # ... and a smaller one
    for _ in range(40):                                                   # medium false-positive islands
        _blob(lab, rng, rng.uniform(0, 1, 3) * s, rng.uniform(2, 12, 3), int(rng.integers(1, 3)))
    for _ in range(30):                                                   # holes inside the organs
        _blob(lab, rng, s * [0.5, 0.45, 0.35] + rng.normal(0, 0.05, 3) * s, rng.uniform(1, 4, 3), 0)
    pos = (rng.uniform(0, 1, (specks, 3)) * s).astype(int)                # scattered specks, 1-27 voxels
    size = rng.integers(1, 4, (specks, 3))
    for p, w, c in zip(pos, size, rng.integers(1, 3, specks)):
        lab[p[0]:p[0] + w[0], p[1]:p[1] + w[1], p[2]:p[2] + w[2]] = c
    return lab


def make_noise_label(shape, seed: int = 0) -> np.ndarray:
    """Smoothed noise thresholded into two classes: many components of all sizes."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    lab = np.zeros(shape, np.uint8)
    lab[noise > 0.05] = 1
    lab[noise < -0.08] = 2
    return lab


# --------------------------------------------------------------------------------------------- scikit-image loops
def skimage_largest_per_class(lab: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    from skimage.measure import label

    out = lab.copy()
    for c in classes:
        cc = label(lab == c, connectivity=lab.ndim)
        if cc.max() == 0:
            continue
        sizes = np.bincount(cc.ravel())
        sizes[0] = 0
        out[(cc > 0) & (cc != sizes.argmax())] = 0
    return out


def skimage_remove_small(lab: np.ndarray, n: int) -> np.ndarray:
    from skimage.measure import label

    out = lab.copy()
    for c in np.unique(lab[lab > 0]):
        cc = label(lab == c, connectivity=lab.ndim)
        small = np.bincount(cc.ravel()) < n
        small[0] = False
        out[small[cc]] = 0
    return out


def skimage_largest_foreground(lab: np.ndarray) -> np.ndarray:
    from skimage.measure import label

    cc = label(lab > 0, connectivity=lab.ndim)
    out = lab.copy()
    if cc.max() > 0:
        sizes = np.bincount(cc.ravel())
        sizes[0] = 0
        out[(cc > 0) & (cc != sizes.argmax())] = 0
    return out


# --------------------------------------------------------------------------------------------- the previous medseg
def _conn(ndim: int, faces: bool = False) -> int:
    return (4 if faces else 8) if ndim == 2 else (6 if faces else 26)


def previous_remove_small_components(label: np.ndarray, min_voxels: int) -> np.ndarray:
    import cc3d

    if min_voxels <= 1:
        return label.copy()
    return cc3d.dust(label, threshold=int(min_voxels), connectivity=_conn(label.ndim), in_place=False)


def previous_keep_largest_component(label: np.ndarray, classes: Iterable[int] | None = None, *,
                                    per_class: bool = False) -> np.ndarray:
    import cc3d

    conn = _conn(label.ndim)
    if not per_class:
        mask = label > 0 if classes is None else np.isin(label, list(classes))
        out = label.copy()
        if mask.any():
            largest = cc3d.largest_k(mask, k=1, connectivity=conn, binary_image=True) > 0
            out[mask & ~largest] = 0
        return out
    wanted = set(int(c) for c in (classes if classes is not None else np.unique(label[label > 0])))
    cc, n = cc3d.connected_components(label, connectivity=conn, return_N=True)
    if n == 0:
        return label.copy()
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    comp_class = np.zeros(n + 1, dtype=np.int64)
    comp_class[cc.ravel()] = label.ravel()
    keep = np.ones(n + 1, dtype=bool)
    for c in wanted:
        ids = np.flatnonzero(comp_class == c)
        ids = ids[ids > 0]
        if ids.size > 1:
            keep[ids] = False
            keep[ids[np.argmax(sizes[ids])]] = True
    return np.where(keep[cc], label, np.zeros((), label.dtype))


def previous_fill_holes(label: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    import cc3d

    classes = set(int(c) for c in classes)
    out = label.copy()
    if not classes:
        return out
    holes, n = cc3d.connected_components(label == 0, connectivity=_conn(label.ndim, faces=True), return_N=True,
                                         binary_image=True)
    if n == 0:
        return out
    border = set()
    for ax in range(label.ndim):
        for idx in (0, -1):
            border.update(np.unique(np.take(holes, idx, axis=ax)).tolist())
    offset = int(label.max()) + 1
    combined = np.where(holes > 0, holes.astype(np.int64) + offset, label.astype(np.int64))
    neighbours: dict[int, set[int]] = {}
    for a, b in cc3d.region_graph(combined, connectivity=_conn(label.ndim, faces=True)):
        for h, other in ((a, b), (b, a)):
            if h >= offset and other < offset:
                neighbours.setdefault(int(h - offset), set()).add(int(other))
    fill = np.zeros(n + 1, dtype=label.dtype)
    for h, nb in neighbours.items():
        if h not in border and len(nb) == 1 and next(iter(nb)) in classes:
            fill[h] = next(iter(nb))
    mask = holes > 0
    out[mask] = fill[holes[mask]]
    return out


# --------------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], np.ndarray]) -> tuple[float, float, np.ndarray]:
    """(seconds, peak Python-traced MB, result) of one call."""
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, out


def _cpu() -> str:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return f"{name}, {sum(ln.startswith('processor') for ln in lines)} CPUs, " + \
        " ".join(sorted(f for f in flags if f.startswith("avx")))


def main() -> None:
    from medseg.inference.postprocess import fill_holes, keep_largest_component, remove_small_components

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    p.add_argument("--scene", choices=["ct", "noise"], default="ct")
    p.add_argument("--min-size", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--operations", nargs="+", default=["largest", "dust", "foreground", "holes"],
                   choices=["largest", "dust", "foreground", "holes"])
    a = p.parse_args()
    t0 = time.perf_counter()
    lab = make_ct_label(tuple(a.shape)) if a.scene == "ct" else make_noise_label(tuple(a.shape))
    made = time.perf_counter() - t0
    n = a.min_size
    ops = {
        "largest": ("largest per class", {
            "medseg": lambda: keep_largest_component(lab, (1, 2), per_class=True),
            "previous": lambda: previous_keep_largest_component(lab, (1, 2), per_class=True),
            "skimage": lambda: skimage_largest_per_class(lab, (1, 2))}),
        "dust": (f"remove < {n} vox", {
            "medseg": lambda: remove_small_components(lab, n),
            "previous": lambda: previous_remove_small_components(lab, n),
            "skimage": lambda: skimage_remove_small(lab, n)}),
        "foreground": ("largest foreground", {
            "medseg": lambda: keep_largest_component(lab),
            "previous": lambda: previous_keep_largest_component(lab),
            "skimage": lambda: skimage_largest_foreground(lab)}),
        "holes": ("fill holes 1, 2", {
            "medseg": lambda: fill_holes(lab, (1, 2)),
            "previous": lambda: previous_fill_holes(lab, (1, 2))}),
    }
    counts = np.bincount(lab.ravel(), minlength=3)
    print(f"scene {a.scene} {tuple(a.shape)} ({lab.size / 1e6:.1f} Mvox, made in {made:.1f} s), voxels per class "
          f"{counts.tolist()}; best of {a.rounds} interleaved rounds")
    print(f"CPU: {_cpu()}; numpy {np.__version__}")
    best: dict[tuple[str, str], tuple[float, float]] = {}
    results: dict[tuple[str, str], np.ndarray] = {}
    for _ in range(a.rounds):
        for key in a.operations:
            for tool, fn in ops[key][1].items():
                sec, peak, out = timed(fn)
                old = best.get((key, tool), (float("inf"), 0.0))
                best[(key, tool)] = (min(old[0], sec), max(old[1], peak))
                results[(key, tool)] = out
                del out
    print(f"{'operation':<20} {'tool':<9} {'seconds':>8} {'Mvox/s':>7} {'vs skimage':>10} {'vs previous':>11} "
          f"{'peak MB':>8} {'same':>5}")
    for key in a.operations:
        name, tools = ops[key]
        ref = results[(key, "previous")]
        for tool in tools:
            sec, peak = best[(key, tool)]
            sk = f"{best[(key, 'skimage')][0] / sec:.1f}x" if "skimage" in tools else "n/a"
            same = bool(np.array_equal(results[(key, tool)], ref))
            print(f"{name:<20} {tool:<9} {sec:>8.3f} {lab.size / sec / 1e6:>7.1f} {sk:>10} "
                  f"{best[(key, 'previous')][0] / sec:>10.1f}x {peak:>8.0f} {str(same):>5}")
            name = ""
    print("same = identical label map to the previous medseg implementation; peak = Python-traced allocations")


if __name__ == "__main__":
    main()
