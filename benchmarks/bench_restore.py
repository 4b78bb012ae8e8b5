"""Restoring a prediction onto the input's grid: ``restore_label`` (probabilities resampled and argmaxed in slabs)
vs resampling the whole probability array and taking the argmax (``restore_original(..., is_label=False)``).

Each way runs in its own process so that its peak memory (max RSS) is its own. Printed per way: seconds, peak RSS
above the plan-space probabilities it starts from, that peak in full-size float32 arrays of the input grid, and
whether the two label maps agree.

    python benchmarks/bench_restore.py                          # 512x512x300 input, 4 classes, plan 2x coarser
    python benchmarks/bench_restore.py --shape 256 256 150 --classes 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _one(way: str, shape: list[int], classes: int, factor: float, out: str) -> None:
    import numpy as np
    import torch

    from medseg.transforms.preprocess import restore_label, restore_original

    torch.set_num_threads(1)
    plan_shape = [max(1, round(n / factor)) for n in shape]
    props = {"shape": plan_shape, "crop_shape": shape, "ras_shape": shape, "bbox": [[0] * len(shape), shape],
             "ornt": [[d, 1] for d in range(len(shape))], "original_shape": shape, "separate_axis": None}
    prob = torch.softmax(torch.randn(classes, *plan_shape, generator=torch.Generator().manual_seed(0)), 0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if way == "slabs":
        label = restore_label(prob, props)
    else:
        label = restore_original(prob.numpy(), props, is_label=False).argmax(0)[None].astype(np.int16)
    seconds = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    np.save(out, label)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs="+", default=[512, 512, 300])
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--factor", type=float, default=2.0, help="input voxels per plan voxel along each axis")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        _one(args._one, args.shape, args.classes, args.factor, args._out)
        return
    import tempfile
    from pathlib import Path

    import numpy as np

    full = 4 * int(np.prod(args.shape))
    labels = {}
    print(f"input {'x'.join(map(str, args.shape))}, {args.classes} classes, plan {args.factor}x coarser; "
          f"one full-size float32 array = {full / 2**20:.0f} MiB")
    print(f"{'way':<8} {'seconds':>8} {'peak MiB':>9} {'full arrays':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("slabs", "whole"):
            out = str(Path(tmp) / f"{way}.npy")
            cmd = [sys.executable, __file__, "--_one", way, "--_out", out, "--classes", str(args.classes),
                   "--factor", str(args.factor), "--shape", *map(str, args.shape)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            labels[way] = np.load(out)
            print(f"{way:<8} {res['seconds']:>8.1f} {res['peak_bytes'] / 2**20:>9.0f} "
                  f"{res['peak_bytes'] / full:>12.2f}")
    print(f"label maps agree on {np.mean(labels['slabs'] == labels['whole']):.6f} of the voxels")


if __name__ == "__main__":
    main()
