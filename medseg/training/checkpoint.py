"""Checkpoints: plain dicts of tensors and plain types, loadable with ``torch.load(weights_only=True)``.

```
{"format": 1, "network": {"name": ..., "kwargs": {...}}, "state_dict": {...}, "optimizer": {...},
 "schedule": {...}, "scaler": {...} | None, "epoch": int (last finished, 0-based), "elapsed_s": float,
 "trainer": {"ema": ..., "best_ema": ..., "best_epoch": ..., "bad_validations": ...},
 "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...]}, "config": {...}}
```
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medseg.errors import InputError
from medseg.io.atomic import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states, as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` atomically (a kill -9 leaves the previous file intact).

    Args:
        path: target ``.pt`` file.
        checkpoint: dict of tensors and plain types.
    """
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code is executed from the file).

    Args:
        path: the ``.pt`` file.
        map_location: where tensors go.

    Returns:
        The checkpoint dict.

    Raises:
        InputError: missing, unreadable or not a medseg checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found", "a checkpoint_*.pt written by medseg train")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure is a bad file
        raise InputError(path, f"cannot be read as a checkpoint ({type(exc).__name__}: {exc})".split("\n")[0],
                         "a checkpoint_*.pt written by medseg train") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "network" not in ckpt:
        raise InputError(path, "not a medseg checkpoint (no network/state_dict)", "a checkpoint written by medseg")
    return ckpt
