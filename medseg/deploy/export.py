"""Export a run's networks to ONNX or TorchScript, one file per fold, with a parity check against PyTorch.

Each fold's network is wrapped so that it returns the logits only (the first head of a deep-supervision
network), exported in float32 with a dynamic batch axis and, where the network allows, dynamic spatial axes,
then run back (ONNX Runtime or ``torch.jit.load``) on random windows of the patch size and of a second size;
the largest absolute logit difference must stay within :data:`PARITY_TOL`, otherwise the export fails. Spatial
axes stay fixed to the patch (and the report says why) when the exported graph does not reproduce PyTorch at
the second size.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.deploy.runfolder import RunFolder
from medseg.errors import ConfigError, MedsegError
from medseg.io.atomic import atomic_path

__all__ = ["ExportError", "ExportResult", "LogitsOnly", "export_network", "export_run", "load_fold_network",
           "PARITY_TOL", "FORMATS"]

log = logging.getLogger(__name__)

#: Largest accepted absolute logit difference between PyTorch and the exported model (float32).
PARITY_TOL = 1e-4
FORMATS = ("onnx", "torchscript")
OPSET = 18


class ExportError(MedsegError):
    """A network that cannot be exported (or whose export does not reproduce PyTorch); the message says why."""


class LogitsOnly(nn.Module):
    """``network(x)`` -> logits tensor (the first item when the network returns deep-supervision heads)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(x)
        return y[0] if isinstance(y, (list, tuple)) else y


@dataclass
class ExportResult:
    """What one export produced.

    Args:
        path: the written file.
        format: ``"onnx"`` or ``"torchscript"``.
        dynamic_spatial: spatial axes accept other sizes (batch is always dynamic).
        max_abs_diff: largest |PyTorch - exported| logit over the parity inputs.
        parity_shapes: the input shapes compared.
        note: why spatial axes are fixed, when they are.
    """

    path: str
    format: str
    dynamic_spatial: bool
    max_abs_diff: float
    parity_shapes: list[list[int]]
    note: str = ""


def _second_shape(patch: tuple[int, ...]) -> tuple[int, ...]:
    """Another window size a patch-divisible network accepts: the first axis doubled."""
    return (2 * patch[0], *patch[1:])


