"""Patches per second: medseg's cached PatchLoader vs MONAI LoadImaged + RandCropByPosNegLabeld on hippocampus.

Same patch (the plan's 3d_fullres patch, 40x56x40), batch size and worker count for every row; one run prints
the table with ratios to the plain MONAI pipeline. The "Compose" rows put medseg's MONAI transforms
(``LoadVolumed`` + ``PreprocessFromPland``, cached by MONAI's ``CacheDataset``) in front of the same
``RandCropByPosNegLabeld`` as the MONAI rows (1/3 foreground-centred patches, as the PatchLoader samples); the
"+ indices" row caches the foreground/background voxel lists too (``FgBgToIndicesd``), as the PatchLoader's cache
does. Usage::

    python benchmarks/bench_loader.py [--data ../shared/data/hippocampus] [--rounds 3] [--seconds 3] [--workers 0] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def _interleaved(rows: dict[str, object], batch_size: int, rounds: int, seconds: float) -> dict[str, float]:
    """Patches/s of each row, measured in ``rounds`` rounds that give every row ``seconds`` in turn (so a busy
    machine slows every row alike)."""
    its = {name: iter(it) for name, it in rows.items()}
    for it in its.values():
        next(it)  # warm-up: worker start, first file opens
    done = dict.fromkeys(its, 0)
    spent = dict.fromkeys(its, 0.0)
    for _ in range(rounds):
        for name, it in its.items():
            t = time.perf_counter()
            while time.perf_counter() - t < seconds:
                next(it)
                done[name] += batch_size
            spent[name] += time.perf_counter() - t
    return {name: done[name] / spent[name] for name in its}


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


def compose_cache(manifest, plan, patch):
    """medseg's loading and preprocessing transforms (+ foreground/background indices) in one MONAI CacheDataset."""
    from monai.data import CacheDataset
    from monai.transforms import Compose, FgBgToIndicesd, SpatialPadd

    from medseg.transforms import LoadVolumed, PreprocessFromPland

    files = [{"image": str(c.images[0]), "label": str(c.label)} for c in manifest.cases]
    det = [LoadVolumed(["image", "label"]), PreprocessFromPland(plan, "3d_fullres"),
           SpatialPadd(keys=["image", "label"], spatial_size=patch, mode="reflect"),
           FgBgToIndicesd(keys="label", fg_postfix="_fg", bg_postfix="_bg")]
    return CacheDataset(files, Compose(det), progress=False, num_workers=1), det


def compose_loader(cache, det, patch, batch_size: int, workers: int, indices: bool, augment: bool):
    """The cached items through MONAI's crop (with the cached indices or without) and, per sample, medseg's
    augmentation transforms; copied per access as CacheDataset does."""
    import copy

    from monai.data import DataLoader
    from monai.transforms import Compose, RandCropByPosNegLabeld, SelectItemsd

    from medseg.transforms import augmentation_transforms

    crop = {"fg_indices_key": "label_fg", "bg_indices_key": "label_bg"} if indices else {}
    rand = [RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch, pos=1, neg=2,
                                   num_samples=1, **crop), SelectItemsd(keys=["image", "label"])]
    if augment:
        rand += augmentation_transforms({})
    ds = copy.copy(cache)  # the same cached prefix, another random part
    ds.transform = Compose(det + rand)
    ds.transform.set_random_state(0)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)

    def forever():
        while True:
            for b in loader:
                yield {k: b[k] for k in ("image", "label")}
    return forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hippocampus"))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per row and round")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--cache", default=None, help="preprocessed cache root (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
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

    def medseg(aug: dict | None):
        return PatchLoader(out, ids, patch_size=patch, batch_size=bs, spatial_dims=3, augmentation=aug,
                           num_workers=args.workers, num_batches=10**6).epoch(0)

    bias = {"name": "RandBiasFieldd", "kwargs": {"keys": ["image"], "prob": 0.3}}
    t = time.perf_counter()
    cache, det = compose_cache(manifest, plan, patch)
    compose_prep = time.perf_counter() - t
    rates = _interleaved({
        "MONAI LoadImaged+RandCropByPosNegLabeld": monai_loader(manifest, patch, bs, args.workers, False),
        "MONAI same, CacheDataset (decoded in RAM)": monai_loader(manifest, patch, bs, args.workers, True),
        "medseg Compose, CacheDataset, same crop": compose_loader(cache, det, patch, bs, args.workers, False,
                                                                  False),
        "medseg Compose, CacheDataset + cached indices": compose_loader(cache, det, patch, bs, args.workers, True,
                                                                        False),
        "medseg Compose + indices + medseg aug transforms": compose_loader(cache, det, patch, bs, args.workers,
                                                                           True, True),
        "medseg PatchLoader, crop + fg oversampling": medseg(None),
        "medseg PatchLoader + default augmentation": medseg({}),
        "medseg PatchLoader + default aug + RandBiasFieldd": medseg({"extra": [bias]}),
    }, bs, args.rounds, args.seconds)
    rows = list(rates.items())
    base = rows[0][1]
    print(f"hippocampus, {len(ids)} cases, patch {'x'.join(map(str, patch))}, batch {bs}, workers {args.workers}, "
          f"torch threads {torch.get_num_threads()}; medseg cache built once in {prep:.1f} s, the Compose rows' "
          f"CacheDataset in {compose_prep:.1f} s; {args.rounds} interleaved rounds of {args.seconds:g} s per row")
    print(f"{'pipeline':<50} {'patches/s':>10} {'vs MONAI':>9}")
    for name, r in rows:
        print(f"{name:<50} {r:>10.1f} {r / base:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
