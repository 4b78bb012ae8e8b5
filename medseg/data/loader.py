"""Preprocessed cache and the fast patch loader.

``preprocess_dataset`` writes every case once in plan space as memory-mappable ``.npy`` files under
``cache_root/<plan_hash>/<config>/`` (reused when present). ``PatchLoader`` then samples patches straight from the
memory maps: per sample only a crop (mirrored padding where the case is smaller than the patch) -- a third of the
patches centred on a random foreground class -- and per batch the torch augmentation of
:func:`medseg.transforms.augment.augment_batch` (in the loader on CPU, or by the trainer on its device).
Randomness: every worker draws from ``SeedSequence([seed, fold, epoch, worker])``.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.planning.schema import Plan

__all__ = ["preprocess_dataset", "preprocess_case", "cache_folder", "PatchLoader", "FG_LOCATIONS_PER_CLASS"]

log = logging.getLogger(__name__)

#: Foreground voxel locations kept per class and case for oversampling.
FG_LOCATIONS_PER_CLASS = 2000


def _class_locations(seg: np.ndarray, classes: Sequence[int], seed: int) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[int]]] = {}
    for c in classes:
        idx = np.argwhere(seg[0] == c)
        if len(idx) > FG_LOCATIONS_PER_CLASS:
            idx = idx[np.sort(rng.choice(len(idx), FG_LOCATIONS_PER_CLASS, replace=False))]
        out[str(c)] = idx.astype(int).tolist()
    return out


def preprocess_case(case: Any, plan: Plan, config_name: str, out_dir: Path) -> str:
    """Preprocess one case into ``out_dir`` (image ``.npy``, label ``_seg.npy``, props ``.json`` written last).

    Args:
        case: a :class:`medseg.data.manifest.Case`.
        plan: the plan.
        config_name: configuration to preprocess for.
        out_dir: the cache folder of this plan and configuration.

    Returns:
        The case id.
    """
    from medseg.io import atomic_path
    from medseg.transforms.case import load_case
    from medseg.transforms.preprocess import preprocess_volume

    image, label = load_case(list(case.images), case.label, getattr(case, "label_names", None))
    img, seg, props = preprocess_volume(image, plan, config_name, label)
    with atomic_path(out_dir / f"{case.case_id}.npy") as tmp:
        np.save(tmp, img)
    if seg is not None:
        with atomic_path(out_dir / f"{case.case_id}_seg.npy") as tmp:
            np.save(tmp, seg)
        # the foreground classes (with regions: those of the regions' union); never the ignore index
        classes = sorted({c for r in plan.region_classes() for c in r}) or range(1, plan.num_classes)
        props["foreground"] = _class_locations(seg, classes, zlib.crc32(case.case_id.encode()))
    props["case_id"] = case.case_id
    props["has_label"] = seg is not None
    with atomic_path(out_dir / f"{case.case_id}.json") as tmp:
        Path(tmp).write_text(json.dumps(props))
    return case.case_id


def cache_folder(cache_root: str | Path, plan: Plan | Mapping[str, Any], config_name: str) -> Path:
    """``cache_root/<plan_hash>/<config_name>``: where :func:`preprocess_dataset` writes a plan's configuration."""
    from medseg.planning import plan_hash

    return Path(cache_root) / plan_hash(Plan.coerce(plan)) / config_name


