"""The run-folder record: resolved config, environment (package versions, git revision), per-epoch
metrics.csv (resume-aware), and the training-curve PNG."""

from __future__ import annotations

import csv
import json
import logging
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from medseg.io.atomic import atomic_path

__all__ = ["write_json", "write_yaml", "environment", "MetricsLog", "plot_curves"]

logger = logging.getLogger(__name__)

_PACKAGES = ("medseg", "torch", "monai", "numpy", "scipy", "nibabel", "SimpleITK", "pydicom", "scikit-image",
             "connected-components-3d")


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_yaml(path: str | Path, data: Any) -> None:
    """Write plain ``data`` as YAML, atomically."""
    import yaml

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))


def _git_revision() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Package versions, Python, platform, torch threads/devices and the git revision of the medseg source.

    Args:
        extra: merged into the result (e.g. ``{"manifest_hash": ...}``).

    Returns:
        A JSON-serialisable dict.
    """
    import torch

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git": _git_revision(),
    }
    env.update(extra or {})
    return env


class MetricsLog:
    """Per-epoch metrics.csv; on resume, rows after the checkpoint's epoch are dropped (they will be redone).

    Args:
        path: the CSV file.
        resume_epoch: last epoch kept from an existing file (``None`` = start a new file).
    """

    def __init__(self, path: str | Path, resume_epoch: int | None = None):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if resume_epoch is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
        self._write()

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch's row and rewrite the file atomically."""
        self.rows.append({k: ("" if v is None else v) for k, v in row.items()})
        self._write()

    def _write(self) -> None:
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields or ["epoch"])
            w.writeheader()
            w.writerows(self.rows)


def plot_curves(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Training loss, validation Dice and its EMA, and learning rate against epoch, as a PNG.

    Args:
        rows: metrics rows (dicts with ``epoch``, ``train_loss``, ``val_dice``, ``val_dice_ema``, ``lr``).
        path: output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(name: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["epoch"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(*col("train_loss"), color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax2 = ax1.twinx()
    ax2.plot(*col("val_dice"), "o-", color="tab:orange", ms=3, label="val Dice")
    ax2.plot(*col("val_dice_ema"), "-", color="tab:red", label="val Dice (EMA)")
    ax2.set_ylabel("mean foreground Dice")
    ax2.set_ylim(0, 1)
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    ax3.plot(*col("lr"), color="tab:green")
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("learning rate")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
