"""Runtimes side by side on one trained hippocampus model: seconds, peak RSS and Dice per runtime.

    .venv/bin/python benchmarks/bench_runtimes.py --run runs/hippocampus_3d [--rows ...] [--big 256 256 128]

Each row runs in a fresh process (so peak RSS is the row's own) with the same run folder, the same
preprocessing, sliding-window windows (patch, 50% overlap, Gaussian weights), the same test-time mirroring (the
run's mirror axes) and the same argmax and inverse preprocessing; only the network's runtime changes:

- ``torch_fp32``, ``torch_bf16`` (only where the CPU has native bf16), ``torch_compile`` (fp32, ``--compile``):
  medseg's Predictor;
- ``ort_fp32``, ``ort_int8``: ``medseg.deploy.load_predictor(runtime="onnxruntime")``; the ONNX files (and the
  INT8 calibration on 8 training cases of fold 0) are made once before timing, as ``medseg export-model --int8``
  does, and read from the run's ``onnx/`` folder;
- ``monai_fp32``: MONAI's ``sliding_window_inference`` (Gaussian, overlap 0.5, reflect padding like medseg's
  mirrored borders; MONAI's default zero padding costs 0.05 Dice here, as the crops are smaller than the patch)
  on the same network in float32, with the same mirroring, preprocessing and inverse.

Printed per row: end-to-end seconds for the 40 validation cases of fold 0 (read, preprocess, predict, restore;
model loading excluded and reported apart), seconds for one plan-space volume of ``--big`` voxels (no
mirroring), peak RSS, and mean foreground Dice against the expert labels. nnU-Net's predictor is timed by
benchmarks/bench_predict.py (it needs its own venv).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
ROWS = ("torch_fp32", "torch_bf16", "torch_compile", "ort_fp32", "ort_int8", "monai_fp32")


def _cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in flags)


class _Monai:
    """A Predictor-shaped object whose ``predict_array`` is MONAI's sliding_window_inference."""

    def __init__(self, pred) -> None:
        self.pred = pred

    def predict_array(self, image):
        import torch
        from monai.inferers import sliding_window_inference

        p = self.pred
        x = torch.as_tensor(np.ascontiguousarray(image))[None]
        total = None
        with torch.inference_mode():
            for net in p.networks:
                flips = [[]] + [[a + 2] for a in p.mirror_axes]  # the run's mirror axes (one axis: 2 passes)
                for flip in flips:
                    xi = torch.flip(x, flip) if flip else x

                    def fwd(t, n=net):
                        y = n(t)
                        return y[0] if isinstance(y, (list, tuple)) else y

                    y = sliding_window_inference(xi, p.patch_size, p.batch_size, fwd, overlap=0.5, mode="gaussian",
                                                 padding_mode="reflect")
                    y = torch.softmax(y.float(), 1)
                    y = torch.flip(y, flip) if flip else y
                    total = y if total is None else total + y
        return total[0] / (len(p.networks) * (1 + len(p.mirror_axes)))


def _row(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from medseg.deploy import load_predictor
    from medseg.transforms.case import load_case
    from medseg.transforms.preprocess import preprocess_volume, restore_original

    t0 = time.perf_counter()
    runtime = "onnxruntime" if args.row.startswith("ort") else "torch"
    precision = {"torch_bf16": "bf16", "ort_int8": "int8"}.get(args.row, "fp32")
    pred = load_predictor(args.run, runtime=runtime, precision=precision, device="cpu", folds=[0],
                          compile=args.row == "torch_compile", threads=args.threads)
    engine = _Monai(pred) if args.row == "monai_fp32" else pred
    load_s = time.perf_counter() - t0
    cases = sorted(json.loads((args.run / "splits.json").read_text())[0]["val"])[: args.cases]
    dices = []
    t0 = time.perf_counter()
    for c in cases:
        image, label = load_case([args.data / "imagesTr" / f"{c}.nii.gz"], args.data / "labelsTr" / f"{c}.nii.gz")
        x, _, props = preprocess_volume(image, pred.plan, pred.config_name)
        prob = engine.predict_array(x)
        mask = restore_original(prob.argmax(0, keepdim=True).numpy().astype(np.int16), props, is_label=True)
        for k in (1, 2):
            a, b = mask[0] == k, label.array[0] == k
            if a.any() or b.any():
                dices.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    cases_s = time.perf_counter() - t0
    big_s = None
    if args.big:
        pred.mirror_axes = ()  # MONAI's row reads this; medseg's engine holds its own copy, which must agree
        if hasattr(pred, "inferer"):
            import dataclasses

            pred.inferer = dataclasses.replace(pred.inferer, mirror_axes=())
        vol = np.random.default_rng(0).normal(size=(1, *args.big)).astype(np.float32)
        t0 = time.perf_counter()
        engine.predict_array(vol)
        big_s = time.perf_counter() - t0
    return {"row": args.row, "load_s": round(load_s, 2), "cases": len(cases), "cases_s": round(cases_s, 2),
            "big_s": None if big_s is None else round(big_s, 2), "dice": round(float(np.mean(dices)), 4) if dices else None,
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike getrusage's ru_maxrss, which a child inherits)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _prepare_onnx(run: Path, threads: int) -> None:
    from medseg.deploy.export import export_run

    if not (run / "onnx" / "fold_0.int8.onnx").is_file():
        t0 = time.perf_counter()
        export_run(run, "onnx", run / "onnx", folds=[0], int8=True, threads=threads)
        print(f"# ONNX export + INT8 calibration of fold 0: {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a medseg run folder trained on hippocampus")
    ap.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data" / "hippocampus")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--cases", type=int, default=40, help="validation cases of fold 0")
    ap.add_argument("--big", type=int, nargs="+", default=[256, 256, 128], help="large volume (plan space); 0: skip")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.big = None if args.big == [0] else args.big
    if args.row:
        print("ROW " + json.dumps(_row(args)), flush=True)
        return
    from medseg.runtime import cpu_has_bf16

    print(f"# CPU flags: {_cpu_flags()}; threads {args.threads}; run {args.run}")
    if any(r.startswith("ort") for r in args.rows):
        _prepare_onnx(args.run, args.threads)
    results = []
    for row in args.rows:
        if row == "torch_bf16" and not cpu_has_bf16():
            print(f"# {row}: skipped (no native bf16 on this CPU)")
            continue
        cmd = [sys.executable, str(HERE), "--run", str(args.run), "--data", str(args.data), "--row", row,
               "--cases", str(args.cases), "--threads", str(args.threads), "--big", *map(str, args.big or [0])]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("ROW ")), None)
        if res.returncode or not line:
            print(f"# {row}: failed: {' | '.join(res.stderr.strip().splitlines()[-3:])}")
            continue
        results.append(json.loads(line[4:]))
        print(json.dumps(results[-1]), flush=True)
    print("\n| row | load s | cases | cases s | big volume s | peak RSS MB | mean fg Dice |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['load_s']} | {r['cases']} | {r['cases_s']} | {r['big_s']} | {r['peak_rss_mb']} | "
              f"{r['dice']} |")


if __name__ == "__main__":
    main()
