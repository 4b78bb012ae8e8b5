"""The model record of a run that trained several configurations: which one (or which pair) predicts.

``medseg crossval`` without a named configuration trains every configuration the plan lists, each into its own
complete run folder ``RUN/<configuration>/`` (its own ``model.json``, folds, out-of-fold predictions, summary and
post-processing), then chooses by nnU-Net's rule (:mod:`medseg.training.find_best`). ``RUN/model.json`` is then a
selection record::

    {"schema_version": 2, "kind": "selection", "dataset": ..., "members": ["3d_fullres", "3d_lowres", "2d"],
     "chosen": ["3d_fullres", "3d_lowres"], "candidates": {"3d_fullres": 0.91, "3d_fullres+3d_lowres": 0.92, ...},
     "postprocessing": {...}, "rule": "...", "budget": {...}}

``chosen`` names one configuration (its own record and post-processing predict) or two (their probabilities on
the input grid are averaged, then the argmax and this record's ``postprocessing``, chosen on the ensemble's
out-of-fold predictions). :meth:`medseg.inference.Predictor.from_run` reads it; a run folder of one configuration
keeps its ordinary :class:`~medseg.planning.ModelRecord`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import InputError
from medseg.planning.schema import SCHEMA_VERSION, _Reader

__all__ = ["Selection", "load_selection", "write_selection", "SELECTION_KIND", "candidate_name"]

SELECTION_KIND = "selection"


def candidate_name(members: tuple[str, ...] | list[str]) -> str:
    """``"3d_fullres"`` or ``"3d_fullres+3d_lowres"``: the key of a candidate in ``candidates``."""
    return "+".join(members)


@dataclass
class Selection:
    """Which trained configuration(s) of a multi-configuration run predict, and the evidence.

    Attributes:
        dataset: the data set's name.
        members: every configuration trained, each a run folder ``RUN/<name>/``.
        chosen: one configuration, or two whose probabilities are averaged.
        candidates: out-of-fold mean foreground Dice of every candidate (single configurations and pairs,
            :func:`candidate_name`); empty until crossval has scored them.
        postprocessing: for an ensemble, the setting chosen on its out-of-fold predictions (a single chosen
            configuration uses its own record's).
        rule: how the choice was made, in words.
        budget: how the training time was split between the configurations (``rule``, ``minutes`` per
            configuration).
    """

    dataset: str
    members: list[str]
    chosen: list[str]
    candidates: dict[str, float] = field(default_factory=dict)
    postprocessing: dict[str, Any] = field(default_factory=dict)
    rule: str = ""
    budget: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": SELECTION_KIND, "dataset": self.dataset,
                "members": list(self.members), "chosen": list(self.chosen),
                "candidates": {k: float(v) for k, v in self.candidates.items()},
                "postprocessing": dict(self.postprocessing), "rule": self.rule, "budget": dict(self.budget)}

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> Selection:
        """Validate a selection record read from JSON.

        Raises:
            InputError: a missing key, a wrong type, a chosen configuration that is not a member.
        """
        r = _Reader(data, source, "")
        members = [str(m) for m in r.raw("members")] if isinstance(r.raw("members"), list) else None
        if not members:
            raise r._bad("members", "a list of the configurations trained")
        chosen = r.raw("chosen")
        if not isinstance(chosen, list) or not 1 <= len(chosen) <= 2 or any(str(c) not in members for c in chosen):
            raise r._bad("chosen", f"one or two of the members {members}")
        cands = r.raw("candidates", {})
        post = r.raw("postprocessing", {})
        if not isinstance(cands, dict) or not isinstance(post, dict):
            raise r._bad("candidates", "mappings for candidates and postprocessing")
        return cls(dataset=r.str("dataset"), members=members, chosen=[str(c) for c in chosen],
                   candidates={str(k): float(v) for k, v in cands.items()}, postprocessing=dict(post),
                   rule=str(r.raw("rule", "")), budget=dict(r.raw("budget", {}) or {}))


def is_selection(data: Any) -> bool:
    """True for the JSON of a selection record."""
    return isinstance(data, dict) and data.get("kind") == SELECTION_KIND


def load_selection(run_dir: str | Path) -> Selection | None:
    """The selection record of ``run_dir``, or None when ``RUN/model.json`` is an ordinary model record (or absent).

    Raises:
        InputError: a selection record that is invalid, or names a member folder that is missing.
    """
    import json

    path = Path(run_dir) / "model.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # load_model_record reports an unreadable record
    if not is_selection(data):
        return None
    sel = Selection.from_dict(data, path)
    missing = [m for m in sel.chosen if not (Path(run_dir) / m / "model.json").is_file()]
    if missing:
        raise InputError(path, f"chooses configuration(s) {missing} whose run folders ({', '.join(missing)}/"
                         "model.json) are missing", "the complete run folder of `medseg crossval`")
    return sel


def write_selection(run_dir: str | Path, selection: Selection) -> Path:
    """Write ``RUN/model.json`` (atomically) as the selection record; returns its path."""
    from medseg.training.record import write_json

    path = Path(run_dir) / "model.json"
    write_json(path, selection.to_dict())
    return path
