"""Training a cascade stage (``3d_cascade_fullres``) on its previous stage's out-of-fold predictions.

nnU-Net's cascade: the low-resolution stage (``3d_lowres``) is cross-validated first; each case's prediction by the
fold that did not train on it (its out-of-fold prediction, ``RUN/3d_lowres/fold_K/validation/<case>.nii.gz``) is
what the full-resolution stage sees next to the image while it trains, so it learns to correct predictions of the
quality it will meet at inference, never ones made on training cases. Hence a cascade needs every fold of its
previous stage: a case missing from the previous stage's out-of-fold predictions stops training with a one-line
error.

The previous stage's folder is ``RUN/<previous_stage>`` beside the cascade's ``RUN/3d_cascade_fullres`` (the layout
``medseg crossval`` without ``--configuration`` writes). Its maps are brought into the cascade's plan space exactly
as the case's label is (:func:`medseg.transforms.preprocess.preprocess_volume`: reorientation, crop, nearest
resampling) and kept as ``RUN/3d_cascade_fullres/previous_stage/<case>.npy`` (uint8/int16 class indices), with
``index.json`` recording the size and time of each source file, so a retrained previous stage is picked up.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.planning.record import previous_stage_dir

__all__ = ["prepare_previous_stage", "PREVIOUS_STAGE_FOLDER"]

logger = logging.getLogger(__name__)

#: Folder of a cascade stage's run holding the previous stage's maps in its plan space.
PREVIOUS_STAGE_FOLDER = "previous_stage"


def _signature(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def prepare_previous_stage(run: Any) -> Path:
    """Bring the previous stage's out-of-fold prediction of every labelled case into the cascade's plan space.

    Args:
        run: the cascade stage's prepared :class:`~medseg.training.fold.RunData`.

    Returns:
        ``RUN/3d_cascade_fullres/previous_stage`` holding ``<case>.npy`` for every labelled case.

    Raises:
        InputError: the previous stage's folder is missing, was split differently, or lacks out-of-fold
            predictions of some cases.
    """
    from medseg.io import atomic_path, read_volume
    from medseg.transforms.case import load_case
    from medseg.transforms.preprocess import preprocess_volume

    conf = run.config
    stage = str(conf.previous_stage)
    prev_dir = previous_stage_dir(run.run_dir, stage)
    fix = (f"cross-validate every fold of {stage} into {prev_dir} first (`medseg crossval` without "
           f"--configuration does); the cascade trains on its out-of-fold predictions")
    if not (prev_dir / "plan.json").is_file():
        raise InputError(prev_dir, f"is not a trained {stage} run folder", fix)
    theirs = prev_dir / "splits.json"
    if theirs.is_file() and json.loads(theirs.read_text()) != run.splits:
        raise InputError(theirs, f"splits differ from those of {run.run_dir / 'splits.json'}",
                         f"{stage} and the cascade cross-validated on the same splits")
    fold_of = {cid: f for f, entry in enumerate(run.splits) for cid in entry["val"]}
    cases = [c for c in run.manifest.cases if c.label is not None]
    sources = {c.case_id: prev_dir / f"fold_{fold_of.get(c.case_id, -1)}" / "validation" / f"{c.case_id}.nii.gz"
               for c in cases}
    missing = sorted(cid for cid, p in sources.items() if not p.is_file())
    if missing:
        raise InputError(prev_dir, f"has no out-of-fold prediction of {len(missing)} of {len(cases)} cases "
                         f"(e.g. {missing[0]})", fix)
    out = run.run_dir / PREVIOUS_STAGE_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    todo = [c for c in cases if index.get(c.case_id) != _signature(sources[c.case_id])
            or not (out / f"{c.case_id}.npy").is_file()]
    logger.info("previous stage %s: %d of %d cases into %s", stage, len(todo), len(cases), out)
    for case in todo:
        src = sources[case.case_id]
        image, _ = load_case(case.images)
        prev = read_volume(src)
        _, seg, _ = preprocess_volume(image, run.plan, run.pipeline.configuration, label=prev)
        assert seg is not None
        cached = np.load(run.cache_dir / f"{case.case_id}.npy", mmap_mode="r")
        if tuple(seg.shape[1:]) != tuple(cached.shape[1:]):
            raise InputError(src, f"comes to {seg.shape[1:]} voxels in plan space, not the cached case's "
                             f"{cached.shape[1:]}", "a prediction on the case's own image grid")
        dtype = np.uint8 if run.plan.num_classes <= 256 else np.int16
        with atomic_path(out / f"{case.case_id}.npy") as tmp:
            np.save(tmp, seg.astype(dtype))
        index[case.case_id] = _signature(src)
    if todo:
        with atomic_path(index_path) as tmp:
            Path(tmp).write_text(json.dumps(index, indent=1, sort_keys=True))
    return out
