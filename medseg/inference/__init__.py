"""Inference: the sliding-window engine, post-processing and the Predictor (run folder -> Volume -> Volume).

Names are imported lazily so that ``import medseg.inference`` (and post-processing alone) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "sliding_window_predict",
    "sliding_window_predict_slices",
    "postprocess",
    "PostprocessSetting",
    "load_postprocessing",
    "choose_postprocessing",
    "Predictor",
    "Prediction",
]

_WHERE = {
    "sliding_window_predict": "medseg.inference.sliding_window",
    "sliding_window_predict_slices": "medseg.inference.sliding_window",
    "postprocess": "medseg.inference.postprocess",
    "PostprocessSetting": "medseg.inference.postprocess",
    "load_postprocessing": "medseg.inference.postprocess",
    "choose_postprocessing": "medseg.inference.postprocess",
    "Predictor": "medseg.inference.predictor",
    "Prediction": "medseg.inference.predictor",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'medseg.inference' has no attribute {name!r}")
