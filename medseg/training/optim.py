"""Optimisers and learning-rate schedules driven by training progress (a fraction in [0, 1]).

Poly (nnU-Net: ``lr * (1 - p)^0.9``) and cosine decay are functions of the progress ``p``, which the trainer
computes from epochs *or* elapsed time, so a time-budgeted run decays to the end of its budget. A linear warm-up
over the first ``warmup_epochs`` multiplies the schedule. ``plateau`` uses torch's ReduceLROnPlateau on the
smoothed validation Dice.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from medseg.training.config import TrainConfig

__all__ = ["build_optimizer", "LRSchedule"]


def build_optimizer(network: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net's default) or AdamW.

    Args:
        network: the model whose parameters are optimised.
        cfg: training options (``optimizer``, ``lr``, ``weight_decay``, ``momentum``).

    Returns:
        The optimiser.
    """
    params = [p for p in network.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class LRSchedule:
    """Sets the optimiser's learning rate from training progress.

    Args:
        optimizer: the optimiser to drive.
        cfg: training options (``schedule``, ``lr``, ``warmup_epochs``, ``epochs``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.optimizer = optimizer
        self.kind = cfg.schedule
        self.base_lr = cfg.lr
        self.warmup_epochs = cfg.warmup_epochs
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=3, min_lr=1e-6)
            if self.kind == "plateau" else None
        )

    def factor(self, progress: float) -> float:
        """The decay factor at ``progress`` in [0, 1] (without warm-up)."""
        p = min(max(progress, 0.0), 1.0)
        if self.kind == "poly":
            return (1.0 - p) ** 0.9
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0

    def step(self, epoch: int, progress: float) -> float:
        """Set the learning rate for ``epoch`` (0-based) at ``progress``; returns it."""
        warm = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        if self.plateau is not None:
            if epoch < self.warmup_epochs:
                for g in self.optimizer.param_groups:
                    g["lr"] = self.base_lr * warm
            return float(self.optimizer.param_groups[0]["lr"])
        lr = self.base_lr * warm * self.factor(progress)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def observe(self, metric: float) -> None:
        """Feed a validation metric (higher is better) to the plateau schedule; no-op for the others."""
        if self.plateau is not None:
            self.plateau.step(metric)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (for checkpoints)."""
        return {"kind": self.kind, "plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])
