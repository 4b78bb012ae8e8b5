"""Deployment: model packages with a model card, ONNX/TorchScript export, ONNX Runtime and INT8 inference.

Importing this package imports neither torch nor ONNX Runtime; the names below load their module when used::

    from medseg.deploy import export_package, install_package, resolve_model, export_run, load_predictor
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_predictor", "OnnxNetwork", "export_package", "install_package", "unpack_package", "verify_package",
           "resolve_model", "export_run", "export_network"]

_WHERE = {
    "load_predictor": "onnx_runtime", "OnnxNetwork": "onnx_runtime",
    "export_package": "package", "install_package": "package", "unpack_package": "package",
    "verify_package": "package", "resolve_model": "package",
    "export_run": "export", "export_network": "export",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"medseg.deploy.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'medseg.deploy' has no attribute {name!r}")
