"""nnU-Net v2 on the shared hippocampus data, for side-by-side benchmarks (run with an interpreter that has
``nnunetv2``, e.g. a separate venv: ``python -m venv /tmp/nnunet-venv && /tmp/nnunet-venv/bin/pip install
-c constraints-cpu.txt torch==2.13.0 nnunetv2``).

    PY=/tmp/nnunet-venv/bin/python ROOT=/tmp/nnunet_bench
    $PY benchmarks/nnunet_hippocampus.py setup --data ../shared/data/hippocampus --root $ROOT
    $PY benchmarks/nnunet_hippocampus.py train-bench --root $ROOT --steps 20

``setup`` lays the MSD folder out as ``Dataset004_Hippocampus`` (symbolic links, nothing copied), runs
``nnUNetv2_plan_and_preprocess -c 3d_fullres`` and writes a plans variant ``nnUNetPlans_medseg`` whose 3d_fullres
network is the one medseg's hippocampus plan trains (features 16-32-64-128, same patch, batch 4), so both tools
are timed on the same network, patch and batch.

``train-bench`` builds nnU-Net's own ``nnUNetTrainer`` on that plan (its data loader, augmentation, deep
supervision, Dice+CE, SGD, gradient clipping; float32 on a CPU, as nnU-Net disables autocast there, fp16
autocast with a GradScaler on ``--device cuda``), times
``--steps`` training iterations after a warm-up, prints one JSON line, and saves the weights as
``checkpoint_final.pth`` in the usual results folder, so that ``nnUNetv2_predict -p nnUNetPlans_medseg -f 0
-chk checkpoint_final.pth`` can run (benchmarks/bench_predict.py uses it; the weights are those few steps, so
the masks are for timing only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATASET = "Dataset004_Hippocampus"
PLANS = "nnUNetPlans_medseg"


def _env(root: Path) -> dict[str, str]:
    paths = {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "preprocessed",
             "nnUNet_results": root / "results"}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    return {k: str(v) for k, v in paths.items()}


def setup(data: Path, root: Path, features: list[int], batch: int) -> None:
    env = _env(root)
    raw = Path(env["nnUNet_raw"]) / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (data / "labelsTr").glob("*.nii.gz")
                   if (data / "imagesTr" / p.name).is_file())
    for c in cases:
        for src, dst in ((data / "imagesTr" / f"{c}.nii.gz", raw / "imagesTr" / f"{c}_0000.nii.gz"),
                         (data / "labelsTr" / f"{c}.nii.gz", raw / "labelsTr" / f"{c}.nii.gz")):
            if not dst.exists():
                dst.symlink_to(src.resolve())
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"}, indent=1))
    bindir = Path(sys.executable).parent
    subprocess.run([str(bindir / "nnUNetv2_plan_and_preprocess"), "-d", "4", "-c", "3d_fullres", "-np", "2"],
                   check=True, env={**os.environ, **env})
    pre = Path(env["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    conf = plans["configurations"]["3d_fullres"]
    arch = conf["architecture"]["arch_kwargs"]
    n = int(arch["n_stages"])
    print(f"nnU-Net's own 3d_fullres plan: patch {conf['patch_size']}, batch {conf['batch_size']}, "
          f"features {arch['features_per_stage']}, strides {arch['strides']}")
    arch["features_per_stage"] = [int(features[min(i, len(features) - 1)]) for i in range(n)]
    conf["batch_size"] = batch
    plans["plans_name"] = PLANS
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))
    print(f"{PLANS}: features {arch['features_per_stage']}, batch {batch} -> {pre / (PLANS + '.json')}")


def train_bench(root: Path, steps: int, fold: int, batch: int | None = None, device: str = "cpu") -> None:
    env = _env(root)
    os.environ.update(env)
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pre = Path(env["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    if batch:
        plans["configurations"]["3d_fullres"]["batch_size"] = int(batch)
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds
    dataset_json = json.loads((pre / "dataset.json").read_text())
    tr = nnUNetTrainer(plans, "3d_fullres", fold, dataset_json, device=torch.device(device))
    tr.num_epochs = 1
    tr.on_train_start()
    tr.on_train_epoch_start()
    tr.train_step(next(tr.dataloader_train))  # warm-up
    data_s = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(tr.dataloader_train)
        data_s += time.perf_counter() - t
        tr.train_step(batch)
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tr.current_epoch = 1
    tr.on_train_end()  # writes checkpoint_final.pth and stops the loader processes
    conf = plans["configurations"]["3d_fullres"]
    print(json.dumps({"loop": "nnunet_trainer", "s_per_step": dt, "data_wait_s_per_step": data_s / steps,
                      "batch": conf["batch_size"], "patch": conf["patch_size"],
                      "features": conf["architecture"]["arch_kwargs"]["features_per_stage"],
                      "threads": torch.get_num_threads(), "results": str(tr.output_folder), "device": device,
                      # nnU-Net's train_step autocasts (fp16, GradScaler) on CUDA only
                      "amp": "fp16" if tr.device.type == "cuda" else "fp32"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--data", type=Path, required=True, help="the MSD hippocampus folder")
    s.add_argument("--root", type=Path, required=True, help="nnU-Net raw/preprocessed/results go under here")
    s.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    s.add_argument("--batch", type=int, default=4)
    t = sub.add_parser("train-bench")
    t.add_argument("--root", type=Path, required=True)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--fold", type=int, default=0)
    t.add_argument("--batch", type=int, default=None, help="batch size (default: the plans variant's)")
    t.add_argument("--device", default="cpu", help="cpu or cuda (nnU-Net autocasts to fp16 on CUDA)")
    a = ap.parse_args()
    if a.cmd == "setup":
        setup(a.data, a.root, a.features, a.batch)
    else:
        train_bench(a.root, a.steps, a.fold, a.batch, a.device)


if __name__ == "__main__":
    main()
