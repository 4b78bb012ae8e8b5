"""Helpers shared by the benchmark scripts: device timing, mask agreement, the machine's description, peers."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
#: where the benchmarks look for an interpreter with nnunetv2 (a side venv; never medseg's own)
NNUNET_PYTHONS = (ROOT / ".venv-nnunet" / "bin" / "python", Path("/tmp/nnunet-venv/bin/python"))


def sync(device) -> None:
    """Wait for the device's queued work (CUDA), so that wall clocks measure it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the foreground labels present in either mask (1.0 when both are all background)."""
    labels = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    if not labels:
        return 1.0
    scores = []
    for k in labels:
        x, y = a == k, b == k
        scores.append(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


def nnunet_python(explicit: str | None = None) -> Path | None:
    """The interpreter of a side venv with nnunetv2 (``explicit`` or a known location), or None."""
    for cand in ([Path(explicit)] if explicit else list(NNUNET_PYTHONS)):
        if cand.exists() and (cand.parent / "nnUNetv2_predict").exists():
            return cand
    return None


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def environment(device: str, nnunet: Path | None = None) -> dict:
    """The machine and the software versions: GPU, driver, CUDA, torch, cuDNN, free GPU memory, CPU, peers."""
    import monai
    import torch

    env: dict = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor() or None,
        "cpu_cores": os.cpu_count(), "torch": torch.__version__, "monai": monai.__version__,
        "torch_cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device": device, "git_revision": _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        env.update({
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "gpu_memory_total_gb": round(total / 2**30, 1), "gpu_memory_free_gb": round(free / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(), "bf16_supported": torch.cuda.is_bf16_supported(),
            "nccl": _nccl_version(),
        })
        smi = shutil.which("nvidia-smi")
        if smi:
            env["driver"] = _run([smi, "--query-gpu=driver_version", "--format=csv,noheader"])
    if nnunet is not None:
        env["nnunetv2"] = _run([str(nnunet), "-c", "import importlib.metadata as m; print(m.version('nnunetv2'))"])
        env["nnunet_python"] = str(nnunet)
    return env


def _nccl_version() -> str | None:
    import torch
    import torch.distributed as dist

    try:
        if not dist.is_available() or not dist.is_nccl_available():
            return None
        v = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def hippocampus_subset(src: Path, n: int, dst: Path) -> Path:
    """An MSD folder of the first ``n`` cases of ``src`` (symbolic links and a trimmed dataset.json)."""
    meta = json.loads((src / "dataset.json").read_text())
    meta["training"] = meta["training"][:n]
    meta["numTraining"] = len(meta["training"])
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for entry in meta["training"]:
        for key in ("image", "label"):
            rel = entry[key].removeprefix("./")
            link = dst / rel
            if not link.exists():
                link.symlink_to((src / rel).resolve())
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
    return dst


def validation_inputs(run: Path, data: Path, n: int, folder: Path) -> list[str]:
    """The first ``n`` validation cases of fold 0 of ``run`` as ``folder/CASE_0000.nii.gz`` links into ``data``."""
    splits = json.loads((run / "splits.json").read_text())
    cases = sorted(splits[0]["val"])[:n]
    folder.mkdir(parents=True)
    for c in cases:
        (folder / f"{c}_0000.nii.gz").symlink_to((data / "imagesTr" / f"{c}.nii.gz").resolve())
    return cases


def medseg_env() -> dict[str, str]:
    """The environment for a `python -m medseg.cli.main` subprocess that runs this checkout's medseg."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def medseg_cmd(*args: str) -> list[str]:
    """``medseg ARGS`` as a command line of this interpreter."""
    return [sys.executable, "-m", "medseg.cli.main", *args]
