"""Choose the configuration, or the ensemble of two, that predicts: nnU-Net's ``find_best_configuration``.

Every candidate (each trained configuration alone, and every pair of them, whose class probabilities on the input
grid are averaged before the argmax) is scored on the same out-of-fold cases by its mean foreground Dice (the mean
over the foreground classes of the per-class mean over cases; a class absent from both prediction and reference in
a case does not count for that case). The best candidate wins; on equal scores the one with fewer members (a single
configuration predicts in half the time), then the one listed first.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from medseg.planning.selection import candidate_name

__all__ = ["find_best_configuration", "score_candidates", "candidates_of", "ensemble_label", "class_dice",
           "FIND_BEST_RULE"]

logger = logging.getLogger(__name__)

FIND_BEST_RULE = ("nnU-Net's find_best_configuration: every configuration alone and every pair (class probabilities "
                  "on the input grid averaged, then the argmax) scored by out-of-fold mean foreground Dice on the same "
                  "cases; the best wins, ties going to fewer members")


def candidates_of(configs: Sequence[str]) -> list[tuple[str, ...]]:
    """Every single configuration, then every pair, in the order given."""
    return [(c,) for c in configs] + list(itertools.combinations(configs, 2))


def ensemble_label(probabilities: Sequence[np.ndarray], label_values: Sequence[int]) -> np.ndarray:
    """The label map (the data's label values) of the averaged class probabilities ``(K, *spatial)``.

    Args:
        probabilities: one ``(K, *spatial)`` array per member, on the same grid.
        label_values: the label value of each class index.

    Returns:
        ``(*spatial)`` integer label map.
    """
    total = np.asarray(probabilities[0], dtype=np.float32).copy()
    for p in probabilities[1:]:
        total += np.asarray(p, dtype=np.float32)
    return np.asarray(label_values, dtype=np.int64)[np.argmax(total, axis=0)]


def class_dice(pred: np.ndarray, ref: np.ndarray, values: Sequence[int], ignore: int | None = None
               ) -> dict[int, float]:
    """Dice per label value (NaN where both masks are empty); voxels whose reference is ``ignore`` left out."""
    valid = None if ignore is None else ref != int(ignore)
    out = {}
    for v in values:
        p, r = pred == v, ref == v
        if valid is not None:
            p, r = p & valid, r & valid
        tp = int(np.count_nonzero(p & r))
        den = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
        out[int(v)] = 2.0 * tp / den if den else float("nan")
    return out


def _mean_foreground(per_case: list[dict[int, float]]) -> float:
    if not per_case:
        return float("nan")
    classes = sorted({k for d in per_case for k in d})
    means = []
    for k in classes:
        vals = [d[k] for d in per_case if k in d and not np.isnan(d[k])]
        if vals:
            means.append(float(np.mean(vals)))
    return float(np.mean(means)) if means else float("nan")


def score_candidates(configs: Sequence[str], case_ids: Sequence[str],
                     probabilities: Callable[[str, str], np.ndarray], reference: Callable[[str], np.ndarray],
                     label_values: Sequence[int], ignore: int | None = None) -> dict[str, float]:
    """Out-of-fold mean foreground Dice of every candidate, one case in memory at a time.

    Args:
        configs: the trained configurations.
        case_ids: the out-of-fold cases (every configuration has a prediction of each).
        probabilities: ``(configuration, case) -> (K, *spatial)`` class probabilities on the case's grid.
        reference: ``case -> (*spatial)`` reference label map (the data's label values).
        label_values: the label value of each class index (index 0 is the background).
        ignore: the reference value of unlabelled voxels, or None.

    Returns:
        ``{candidate_name: mean foreground Dice}`` for :func:`candidates_of` ``(configs)``.
    """
    cands = candidates_of(configs)
    per_case: dict[str, list[dict[int, float]]] = {candidate_name(c): [] for c in cands}
    foreground = [int(v) for v in label_values[1:]]
    for cid in case_ids:
        ref = np.asarray(reference(cid))
        probs = {c: probabilities(c, cid) for c in configs}
        for cand in cands:
            pred = ensemble_label([probs[c] for c in cand], label_values)
            per_case[candidate_name(cand)].append(class_dice(pred, ref, foreground, ignore))
    scores = {name: _mean_foreground(rows) for name, rows in per_case.items()}
    logger.info("out-of-fold mean foreground Dice: %s", ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


def find_best_configuration(scores: Mapping[str, float]) -> tuple[str, ...]:
    """The winning candidate of ``scores`` (``{candidate_name: mean foreground Dice}``).

    Args:
        scores: from :func:`score_candidates`; NaN scores never win.

    Returns:
        The chosen configuration(s): one name, or two for an ensemble.

    Raises:
        ValueError: no candidate has a score.
    """
    order = list(scores)
    valid = [k for k in order if not np.isnan(scores[k])]
    if not valid:
        raise ValueError(f"no candidate has an out-of-fold Dice: {dict(scores)}")
    best = max(valid, key=lambda k: (scores[k], -len(k.split("+")), -order.index(k)))
    return tuple(best.split("+"))
