"""Patches per second: medseg's cached PatchLoader vs MONAI LoadImaged + RandCropByPosNegLabeld on hippocampus.

Same patch (the plan's 3d_fullres patch, 40x56x40), batch size and worker count for every row; one run prints
the table with ratios to the plain MONAI pipeline. Usage::

    python benchmarks/bench_loader.py [--data ../shared/data/hippocampus] [--batches 30] [--workers 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def _rate(iterator, batches: int, batch_size: int) -> float:
    it = iter(iterator)
    next(it)  # warm-up: worker start, first file opens
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        next(it)
        n += batch_size
    return n / (time.perf_counter() - t)


def monai_loader(manifest, patch, batch_size: int, workers: int, cached: bool):
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandCropByPosNegLabeld, SpatialPadd

    files = [{"image": str(c.images[0]), "label": str(c.label)} for c in manifest.cases]
    xf = Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        SpatialPadd(keys=["image", "label"], spatial_size=patch, mode="reflect"),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch, pos=1, neg=2,
                               num_samples=1),
    ])
    xf.set_random_state(0)
    ds = CacheDataset(files, xf, progress=False, num_workers=1) if cached else Dataset(files, xf)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)

    def forever():
        while True:
            yield from loader
    return forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hippocampus"))
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--cache", default=None, help="preprocessed cache root (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    from medseg.data.loader import PatchLoader, preprocess_dataset
    from medseg.data.manifest import load_manifest
    from medseg.planning import fingerprint, make_plan

    if not Path(args.data).exists():
        print(f"data set not found: {args.data}", file=sys.stderr)
        return 1
    manifest = load_manifest(args.data)
    plan = make_plan(fingerprint(manifest))
    cfg = plan.configuration("3d_fullres")
    patch, bs = cfg.patch_size, cfg.batch_size
    cache_root = Path(args.cache or tempfile.mkdtemp(prefix="medseg-bench-"))
    t = time.perf_counter()
    out = preprocess_dataset(manifest, plan, "3d_fullres", cache_root)
    prep = time.perf_counter() - t
    ids = [c.case_id for c in manifest.cases]

    def medseg(aug):
        return PatchLoader(out, ids, patch_size=patch, batch_size=bs, spatial_dims=3, augmentation=aug,
                           num_workers=args.workers, num_batches=10**6).epoch(0)

    rows = []
    rows.append(("MONAI LoadImaged+RandCropByPosNegLabeld", _rate(monai_loader(manifest, patch, bs, args.workers,
                                                                                False), args.batches, bs)))
    rows.append(("MONAI same, CacheDataset (decoded in RAM)", _rate(monai_loader(manifest, patch, bs, args.workers,
                                                                                  True), args.batches, bs)))
    rows.append(("medseg PatchLoader, crop + fg oversampling", _rate(medseg(None), args.batches, bs)))
    rows.append(("medseg PatchLoader + default augmentation", _rate(medseg({}), args.batches, bs)))
    base = rows[0][1]
    print(f"hippocampus, {len(ids)} cases, patch {'x'.join(map(str, patch))}, batch {bs}, workers {args.workers}, "
          f"torch threads {torch.get_num_threads()}; medseg cache built once in {prep:.1f} s")
    print(f"{'pipeline':<46} {'patches/s':>10} {'vs MONAI':>9}")
    for name, r in rows:
        print(f"{name:<46} {r:>10.1f} {r / base:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