def preprocess_dataset(manifest: Any, plan: Plan | Mapping[str, Any], config_name: str, cache_root: str | Path,
                       num_workers: int = 1, *, shard: tuple[int, int] | None = None) -> Path:
    """Preprocess every case of ``manifest`` once; cases already in the cache are reused.

    Args:
        manifest: the data set's :class:`~medseg.data.manifest.Manifest`.
        plan: the plan (its :func:`~medseg.planning.plan_hash` names the cache folder).
        config_name: configuration, e.g. ``"3d_fullres"``.
        cache_root: root folder of preprocessed caches.
        num_workers: processes to use (1 = in this process).
        shard: ``(i, n)``: only the cases ``i, i + n, ...`` of the manifest (one torchrun rank's share; the
            ranks together fill the cache, each case's files written atomically by exactly one of them).

    Returns:
        ``cache_root/<plan_hash>/<config_name>``, holding ``<case>.npy``, ``<case>_seg.npy``, ``<case>.json`` and
        ``config.json`` (the configuration and plan-level keys the loader needs).

    Raises:
        ConfigError: unknown configuration. InputError: unreadable case files.
    """
    from medseg.io import atomic_path

    plan = Plan.coerce(plan)
    cfg = plan.configuration(config_name)
    out = cache_folder(cache_root, plan, config_name)
    out.mkdir(parents=True, exist_ok=True)
    cases = list(manifest.cases) if shard is None else list(manifest.cases)[shard[0]::shard[1]]
    todo = []
    for case in cases:
        done = (out / f"{case.case_id}.json").exists() and (out / f"{case.case_id}.npy").exists()
        if not done or (case.label is not None and not (out / f"{case.case_id}_seg.npy").exists()):
            todo.append(case)
    log.info("preprocessing %d of %d cases into %s (%d cached%s)", len(todo), len(cases), out, len(cases) - len(todo),
             "" if shard is None else f"; share {shard[0]} of {shard[1]}")
    if num_workers > 1 and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(num_workers) as pool:
            list(pool.map(preprocess_case, todo, [plan] * len(todo), [config_name] * len(todo), [out] * len(todo)))
    else:
        for case in todo:
            preprocess_case(case, plan, config_name, out)
    info = {"config_name": config_name, "configuration": cfg.to_dict(), "num_classes": plan.num_classes,
            "in_channels": plan.in_channels, "spatial_dims": plan.spatial_dims}
    cfg_path = out / "config.json"
    if not cfg_path.exists() or json.loads(cfg_path.read_text()) != info:
        with atomic_path(cfg_path) as tmp:
            Path(tmp).write_text(json.dumps(info, indent=2))
    return out


