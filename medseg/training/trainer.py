"""One fold's training loop.

The loop is deliberately plain: batches from a callable ``train_batches(epoch)``, the loss, the optimiser with a
progress-driven schedule, mixed precision (bf16 on CPUs that have it, bf16/fp16 on CUDA), gradient clipping,
optional ``torch.compile``; validation with medseg's sliding-window engine every ``val_every`` epochs; the best
checkpoint by the exponentially smoothed validation Dice; early stopping; ``checkpoint_latest.pt`` every
``checkpoint_every`` epochs so that ``resume=True`` continues a killed run where it stopped; metrics.csv,
TensorBoard events and curves.png in the fold folder. Under ``torchrun`` the network is wrapped in DDP; rank 0
validates, logs and writes, and broadcasts when to stop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.runtime import load_checkpoint, resolve_device, resolve_precision, save_checkpoint
from medseg.training.config import TrainConfig
from medseg.training.optim import LRSchedule, build_optimizer
from medseg.training.record import MetricsLog, plot_curves
from medseg.transforms.regions import region_dice

__all__ = ["ValCase", "FoldResult", "Trainer", "dice_per_class", "rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)

# Epoch-counted checkpointing (long GPU schedules without a budget) still writes checkpoint_latest.pt at least this
# often, so a preempted job loses minutes, not the several epochs between two counted checkpoints.
CHECKPOINT_MAX_MINUTES = 5.0


@dataclass
class ValCase:
    """A validation case in plan space: ``image`` (C, *s) float32 and ``label`` (1, *s) integer."""

    case_id: str
    image: np.ndarray
    label: np.ndarray


@dataclass
class FoldResult:
    """What a finished fold reports."""

    epochs: int
    best_epoch: int
    best_ema_dice: float
    last_val_dice: float | None
    elapsed_s: float
    stopped_early: bool


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states, as tensors (a checkpoint's ``rng``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class (NaN where both prediction and reference are empty).

    Reference voxels holding the ignore index (``num_classes``: the plan's ``ignore_index``, unlabelled) are left
    out.

    Args:
        pred: integer label map.
        ref: integer label map of the same shape (class indices, as in the preprocessed cache).
        num_classes: K (background included).

    Returns:
        ``K - 1`` floats.
    """
    out = []
    labelled = ref != num_classes
    for c in range(1, num_classes):
        p, r = (pred == c) & labelled, ref == c
        denom = int(p.sum()) + int(r.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


class Trainer:
    """Train one fold.

    Args:
        network: the model (created from ``network_spec``).
        network_spec: ``{"name": ..., "kwargs": {...}}`` stored in checkpoints so a run folder rebuilds it.
        loss: ``loss(outputs, target)`` (see :func:`medseg.losses.build_loss`).
        cfg: training options.
        fold_dir: where checkpoints, metrics.csv, curves.png and TensorBoard events go.
        train_batches: ``epoch -> iterable of {"image": (B, C, *p), "label": (B, 1, *p)}`` (deterministic per
            epoch, so a resumed run sees the same batches).
        val_cases: validation cases in plan space.
        patch_size: network input patch (for the sliding-window validation).
        num_classes: K.
        slice_axis: for a 2D network validated on 3D cases, the axis slices are taken along; None otherwise.
        progress: called after every epoch with a dict (epoch, progress fraction, losses, Dice, lr, eta).
        fold: the fold's index, recorded in its checkpoints.
        regions: the class indices of each region for a region network (one sigmoid output per region, validated
            by the Dice of each region, :func:`medseg.transforms.regions.region_dice`); None: one output per class.
    """

    def __init__(
        self,
        network: nn.Module,
        network_spec: dict[str, Any],
        loss: nn.Module,
        cfg: TrainConfig,
        fold_dir: str | Path,
        *,
        train_batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
        val_cases: Sequence[ValCase],
        patch_size: Sequence[int],
        num_classes: int,
        slice_axis: int | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        fold: int | None = None,
        regions: Sequence[Sequence[int]] | None = None,
    ):
        import torch.distributed as dist

        self.cfg = cfg
        self.fold_dir = Path(fold_dir)
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_precision(cfg.amp, self.device)
        self.network = network.to(self.device)
        self.memory_format = torch.contiguous_format
        if cfg.channels_last:
            self.memory_format = torch.channels_last_3d if len(patch_size) == 3 else torch.channels_last
            self.network = self.network.to(memory_format=self.memory_format)
        self.network_spec = network_spec
        self.loss = loss.to(self.device)
        self.train_batches = train_batches
        self.val_cases = list(val_cases)[: cfg.val_max_cases] if cfg.val_max_cases else list(val_cases)
        self.patch_size = [int(p) for p in patch_size]
        self.num_classes = num_classes
        self.slice_axis = slice_axis
        self.progress_cb = progress
        self.fold = fold
        self.regions = [tuple(r) for r in regions] if regions else None
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.optimizer = build_optimizer(self.network, cfg)
        self.schedule = LRSchedule(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.model: nn.Module = self.network
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.network, device_ids=ids)
        if cfg.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        # state that a checkpoint carries
        self.epoch = -1  # last finished epoch
        self.elapsed_s = 0.0
        self.ema: float | None = None
        self.best_ema = -math.inf
        self.best_epoch = -1
        self.bad_validations = 0
        self.last_val: float | None = None
        self.finished = False
        self._val_reserve_s = 0.0  # how long the last validation took (kept free at the budget's end)
        self._last_val_at = 0.0  # elapsed seconds at the last validation / checkpoint (time-based intervals)
        self._last_ckpt_at = 0.0
        self._val_subset: int | None = None  # validation cases used with a budget (chosen at the first validation)
        from medseg.inference.sliding_window import SlidingWindowInferer

        self.validation = SlidingWindowInferer.for_network(
            self.network, self.patch_size, slice_axis=slice_axis, overlap=cfg.val_overlap, batch_size=4,
            device=self.device, amp_dtype=self.amp_dtype)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "format": 1,
            "network": self.network_spec,
            "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "elapsed_s": self.elapsed_s,
            "trainer": {"ema": self.ema, "best_ema": self.best_ema, "best_epoch": self.best_epoch,
                        "bad_validations": self.bad_validations, "last_val": self.last_val,
                        "val_reserve_s": self._val_reserve_s, "last_val_at": self._last_val_at,
                        "last_ckpt_at": self._last_ckpt_at, "val_subset": self._val_subset},
            "rng": rng_state(),
            "finished": self.finished,
            "patch_size": self.patch_size,
            "num_classes": self.num_classes,
            "fold": self.fold,
        }

    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        self.network.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.elapsed_s = float(ckpt["elapsed_s"])
        t = ckpt["trainer"]
        self.ema, self.best_ema, self.best_epoch = t["ema"], float(t["best_ema"]), int(t["best_epoch"])
        self.bad_validations, self.last_val = int(t["bad_validations"]), t["last_val"]
        self._val_reserve_s = float(t.get("val_reserve_s", 0.0))  # absent in first-release checkpoints
        self._last_val_at = float(t.get("last_val_at", self.elapsed_s))
        self._last_ckpt_at = float(t.get("last_ckpt_at", self.elapsed_s))
        self._val_subset = t.get("val_subset")
        set_rng_state({k: (v.cpu() if isinstance(v, torch.Tensor) else [x.cpu() for x in v])
                       for k, v in ckpt["rng"].items()})
        logger.info("resumed from %s at epoch %d (%.0f s of training done)", path, self.epoch + 1, self.elapsed_s)

    # ------------------------------------------------------------------ progress
    def _progress(self, epoch_done: int) -> float:
        p = epoch_done / self.cfg.epochs
        if self.cfg.max_minutes:
            p = max(p, self.elapsed_s / (60.0 * self.cfg.max_minutes))
        return min(p, 1.0)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> tuple[float, list[float]]:
        """Sliding-window prediction of the validation cases (with a time budget, the first ones that fit it);
        mean foreground Dice and per-class (or per-region) Dice."""
        self.network.eval()
        scores = []
        for i, case in enumerate(self.val_cases):
            if self._val_subset is not None and i >= self._val_subset:
                break
            t0 = time.perf_counter()
            logits = self.validation(self.network, torch.from_numpy(np.ascontiguousarray(case.image)))
            if self.regions:  # per region (logit > 0); the ignore index is num_classes
                scores.append(region_dice(logits, np.asarray(case.label)[0], self.regions, self.num_classes))
            else:
                scores.append(dice_per_class(logits.argmax(0).cpu().numpy(), np.asarray(case.label)[0],
                                             self.num_classes))
            if i == 0 and self._val_subset is None:
                self._val_subset = self._choose_val_subset(time.perf_counter() - t0)
        self.network.train()
        if not scores:
            return float("nan"), []
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                per_class = np.nanmean(np.array(scores, dtype=np.float64), axis=0)
        per_class = np.nan_to_num(per_class, nan=0.0)
        return float(per_class.mean()), [float(x) for x in per_class]

    def _choose_val_subset(self, case_s: float) -> int:
        """How many validation cases fit the budget: all without a budget or with ``val_max_cases``; else as many
        as keep every validation within 1.5% of the budget (about 15% over ten validations), at least 2."""
        n = len(self.val_cases)
        if not self.cfg.max_minutes or self.cfg.val_max_cases or n <= 2:
            return n
        k = max(2, min(n, int(0.015 * 60.0 * self.cfg.max_minutes / max(case_s, 1e-6))))
        if k < n:
            logger.info("validating %d of %d cases (%.1f s each) to keep validation within the %g-minute budget",
                        k, n, case_s, self.cfg.max_minutes)
        return k

    # ------------------------------------------------------------------ training
    def _due(self, every_minutes: float | None, since_s: float, now_s: float) -> bool:
        return every_minutes is not None and now_s - since_s >= 60.0 * every_minutes

    def _train_epoch(self, epoch: int) -> tuple[float, float, bool]:
        """One epoch; returns ``(mean loss, last learning rate, budget reached)``.

        The learning rate follows the progress at every step. With a time budget, the epoch ends early when the
        budget, less the time the last validation took, is spent, or when a time-based validation is due, so an
        epoch is never longer than the validation interval. Under DDP rank 0's clock decides, broadcast at every
        step (one scalar pair beside the gradients' all-reduce), so every rank takes the same steps.
        """
        self.model.train()
        total, n = 0.0, 0
        cfg = self.cfg
        budget = 60.0 * cfg.max_minutes if cfg.max_minutes else None
        per_epoch = max(1, int(cfg.batches_per_epoch))
        t0 = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])
        reached = False
        for step, batch in enumerate(self.train_batches(epoch)):
            now = self.elapsed_s + (time.perf_counter() - t0)
            stop = 0.0  # 1: the budget is spent, 2: a validation is due (never before the epoch's first step)
            if step and budget is not None and now + self._val_reserve_s >= budget:
                stop = 1.0
            elif step and self._due(cfg.val_every_minutes, self._last_val_at, now):
                stop = 2.0
            if self.distributed:  # DDP ranks take the same steps at the same learning rate: rank 0's clock decides
                stop, now = self._sync([stop, now])
            if stop:
                reached = stop == 1.0
                break
            p = (epoch + step / per_epoch) / cfg.epochs
            if budget is not None:
                p = max(p, now / budget)
            lr = self.schedule.step(epoch, min(p, 1.0))
            x = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            y = batch["label"].to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = self.model(x)
            loss = self.loss(out, _crop_to(y, out))
            if not torch.isfinite(loss):
                logger.warning("epoch %d: non-finite loss skipped", epoch)
                continue
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            total += float(loss.detach())
            n += 1
        return total / max(n, 1), lr, reached

    def _sync(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank (DDP); unchanged otherwise."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(t, src=0)
        return [float(v) for v in t.tolist()]

    def fit(self, resume: bool = False) -> FoldResult:
        """Train until ``epochs``, the time budget, or early stopping.

        Args:
            resume: continue from ``checkpoint_latest.pt`` in the fold folder when it exists.

        Returns:
            A :class:`FoldResult`.
        """
        cfg = self.cfg
        latest = self.fold_dir / "checkpoint_latest.pt"
        main = self.rank == 0
        if resume and latest.is_file():
            self._restore(latest)
        elif main:
            for stale in ("checkpoint_best.pt", "checkpoint_latest.pt"):
                (self.fold_dir / stale).unlink(missing_ok=True)
        metrics = writer = None
        if main:
            self.fold_dir.mkdir(parents=True, exist_ok=True)
            metrics = MetricsLog(self.fold_dir / "metrics.csv", resume_epoch=self.epoch if resume else None)
            writer = _tensorboard(self.fold_dir, purge_step=self.epoch + 1)
        stopped_early = False
        epoch = self.epoch + 1
        progress = self._progress(epoch)
        while epoch < cfg.epochs and progress < 1.0:
            self.schedule.step(epoch, progress)
            t0 = time.perf_counter()
            train_loss, lr, reached = self._train_epoch(epoch)
            dt = time.perf_counter() - t0
            self.elapsed_s += dt
            self.epoch = epoch
            progress, self.elapsed_s, reached_f = self._sync([self._progress(epoch + 1), self.elapsed_s,
                                                              float(reached)])
            final = progress >= 1.0 or epoch + 1 >= cfg.epochs or bool(reached_f)
            row: dict[str, Any] = {"epoch": epoch, "train_loss": round(train_loss, 6), "lr": lr,
                                   "epoch_s": round(dt, 3), "elapsed_s": round(self.elapsed_s, 1)}
            stop = 0.0
            if main:
                due = (self._due(cfg.val_every_minutes, self._last_val_at, self.elapsed_s)
                       if cfg.val_every_minutes is not None else (epoch + 1) % cfg.val_every == 0)
                if due or final:
                    stop = float(self._validate_and_select(row))
                    self.elapsed_s += row["val_s"]  # the time budget is wall time of the whole loop
                    self._val_reserve_s = row["val_s"]
                    self._last_val_at = self.elapsed_s
                    row["elapsed_s"] = round(self.elapsed_s, 1)
                metrics.append(row)  # type: ignore[union-attr]
                _log_scalars(writer, row)
                self.finished = bool(final or stop)
                ckpt_due = (self._due(cfg.checkpoint_every_minutes, self._last_ckpt_at, self.elapsed_s)
                            if cfg.checkpoint_every_minutes is not None else
                            (epoch + 1) % cfg.checkpoint_every == 0
                            or self._due(CHECKPOINT_MAX_MINUTES, self._last_ckpt_at, self.elapsed_s))
                if ckpt_due or final or stop:
                    self._last_ckpt_at = self.elapsed_s
                    save_checkpoint(latest, self._checkpoint())
                if "val_dice" in row or final:
                    plot_curves(metrics.rows, self.fold_dir / "curves.png")  # type: ignore[union-attr]
                if self.progress_cb is not None:
                    rate = self.elapsed_s / max(progress, 1e-9)
                    self.progress_cb({**row, "progress": progress, "eta_s": rate * (1 - progress)})
            stop = self._sync([stop])[0]
            if stop:
                stopped_early = True
                logger.info("early stopping after epoch %d: no EMA Dice improvement in %d validations",
                            epoch, cfg.patience)
                break
            if final:
                break
            epoch += 1
        if writer is not None:
            writer.close()
        if main and not (self.fold_dir / "checkpoint_best.pt").is_file():
            save_checkpoint(self.fold_dir / "checkpoint_best.pt", self._checkpoint())
        return FoldResult(epochs=self.epoch + 1, best_epoch=self.best_epoch, best_ema_dice=self.best_ema,
                          last_val_dice=self.last_val, elapsed_s=self.elapsed_s, stopped_early=stopped_early)

    def _validate_and_select(self, row: dict[str, Any]) -> bool:
        """Validate, update the EMA, save the best checkpoint; returns True when early stopping triggers."""
        t0 = time.perf_counter()
        dice, per_class = self.validate()
        self.last_val = dice
        self.ema = dice if self.ema is None else self.cfg.ema * self.ema + (1 - self.cfg.ema) * dice
        row.update({"val_dice": round(dice, 5), "val_dice_ema": round(self.ema, 5),
                    "val_s": round(time.perf_counter() - t0, 2)})
        for c, d in enumerate(per_class, start=1):
            row[f"val_dice_{c}"] = round(d, 5)
        self.schedule.observe(self.ema)
        if self.ema > self.best_ema:
            self.best_ema, self.best_epoch, self.bad_validations = self.ema, self.epoch, 0
            save_checkpoint(self.fold_dir / "checkpoint_best.pt", self._checkpoint())
        else:
            self.bad_validations += 1
        logger.info("epoch %d: train loss %.4f, val Dice %.4f (EMA %.4f, best %.4f at epoch %d)", self.epoch,
                    row["train_loss"], dice, self.ema, self.best_ema, self.best_epoch)
        return self.cfg.patience is not None and self.bad_validations >= self.cfg.patience


def _crop_to(target: torch.Tensor, outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Centre-crop the target to a valid-convolution network's (smaller) output."""
    out = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
    if tuple(out.shape[2:]) == tuple(target.shape[2:]):
        return target
    sl = [slice(None), slice(None)]
    for t, o in zip(target.shape[2:], out.shape[2:]):
        lo = (t - o) // 2
        sl.append(slice(lo, lo + o))
    return target[tuple(sl)]


def _tensorboard(log_dir: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        logger.warning("tensorboard is not installed: no event files (pip install 'medseg[tensorboard]')")
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _log_scalars(writer: Any, row: dict[str, Any]) -> None:
    if writer is None:
        return
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()
