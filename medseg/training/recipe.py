"""The training recipe for a device and a time budget: what a pipeline YAML no longer has to say.

``medseg crossval --dataset DIR`` needs no YAML: the run's ``train:`` options start from :func:`train_recipe` and
a YAML (``--config``) or the command line only override them.

* **Short budgets** (any budget of at most :data:`SHORT_BUDGET_MINUTES`, and every CPU run): the recipe found on
  MSD hippocampus for 20 CPU minutes (docs/benchmarks.md) -- AdamW 3e-3 with one warm-up epoch and poly decay to the
  end of the budget, half the plan's batch (twice the optimiser steps at the same samples/s), augmentation sized
  for ~1000 steps (rotation/scaling/gamma at low probability, no blur or low-resolution simulation), validation
  every tenth of the budget and a checkpoint every few minutes. Without ``--time-budget`` a CPU run gets
  :data:`CPU_DEFAULT_MINUTES` per fold (said in the log), never a 1000-epoch schedule that would take days.
* **Long GPU schedules** (CUDA and no budget, or a budget over :data:`SHORT_BUDGET_MINUTES`): nnU-Net's recipe --
  SGD (Nesterov, momentum 0.99, lr 0.01), poly decay over 1000 epochs of 250 batches, its default augmentation, the
  plan's batch; with a budget the schedule decays to the budget's end instead.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["SHORT_BUDGET_MINUTES", "CPU_DEFAULT_MINUTES", "train_recipe"]

log = logging.getLogger(__name__)

#: Budgets up to this many minutes per fold get the short-schedule recipe.
SHORT_BUDGET_MINUTES = 120.0
#: A CPU run without a budget trains this many minutes per fold.
CPU_DEFAULT_MINUTES = 20.0

_SHORT_AUGMENTATION = {
    "p_rotation": 0.1, "rotation_deg": 15.0, "p_scale": 0.1, "scale": [0.85, 1.15],
    "p_blur": 0.0, "p_lowres": 0.0, "p_gamma": 0.15,
}


def train_recipe(device: str, minutes: float | None) -> tuple[dict[str, Any], str]:
    """The ``train:`` options for a device type and a per-fold budget.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (the resolved training device's type).
        minutes: the per-fold time budget, or None.

    Returns:
        ``(options, reason)``: TrainConfig keys and values, and one line saying which recipe and why.
    """
    if device == "cpu" and minutes is None:
        minutes = CPU_DEFAULT_MINUTES
        budget_note = f"no time budget given on the CPU, so {CPU_DEFAULT_MINUTES:g} minutes per fold"
    else:
        budget_note = "no time budget" if minutes is None else f"a {minutes:g}-minute budget per fold"
    if minutes is not None and (device == "cpu" or minutes <= SHORT_BUDGET_MINUTES):
        options: dict[str, Any] = {
            "max_minutes": float(minutes), "epochs": 1000, "batches_per_epoch": 100,
            "optimizer": "adamw", "lr": 3e-3, "weight_decay": 3e-5, "schedule": "poly", "warmup_epochs": 1,
            "batch_scale": 0.5, "augmentation": dict(_SHORT_AUGMENTATION), "ema": 0.9,
            "val_every_minutes": round(float(minutes) / 10.0, 3),
            "checkpoint_every_minutes": round(min(3.0, float(minutes) / 8.0), 3),
        }
        reason = (f"short-schedule recipe ({budget_note}, {device}): AdamW 3e-3, poly decay to the budget's end, "
                  "half the plan's batch, light augmentation, validation every tenth of the budget")
        return options, reason
    options = {
        "max_minutes": None if minutes is None else float(minutes), "epochs": 1000, "batches_per_epoch": 250,
        "optimizer": "sgd", "lr": 0.01, "momentum": 0.99, "weight_decay": 3e-5, "schedule": "poly",
        "warmup_epochs": 0, "augmentation": {}, "val_every": 5, "checkpoint_every": 5,
    }
    if minutes is not None:
        options["val_every_minutes"] = round(float(minutes) / 10.0, 3)
        options["checkpoint_every_minutes"] = 5.0
    reason = (f"nnU-Net's recipe ({budget_note}, {device}): SGD 0.01 momentum 0.99, poly over 1000 epochs of 250 "
              "batches, default augmentation, the plan's batch")
    return options, reason
