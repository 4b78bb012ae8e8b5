"""The one place where :mod:`medseg.deploy` reads a run folder's files.

Everything else in the package asks this module for the model record, the plan, the folds and their
checkpoints, the cross-validation summary, the environment and the pipeline's ``card:`` block, so re-wiring
deployment onto a new run-folder record means editing this file only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import InputError

__all__ = ["RunFolder", "read_json", "CHECKPOINT", "ONNX_DIR"]

#: The checkpoint a package carries per fold (weights only, see :func:`medseg.deploy.package.export_package`).
CHECKPOINT = "checkpoint_best.pt"
#: Folder (inside a run folder or package) holding ``fold_K.onnx`` / ``fold_K.int8.onnx``.
ONNX_DIR = "onnx"


def read_json(path: Path, what: str, *, required: bool = True) -> dict[str, Any]:
    """Read a JSON object; ``{}`` for an absent optional file.

    Raises:
        InputError: a required file is missing, or any file is not a JSON object.
    """
    if not path.is_file():
        if required:
            raise InputError(path, "does not exist", f"{what} in a run folder written by `medseg crossval`")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({exc})", what) from None
    if not isinstance(data, dict):
        raise InputError(path, "does not hold a JSON object", what)
    return data


def chosen_configuration(root: Path) -> Path:
    """``root`` itself, or, for a run that trained several configurations, the folder of the one that find-best
    chose (``RUN/<configuration>``, a complete single-configuration run folder).

    Raises:
        InputError: find-best chose an ensemble of two configurations, or a cascade stage (a package holds one
            configuration).
    """
    from medseg.planning.selection import load_selection

    sel = load_selection(root)
    if sel is not None and len(sel.chosen) != 1:
        raise InputError(root / "model.json", f"chose the ensemble {'+'.join(sel.chosen)}, and a model package or "
                         "export holds one configuration", f"one configuration's folder, e.g. {root / sel.chosen[0]}")
    folder = root if sel is None else root / sel.chosen[0]
    if (folder / "model.json").is_file():
        from medseg.planning import load_model_record

        stage = load_model_record(folder).config.previous_stage
        if stage:
            raise InputError(folder / "model.json", f"is a cascade stage that needs its {stage} stage first, and a "
                             "model package or export holds one configuration",
                             f"a single-stage configuration's folder, e.g. {folder.parent / stage}")
    return folder


@dataclass
class RunFolder:
    """Read-only view of a run folder (or an unpacked model package, which has the same layout).

    Args:
        root: the folder.
    """

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise InputError(self.root, "is not a folder", "a run folder with model.json, plan.json and fold_K/")
        self.root = chosen_configuration(self.root)

    # -------------------------------------------------------------------------------- records
    @property
    def record(self) -> Any:
        """The typed model record (:func:`medseg.planning.load_model_record`; first-release folders migrated)."""
        from medseg.planning import load_model_record

        return load_model_record(self.root)

    @property
    def model(self) -> dict[str, Any]:
        """The model record as plain data, plus ``network`` and ``mirror_axes`` of the trained configuration."""
        rec = self.record
        return {**rec.to_dict(), "network": rec.network.to_dict(), "mirror_axes": list(rec.config.mirror_axes)}

    @property
    def plan(self) -> dict[str, Any]:
        """The record's one-configuration plan (the configuration as trained) as plain data, with the data set
        fingerprint of ``plan.json`` when the run folder has one."""
        plan = self.record.plan().to_dict()
        if (self.root / "plan.json").is_file():
            plan["fingerprint"] = read_json(self.root / "plan.json", "plan.json").get("fingerprint") or {}
        return plan

    @property
    def summary(self) -> dict[str, Any]:
        """``crossval_summary.json`` ({} when the run has none, e.g. a single ``medseg train`` fold)."""
        return read_json(self.root / "crossval_summary.json", "crossval_summary.json", required=False)

    @property
    def environment(self) -> dict[str, Any]:
        """``environment.json`` (package versions, hardware, manifest hash); {} when absent."""
        return read_json(self.root / "environment.json", "environment.json", required=False)

    @property
    def splits(self) -> list[dict[str, Any]]:
        """``splits.json`` as a list of folds ({train, val, train_patients, val_patients}); [] when absent."""
        path = self.root / "splits.json"
        if not path.is_file():
            return []
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(path, f"is not valid JSON ({exc})", "splits.json written by `medseg split`") from None
        return data if isinstance(data, list) else []

    @property
    def config(self) -> dict[str, Any]:
        """The resolved pipeline ``config.yaml`` as plain data; {} when absent."""
        import yaml

        path = self.root / "config.yaml"
        if not path.is_file():
            return {}
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InputError(path, f"is not valid YAML ({str(exc).splitlines()[0]})", "the run's config.yaml") from None
        return data if isinstance(data, dict) else {}

    @property
    def card_block(self) -> dict[str, Any]:
        """The pipeline YAML's optional ``card:`` block (intended use, limitations, ...)."""
        card = self.config.get("card") or {}
        return card if isinstance(card, dict) else {}

    # -------------------------------------------------------------------------------- folds and files
    @property
    def available_folds(self) -> list[int]:
        """Folds with a ``fold_K/checkpoint_best.pt``."""
        return sorted(int(p.name[5:]) for p in self.root.glob("fold_*")
                      if p.name[5:].isdigit() and (p / CHECKPOINT).is_file())

    def folds(self, requested: list[int] | None = None) -> list[int]:
        """The folds to use: ``requested``, else the model record's.

        Raises:
            InputError: a requested fold has no ``checkpoint_best.pt``, or there is none at all.
        """
        available = self.available_folds
        folds = list(requested) if requested else list(self.record.folds)
        missing = [f for f in folds if f not in available]
        if missing or not folds:
            raise InputError(self.root, f"has no fold_K/{CHECKPOINT} for fold(s) {missing or 'any'}",
                             f"folds among {available}" if available else "a run folder trained by `medseg crossval`")
        return folds

    def checkpoint(self, fold: int) -> Path:
        """``fold_K/checkpoint_best.pt``."""
        return self.root / f"fold_{fold}" / CHECKPOINT

    def onnx_file(self, fold: int, precision: str = "fp32") -> Path:
        """``onnx/fold_K.onnx`` (fp32) or ``onnx/fold_K.int8.onnx``."""
        suffix = ".int8.onnx" if precision == "int8" else ".onnx"
        return self.root / ONNX_DIR / f"fold_{fold}{suffix}"

    @property
    def configuration(self) -> str:
        """The configuration name the folds were trained on (the model record's)."""
        return str(self.record.configuration)

    @property
    def training_dataset(self) -> Path | None:
        """The training data set folder recorded in config.yaml (absent on another machine: None)."""
        ds = self.config.get("dataset")
        return Path(ds) if ds and Path(ds).exists() else None

    def fold_metrics_rows(self, fold: int) -> list[dict[str, str]]:
        """Rows of ``fold_K/metrics.csv`` ([] when absent)."""
        import csv

        path = self.root / f"fold_{fold}" / "metrics.csv"
        if not path.is_file():
            return []
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
