"""Soak: predict thousands of tiny cases in one process and check that resident memory stays flat.

A leak per case (a cache keyed by image shape, tensors kept by a hook, results piling up) is invisible on one
case and fatal on a night's batch. This script writes N tiny synthetic NIfTI cases of varying shapes, predicts
them through the public API that ``medseg predict`` runs (``Predictor.from_run`` + ``medseg.inference.batch``),
reads the process's resident set size (RSS) after every case and reports its growth after a warm-up.

The model is the frozen run folder ``tests/data/run_v1`` (a tiny two-fold 3D U-Net trained by ``medseg
crossval`` on demo data), copied to the work folder with a ``postprocessing.json`` that enables every
post-processing step, so each case goes through reading, preprocessing, a two-fold ensemble with test-time
mirroring, restoring the input grid, post-processing and an atomic NIfTI write.

    python benchmarks/soak_predict.py --cases 2000 --warmup 100          # the issue's check (< 50 MB)

RSS is read from /proc/self/statm, so the script runs on Linux only. Run it as its own process: in a process that
has already freed much memory (a test session), new allocations reuse resident pages and a leak hides from RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FROZEN_RUN = ROOT / "tests" / "data" / "run_v1"
POSTPROCESSING = {"largest_foreground": False, "largest_per_class": [1, 2], "min_size_voxels": 3,
                  "min_size_mm3": 0.0, "fill_holes": [1]}


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_run(dest: Path) -> Path:
    """Copy the frozen tiny run folder to ``dest`` and enable post-processing in the copy."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(FROZEN_RUN, dest)
    (dest / "postprocessing.json").write_text(json.dumps({"version": 1, "setting": POSTPROCESSING, "report": {}}))
    return dest


def make_cases(folder: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` tiny NIfTI images (8-15 voxels per axis, oblique affines, 0.9-1.4 mm, so each case is one
    sliding window of the run's 16^3 patch): a bright and a dark blob in noise."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = tuple(int(s) for s in rng.integers(8, 16, 3))
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        image = rng.normal(0, 0.3, shape)
        image[((grid - 0.3) ** 2).sum(0) < 0.2] += 2.0
        image[((grid + 0.3) ** 2).sum(0) < 0.15] -= 2.0
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        affine = np.eye(4)
        affine[:3, :3] = q * rng.uniform(0.9, 1.4, 3)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / f"case_{i:05d}.nii.gz")
    return folder


@dataclass
class SoakResult:
    """RSS after each case (MB), seconds per case, and the statuses seen."""

    rss: list[float]
    seconds: list[float]
    statuses: dict[str, int]

    def growth(self, warmup: int) -> float:
        """RSS after the last case minus RSS after case ``warmup`` (1-based), in MB."""
        return self.rss[-1] - self.rss[warmup - 1]

    def peak_growth(self, warmup: int) -> float:
        """Largest RSS after case ``warmup`` minus RSS at case ``warmup``, in MB."""
        return max(self.rss[warmup - 1:]) - self.rss[warmup - 1]


def soak(run_dir: Path, inputs: Path, outputs: Path, *, threads: int = 1,
         on_case: Callable[[object], None] | None = None, **options: Any) -> SoakResult:
    """Predict every case of ``inputs`` into ``outputs`` in this process, reading RSS after each case.

    Args:
        run_dir: the run folder.
        inputs: folder of cases.
        outputs: output folder.
        threads: torch threads while it runs (restored after).
        on_case: also called with each case result (the test uses it to plant a leak and see it measured).
        **options: for :meth:`Predictor.from_run` (``folds``, ``tta``, ...); default: the run's folds, TTA.

    Returns:
        The RSS series.
    """
    import torch

    from medseg.inference import Predictor
    from medseg.inference.batch import discover_cases, predict_cases, write_report

    rss, seconds = [], []

    def record(res) -> None:
        if on_case is not None:
            on_case(res)
        rss.append(rss_mb())
        seconds.append(res.seconds)

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictor = Predictor.from_run(run_dir, device="cpu", **options)
        results = predict_cases(predictor, discover_cases(inputs, in_channels=1), outputs, on_case=record)
    finally:
        torch.set_num_threads(old_threads)
    write_report(outputs, results, {"model": str(run_dir)})
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return SoakResult(rss, seconds, statuses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100, help="growth is measured from this case on")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--folds", type=int, nargs="+", default=None, help="folds to ensemble (default: both)")
    p.add_argument("--no-tta", action="store_true", help="no test-time mirroring")
    p.add_argument("--leak-mb", type=float, default=0.0,
                   help="keep this many MB per case (a planted leak, to check that the measurement sees one)")
    p.add_argument("--leak-after", type=int, default=0, help="plant the leak only after this many cases")
    p.add_argument("--json", type=Path, default=None, help="also write the RSS series here")
    a = p.parse_args()
    seen: list[np.ndarray | None] = []

    def leak(_) -> None:
        keep = len(seen) >= a.leak_after
        seen.append(np.full(int(a.leak_mb * 2**17), 1.0) if keep else None)   # float64, written: resident

    options: dict[str, Any] = {"folds": a.folds, "tta": not a.no_tta}
    if a.leak_mb:
        options["on_case"] = leak
    work = Path(tempfile.mkdtemp(prefix="medseg_soak_")) if a.work is None else a.work
    try:
        t0 = time.perf_counter()
        make_cases(work / "in", a.cases)
        run = make_run(work / "run")
        made = time.perf_counter() - t0
        res = soak(run, work / "in", work / "out", threads=a.threads, **options)
        if a.json is not None:
            a.json.write_text(json.dumps(dataclasses.asdict(res)))
        marks = sorted({1, 10, a.warmup, *range(0, a.cases + 1, max(1, a.cases // 10))} - {0})
        print(f"{a.cases} cases (made in {made:.0f} s), {a.threads} torch thread(s), statuses {res.statuses}, "
              f"median {np.median(res.seconds) * 1000:.0f} ms per case")
        print("case   RSS MB")
        for m in marks:
            print(f"{m:>5} {res.rss[m - 1]:>8.1f}")
        print(f"growth from case {a.warmup} to case {a.cases}: {res.growth(a.warmup):+.1f} MB "
              f"(largest excursion {res.peak_growth(a.warmup):+.1f} MB)")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