def _onnx_bytes(module: nn.Module, example: torch.Tensor, dynamic_spatial: bool) -> bytes:
    nd = example.ndim - 2
    axes = {0: "batch", **({2 + i: f"s{i}" for i in range(nd)} if dynamic_spatial else {})}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
        try:  # the TorchScript-based exporter: 10x faster than dynamo's and exact for these convolution graphs
            torch.onnx.export(module, (example,), buf, input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": axes, "logits": axes}, opset_version=OPSET, dynamo=False)
        except TypeError:  # a torch without the legacy exporter
            dims = {i: torch.export.Dim.AUTO for i in axes}
            buf = io.BytesIO()
            torch.onnx.export(module, (example,), buf, input_names=["image"], output_names=["logits"],
                              dynamic_shapes=(dims,), opset_version=OPSET, dynamo=True)
    return buf.getvalue()


def _ort_session(model: bytes | str, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def _diff(module: nn.Module, run, shapes: list[tuple[int, ...]], seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            ref = module(x).float().numpy()
        got = run(x)
        if got.shape != ref.shape:
            raise ValueError(f"output shape {got.shape} differs from PyTorch's {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def export_network(network: nn.Module, path: str | Path, fmt: str, patch_size: tuple[int, ...] | list[int],
                   in_channels: int, *, batch_size: int = 2, threads: int | None = None) -> ExportResult:
    """Export one network (float32) and check it against PyTorch.

    Args:
        network: the module (put in eval mode; moved to the CPU).
        path: the file to write (atomically), ``.onnx`` or ``.pt``.
        fmt: ``"onnx"`` or ``"torchscript"``.
        patch_size: the window size it runs on.
        in_channels: input channels.
        batch_size: the example batch (the batch axis is dynamic anyway).
        threads: ONNX Runtime threads of the parity check.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ExportError: the exporter rejects the network, or the parity check fails (> :data:`PARITY_TOL`).
        ConfigError: an unknown format.
    """
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, "one of " + ", ".join(FORMATS))
    name = type(network).__name__
    module = LogitsOnly(network).cpu().eval().float()
    patch = tuple(int(p) for p in patch_size)
    first = (batch_size, in_channels, *patch)
    second = (1, in_channels, *_second_shape(patch))
    example = torch.randn(*first, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            module(torch.zeros(second))
        candidates = [True, False]
        note = ""
    except (RuntimeError, ValueError, AssertionError) as exc:
        candidates, note = [False], f"the network accepts no size but the patch's ({str(exc).splitlines()[0][:120]})"
    last_err = ""
    for dynamic in candidates:
        shapes = [first, second] if dynamic else [first, (1, in_channels, *patch)]
        try:
            if fmt == "onnx":
                data = _onnx_bytes(module, example, dynamic)
                sess = _ort_session(data, threads)
                diff = _diff(module, lambda x, s=sess: s.run(None, {"image": x.numpy()})[0], shapes)
            else:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(module, example, check_trace=False)
                buf = io.BytesIO()
                torch.jit.save(traced, buf)
                data = buf.getvalue()
                loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")

                def _run_ts(x, m=loaded):
                    with torch.no_grad():
                        return m(x).float().numpy()

                diff = _diff(module, _run_ts, shapes)
        except MedsegError:
            raise
        except Exception as exc:  # exporters and runtimes raise many types; each is a reason to report
            last_err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            note = f"dynamic spatial axes failed ({last_err})" if dynamic else note
            continue
        if diff > PARITY_TOL:
            last_err = f"max abs logit difference {diff:.3g} > {PARITY_TOL:g}"
            note = f"dynamic spatial axes: {last_err}" if dynamic else note
            continue
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
        log.info("exported %s to %s (max abs diff %.2g, dynamic spatial axes: %s)", name, path, diff, dynamic)
        return ExportResult(str(path), fmt, dynamic, diff, [list(s) for s in shapes], "" if dynamic else note)
    raise ExportError(f"{name} cannot be exported to {fmt}: {last_err or note}")


def load_fold_network(run: RunFolder, fold: int) -> nn.Module:
    """Rebuild fold ``fold``'s network from its checkpoint (``weights_only=True``), in eval mode on the CPU."""
    from medseg.runtime import build_network, load_checkpoint

    ckpt = load_checkpoint(run.checkpoint(fold))
    record = run.record
    net = build_network(record.network.to_dict(), spatial_dims=record.config.network_dims,
                        in_channels=record.in_channels, out_channels=record.out_channels)
    net.load_state_dict(ckpt["state_dict"])
    return net.eval()


def export_run(run_dir: str | Path, fmt: str, out_dir: str | Path, *, folds: list[int] | None = None,
               int8: bool = False, calibration_cases: int = 8, threads: int | None = None) -> dict[str, Any]:
    """Export every chosen fold of a run: ``OUT/fold_K.onnx`` (or ``fold_K.pt``) and ``OUT/export_report.json``.

    Args:
        run_dir: the run folder.
        fmt: ``"onnx"`` or ``"torchscript"``.
        out_dir: the output folder.
        folds: folds to export (default: the run's).
        int8: also write ``fold_K.int8.onnx`` (static INT8, calibrated on the fold's training cases).
        calibration_cases: training cases per fold for calibration.
        threads: ONNX Runtime threads for the checks.

    Returns:
        The report: per fold the :class:`ExportResult` fields (and the INT8 file with its calibration).

    Raises:
        ExportError: a fold that cannot be exported or fails the parity check.
        InputError: a missing run file, or INT8 without the training data set.
    """
    run = RunFolder(Path(run_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if int8 and fmt != "onnx":
        raise ConfigError("--int8", True, "--format onnx (INT8 models run in ONNX Runtime)")
    folds = run.folds(folds)
    plan = run.plan
    cfg = plan["configurations"][run.configuration]
    patch = tuple(int(p) for p in cfg["patch_size"])  # the network's patch (2 axes for slice-wise configurations)
    report: dict[str, Any] = {"format": fmt, "configuration": run.configuration, "patch_size": list(patch),
                              "parity_tolerance": PARITY_TOL, "folds": {}}
    for f in folds:
        net = load_fold_network(run, f)
        suffix = ".onnx" if fmt == "onnx" else ".pt"
        res = export_network(net, out / f"fold_{f}{suffix}", fmt, patch, int(plan["in_channels"]),
                             batch_size=min(int(cfg["batch_size"]), 8), threads=threads)
        entry = asdict(res)
        entry["path"] = Path(res.path).name
        if int8:
            from medseg.deploy.quantize import quantize_fold

            entry["int8"] = quantize_fold(run, f, out / f"fold_{f}.onnx", out / f"fold_{f}.int8.onnx",
                                          n_cases=calibration_cases)
        report["folds"][str(f)] = entry
    with atomic_path(out / "export_report.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    return report