def _crop_bounds(rng: np.random.Generator, shape: tuple[int, ...], patch: tuple[int, ...],
                 center: np.ndarray | None) -> list[int]:
    """Lower corner of a patch: inside the case when it fits, else the case lies randomly inside the patch."""
    lows = []
    for ax, (n, p) in enumerate(zip(shape, patch)):
        a, b = (0, n - p) if n >= p else (n - p, 0)
        if center is None:
            lows.append(int(rng.integers(a, b + 1)))
        else:
            lows.append(int(np.clip(int(center[ax]) - p // 2, a, b)))
    return lows


def _crop(arr: np.ndarray, lows: list[int], patch: tuple[int, ...]) -> np.ndarray:
    """Crop ``arr`` (C, *spatial) at ``lows`` with mirrored (reflect) padding outside the array."""
    shape = arr.shape[1:]
    sl, pads = [slice(None)], [(0, 0)]
    for lo, p, n in zip(lows, patch, shape):
        a, b = max(lo, 0), min(lo + p, n)
        sl.append(slice(a, b))
        pads.append((a - lo, lo + p - b))
    out = np.asarray(arr[tuple(sl)])
    if any(x or y for x, y in pads):
        out = np.pad(out, pads, mode="reflect" if min(out.shape[1:]) > 1 else "edge")
    return out


class PatchLoader:
    """Batches of patches from a preprocessed cache, with foreground oversampling and seeded augmentation.

    Args:
        cache_dir: folder returned by :func:`preprocess_dataset`.
        case_ids: cases to sample from (e.g. a fold's training cases).
        patch_size: patch per axis (2 values for a 2D configuration, also of 3D data).
        batch_size: patches per batch.
        spatial_dims: 2 or 3: dimensionality of the patches; 2 with 3D cached cases samples 2D slices across
            ``slice_axis``.
        slice_axis: the data axis that 2D patches of 3D cases are taken across (required exactly then).
        oversample_foreground: fraction of each batch (its last samples) centred on a random foreground class.
        augmentation: :data:`~medseg.transforms.augment.DEFAULT_AUGMENTATION` overrides; None = no augmentation.
        seed: base seed; fold: fold index (both enter every worker's seed).
        num_workers: worker processes (0 = in this process).
        num_batches: batches per epoch.
        augment_in_loader: apply ``augment_batch`` here on CPU; set False when the trainer augments on its GPU
            (then call ``augment_batch(..., loader.generator(epoch, device))`` there).
        previous_dir: a cascade stage's previous-stage maps (``<case>.npy``, class indices on the cached case's
            grid, :func:`medseg.training.cascade.prepare_previous_stage`). Each patch's map is cropped with it and
            carried through augmentation as a second label channel, then moved into the image as one-hot channels
            (:func:`medseg.transforms.cascade.attach_previous`; with ``augment_in_loader=False`` the batch keeps the
            two label channels and the trainer attaches them after augmenting).
        num_classes: classes of the plan (required with ``previous_dir``).

    Raises:
        InputError: a case is missing from the cache, or patch dims do not fit the cached data.
    """

    def __init__(self, cache_dir: str | Path, case_ids: list[str], *, patch_size: list[int] | tuple[int, ...],
                 batch_size: int, spatial_dims: int, oversample_foreground: float = 1 / 3,
                 augmentation: dict | None = None, seed: int = 0, fold: int = 0, num_workers: int = 0,
                 num_batches: int = 250, augment_in_loader: bool = True, slice_axis: int | None = None,
                 previous_dir: str | Path | None = None, num_classes: int | None = None):
        self.cache_dir = Path(cache_dir)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.spatial_dims = int(spatial_dims)
        self.oversample_foreground = float(oversample_foreground)
        self.augmentation = augmentation
        self.seed, self.fold = int(seed), int(fold)
        self.num_workers = int(num_workers)
        self.num_batches = int(num_batches)
        self.augment_in_loader = bool(augment_in_loader)
        self.previous_dir = None if previous_dir is None else Path(previous_dir)
        self.num_classes = None if num_classes is None else int(num_classes)
        if self.previous_dir is not None and self.num_classes is None:
            raise ValueError("PatchLoader(previous_dir=...) needs num_classes")
        if not self.case_ids:
            raise InputError(self.cache_dir, "no cases given to the patch loader", "at least one case id")
        if len(self.patch_size) != self.spatial_dims:
            raise InputError(self.cache_dir, f"patch_size {self.patch_size} has {len(self.patch_size)} axes",
                             f"{self.spatial_dims} axes")
        if self.augmentation is not None:
            from medseg.transforms.augment import resolve_params

            resolve_params(self.augmentation)  # fail on unknown keys now, not mid-epoch
        self.slice_axis: int | None = None
        self.props: dict[str, dict] = {}
        for cid in self.case_ids:
            pj, img, seg = (self.cache_dir / f"{cid}{s}" for s in (".json", ".npy", "_seg.npy"))
            if not (pj.exists() and img.exists() and seg.exists()):
                raise InputError(pj, f"case {cid!r} is missing from the preprocessed cache",
                                 "run `medseg preprocess` (or preprocess_dataset) for these cases first")
            self.props[cid] = json.loads(pj.read_text())
            if self.previous_dir is not None and not (self.previous_dir / f"{cid}.npy").exists():
                raise InputError(self.previous_dir / f"{cid}.npy", f"case {cid!r} has no previous-stage map",
                                 "the previous stage's out-of-fold prediction of every case (train all its folds)")
        data_dims = len(self.props[self.case_ids[0]]["shape"])
        if self.spatial_dims == 2 and data_dims == 3:
            if slice_axis not in (0, 1, 2):
                raise InputError(self.cache_dir, f"holds 3D cases for 2D patches but slice_axis is {slice_axis!r}",
                                 "the configuration's slice_axis (0, 1 or 2)")
            self.slice_axis = int(slice_axis)
        elif self.spatial_dims != data_dims:
            raise InputError(self.cache_dir, f"holds {data_dims}D cases", f"{self.spatial_dims}D patches")
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}

    @property
    def attaches_previous(self) -> bool:
        """True when batches carry a previous stage's map (a cascade stage)."""
        return self.previous_dir is not None

    # --------------------------------------------------------------- sampling
    def _arrays_of(self, cid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if cid not in self._arrays:  # opened lazily, so each worker process maps its own
            prev = (None if self.previous_dir is None else
                    np.load(self.previous_dir / f"{cid}.npy", mmap_mode="r"))
            self._arrays[cid] = (np.load(self.cache_dir / f"{cid}.npy", mmap_mode="r"),
                                 np.load(self.cache_dir / f"{cid}_seg.npy", mmap_mode="r"), prev)
        return self._arrays[cid]

    def _sample(self, rng: np.random.Generator, force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
        """One patch: the image crop, and the label crop (with a cascade stage's previous-stage map as a
        second channel)."""
        cid = self.case_ids[int(rng.integers(len(self.case_ids)))]
        img, seg, prev = self._arrays_of(cid)
        center = None
        if force_fg:
            fg = {k: v for k, v in self.props[cid].get("foreground", {}).items() if v}
            if fg:
                cls = sorted(fg)[int(rng.integers(len(fg)))]
                locs = fg[cls]
                center = np.asarray(locs[int(rng.integers(len(locs)))])
        if self.slice_axis is not None:
            ax = self.slice_axis
            n = img.shape[1 + ax]
            s = int(center[ax]) if center is not None else int(rng.integers(n))
            img, seg = np.take(img, s, axis=1 + ax), np.take(seg, s, axis=1 + ax)
            prev = None if prev is None else np.take(prev, s, axis=1 + ax)
            if center is not None:
                center = np.delete(center, ax)
        lows = _crop_bounds(rng, img.shape[1:], self.patch_size, center)
        lab = _crop(seg, lows, self.patch_size)
        if prev is not None:
            lab = np.concatenate([lab, _crop(prev, lows, self.patch_size).astype(lab.dtype)], axis=0)
        return _crop(img, lows, self.patch_size), lab

    def _batch(self, rng: np.random.Generator, gen: Any) -> dict[str, Any]:
        import torch

        n_random = int(round(self.batch_size * (1.0 - self.oversample_foreground)))
        pairs = [self._sample(rng, i >= n_random) for i in range(self.batch_size)]
        image = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32, copy=False))
        label = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        if self.augmentation is not None and self.augment_in_loader:
            from medseg.transforms.augment import augment_batch, single_threaded

            with single_threaded():  # the default chain and any ``extra`` transforms
                image, label = augment_batch(image, label, self.augmentation, gen)
        if self.previous_dir is not None and (self.augment_in_loader or self.augmentation is None):
            from medseg.transforms.cascade import attach_previous

            assert self.num_classes is not None
            image, label = attach_previous(image, label, self.num_classes,
                                           gen if self.augmentation is not None else None)
        return {"image": image, "label": label}

    def generator(self, epoch: int, device: Any = "cpu", worker: int = 0) -> Any:
        """The torch generator of (seed, fold, epoch, worker), for augmenting on the trainer's device."""
        from medseg.transforms.augment import make_generator

        return make_generator(self.seed, self.fold, epoch, worker, device)

    def iter_worker(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The batches worker ``worker`` of ``num_workers`` produces in ``epoch`` (its share, in order)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.fold, int(epoch), int(worker)]))
        gen = self.generator(epoch, "cpu", worker)
        for _ in range(worker, self.num_batches, max(1, num_workers)):
            yield self._batch(rng, gen)

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Iterate over the ``num_batches`` batches of ``epoch``:
        ``{"image": FloatTensor (B, C, *patch), "label": LongTensor (B, 1, *patch)}``."""
        if self.num_workers <= 0:
            yield from self.iter_worker(epoch, 0, 1)
            return
        import torch
        from torch.utils.data import DataLoader, IterableDataset

        loader = self

        class _Epoch(IterableDataset):
            def __iter__(self):
                info = torch.utils.data.get_worker_info()
                wid, n = (0, 1) if info is None else (info.id, info.num_workers)
                return loader.iter_worker(epoch, wid, n)

        yield from DataLoader(_Epoch(), batch_size=None, num_workers=self.num_workers, pin_memory=False,
                              persistent_workers=False, prefetch_factor=4)

    def __len__(self) -> int:
        return self.num_batches
