"""Sliding-window inference: medseg's engine vs MONAI ``sliding_window_inference`` vs nnU-Net's predictor.

Same network (a small pure-torch 3D U-Net, seeded), same random volume, same patch, overlap and Gaussian
weighting (sigma = patch/8), no mirroring. Engines: ``medseg`` (float32), ``medseg_compile`` (float32, network
compiled by ``medseg.inference.compiled`` before timing; the compile time is printed apart), ``medseg_bf16``
(bf16 autocast, medseg's ``--amp auto`` on a CPU with bf16), ``monai`` (float32), ``monai_bf16`` (MONAI under the
same bf16 autocast, the like-for-like peer of medseg_bf16) and ``nnunet`` (float32, as nnU-Net runs on a CPU). Each engine runs in its own process so that its peak memory
(max RSS) is its own. Printed per engine: seconds (best of --repeats), voxels/s, peak RSS, the share of time spent
outside the network's forward passes, and the max abs difference to a float64 run of the same engine (medseg: a
naive float64 overlap-tile reference with its window placement; MONAI: MONAI itself in float64; nnU-Net: the
difference to medseg, as nnU-Net cannot run in float64).

    python benchmarks/bench_inference.py                        # small CPU run (96x96x64, patch 48^3)
    python benchmarks/bench_inference.py --shape 512 512 1000   # the large-volume memory check (slow on CPU)
    python benchmarks/bench_inference.py --nnunet-python /tmp/nnunet-venv/bin/python

nnU-Net runs when ``--nnunet-python`` names an interpreter with ``nnunetv2`` installed (a separate venv).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve()


class TinyUNet3D(nn.Module):
    """Two-level 3D U-Net in plain torch (so every engine's environment can build it)."""

    def __init__(self, cin: int = 1, k: int = 3, f: int = 16):
        super().__init__()

        def block(a, b):
            return nn.Sequential(nn.Conv3d(a, b, 3, padding=1), nn.InstanceNorm3d(b, affine=True),
                                 nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(b, b, 3, padding=1),
                                 nn.InstanceNorm3d(b, affine=True), nn.LeakyReLU(0.01, inplace=True))

        self.enc1, self.enc2 = block(cin, f), block(f, 2 * f)
        self.down = nn.Conv3d(f, f, 2, stride=2)
        self.up = nn.ConvTranspose3d(2 * f, f, 2, stride=2)
        self.dec = block(2 * f, f)
        self.head = nn.Conv3d(f, k, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(self.down(a))
        return self.head(self.dec(torch.cat([a, self.up(b)], 1)))


class PlainUNet3D(nn.Module):
    """nnU-Net's 3d_fullres network shape in plain torch: stages of two conv-IN-LeakyReLU, stride-2 convolutions
    down, transposed convolutions up (default 32-64-128-256-320-320, 6 stages, 31M parameters)."""

    def __init__(self, cin: int = 1, k: int = 3, features=(32, 64, 128, 256, 320, 320)):
        super().__init__()

        def block(a, b, stride):
            return nn.Sequential(nn.Conv3d(a, b, 3, stride=stride, padding=1), nn.InstanceNorm3d(b, affine=True),
                                 nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(b, b, 3, padding=1),
                                 nn.InstanceNorm3d(b, affine=True), nn.LeakyReLU(0.01, inplace=True))

        f = list(features)
        self.enc = nn.ModuleList([block(cin if i == 0 else f[i - 1], f[i], 1 if i == 0 else 2) for i in range(len(f))])
        self.up = nn.ModuleList([nn.ConvTranspose3d(f[i + 1], f[i], 2, stride=2) for i in range(len(f) - 1)])
        self.dec = nn.ModuleList([block(2 * f[i], f[i], 1) for i in range(len(f) - 1)])
        self.head = nn.Conv3d(f[0], k, 1)

    def forward(self, x):
        skips = []
        for stage in self.enc:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.dec))):
            x = self.dec[i](torch.cat([skips.pop(), self.up[i](x)], 1))
        return self.head(x)


NETWORKS = {"tiny": TinyUNet3D, "fullres": PlainUNet3D}


class TimedForward(nn.Module):
    """Wraps a network and sums the wall time of its forward passes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.seconds = 0.0

    def forward(self, x):
        t = time.perf_counter()
        y = self.net(x)
        if y.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t
        return y


def make_inputs(shape, classes, seed=0, net="tiny"):
    torch.manual_seed(seed)
    net = NETWORKS[net](1, classes).eval()
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    return net, torch.from_numpy(image)


def reference_float64(net, image, patch, overlap):
    """Naive float64 overlap-tile with medseg's window placement (full-size weight map; small volumes only)."""
    import copy

    from medseg.inference.sliding_window import window_starts

    net64 = copy.deepcopy(net).double()
    img = image.double()
    spatial = img.shape[1:]
    lo = [max(p - s, 0) // 2 for s, p in zip(spatial, patch)]
    ext = [max(s, p) for s, p in zip(spatial, patch)]
    pads = [(0, 0)] + [(a, e - s - a) for a, e, s in zip(lo, ext, spatial)]
    padded = torch.from_numpy(np.pad(img.numpy(), pads, mode="reflect"))
    grids = np.meshgrid(*[np.arange(t) - (t - 1) / 2 for t in patch], indexing="ij")
    g = torch.from_numpy(np.exp(-0.5 * sum((x / (t / 8)) ** 2 for x, t in zip(grids, patch))))
    acc, wsum = None, torch.zeros(ext, dtype=torch.float64)
    with torch.no_grad():
        for pos in itertools.product(*[window_starts(s, p, overlap) for s, p in zip(spatial, patch)]):
            sl = tuple(slice(a, a + p) for a, p in zip(pos, patch))
            y = net64(padded[(slice(None), *sl)][None])[0]
            if acc is None:
                acc = torch.zeros((y.shape[0], *ext), dtype=torch.float64)
            acc[(slice(None), *sl)] += y * g
            wsum[sl] += g
    res = acc / wsum
    return res[(slice(None), *[slice(a, a + s) for a, s in zip(lo, spatial)])]


# ------------------------------------------------------------------------------------------------ engines
def run_medseg(net, image, a, dtype=torch.float32, amp=None):
    from medseg.inference import sliding_window_predict

    return sliding_window_predict(net, image, patch_size=a.patch, overlap=a.overlap, batch_size=a.batch,
                                  device=a.device, amp_dtype=amp)


def run_monai(net, image, a, dtype=torch.float32):
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(image[None].to(dtype), roi_size=a.patch, sw_batch_size=a.batch, predictor=net,
                                    overlap=a.overlap, mode="gaussian", sigma_scale=0.125, padding_mode="reflect",
                                    sw_device=a.device, device=a.device)[0]


def run_nnunet(net, image, a, dtype=torch.float32):
    from types import SimpleNamespace

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(tile_step_size=1 - a.overlap, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=a.device != "cpu", device=torch.device(a.device),
                           verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    pred.network = net
    pred.configuration_manager = SimpleNamespace(patch_size=list(a.patch))
    pred.label_manager = SimpleNamespace(num_segmentation_heads=a.classes)
    pred.allowed_mirroring_axes = None
    pred.list_of_parameters = [net.state_dict()]
    return pred.predict_sliding_window_return_logits(image)


def run_medseg_bf16(net, image, a, dtype=torch.float32):
    return run_medseg(net, image, a, amp=torch.bfloat16)


def run_medseg_fp16(net, image, a, dtype=torch.float32):
    return run_medseg(net, image, a, amp=torch.float16)


def run_monai_bf16(net, image, a, dtype=torch.float32):
    with torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16):
        return run_monai(net, image, a).float()


# medseg_compile: run_medseg on the network compiled by medseg.inference.compiled (compilation before timing)
ENGINES = {"medseg": run_medseg, "medseg_bf16": run_medseg_bf16, "medseg_fp16": run_medseg_fp16,
           "medseg_compile": run_medseg, "monai": run_monai,
           "monai_bf16": run_monai_bf16, "nnunet": run_nnunet}


def worker(a) -> dict:
    torch.set_num_threads(a.threads)
    net, image = make_inputs(a.shape, a.classes, a.seed, a.net)
    net = net.to(a.device)
    compile_s = None
    if a.worker == "medseg_compile":
        from medseg.inference.compiled import CompiledNetwork, compile_for_inference

        t = time.perf_counter()
        compiled = compile_for_inference(net, (a.batch, 1, *a.patch), torch.device(a.device))
        compile_s = time.perf_counter() - t
        if not isinstance(compiled, CompiledNetwork):
            raise SystemExit("torch.compile failed (see the log)")
        timed = TimedForward(compiled).eval()
    else:
        timed = TimedForward(net).eval()
    run = ENGINES[a.worker]
    with torch.no_grad():
        run(timed, image, a)  # warm-up
        best, fwd = float("inf"), 0.0
        for _ in range(a.repeats):
            timed.seconds = 0.0
            t = time.perf_counter()
            out = run(timed, image, a)
            if isinstance(out, torch.Tensor) and out.is_cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            if dt < best:
                best, fwd = dt, timed.seconds
    out = torch.as_tensor(out).float().cpu()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB -> MB, before the checks
    diff = None
    if a.check:
        if a.worker.startswith("medseg"):
            ref = reference_float64(net.cpu(), image, a.patch, a.overlap)
        elif a.worker.startswith("monai"):
            with torch.no_grad():
                ref = run_monai(net.double().cpu(), image.double(), argparse.Namespace(**{**vars(a), "device": "cpu"}),
                                torch.float64)
        else:
            ref = None
        if ref is not None:
            diff = float((out.double() - ref.double()).abs().max())
    if a.out_file:
        np.save(a.out_file, out.numpy())
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if a.device != "cpu" else None
    return {"engine": a.worker, "seconds": best, "forward_seconds": fwd, "peak_rss_mb": peak,
            "gpu_peak_mb": gpu_peak, "max_abs_diff_fp64": diff, "compile_s": compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    p.add_argument("--patch", type=int, nargs=3, default=[48, 48, 48])
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=2, help="windows per forward pass")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--net", choices=sorted(NETWORKS), default="tiny",
                   help="tiny: two-level 16-32 U-Net; fullres: nnU-Net 3d_fullres-sized 32-320, 6 stages")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared CPU)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per worker process")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the engines (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the float64 comparisons")
    p.add_argument("--engines", nargs="+",
                   default=["medseg", "medseg_compile", "medseg_bf16", "monai", "monai_bf16", "nnunet"])
    p.add_argument("--nnunet-python", default="/tmp/nnunet-venv/bin/python",
                   help="interpreter with nnunetv2 installed (skipped when absent)")
    p.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--out-file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    rows, outs = run_engines(a)
    print_table(a, rows, outs)


def run_engines(a: argparse.Namespace, log=print) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Run ``a.engines`` (the options of ``main``) in interleaved rounds, each in its own process.

    Returns:
        One row per engine that ran (its best round: seconds, forward seconds, peak RSS and GPU MB, ...) and the
        output of each engine's first round.
    """
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    best: dict[str, dict] = {}
    outs = {}
    engines = []
    for eng in a.engines:
        py = a.nnunet_python if eng == "nnunet" else sys.executable
        if Path(py).exists():
            engines.append((eng, py))
        else:
            log(f"[skip] {eng}: {py} not found")
    # rounds interleave the engines, so that a busy shared CPU slows all of them alike; best round per engine
    for rnd in range(a.rounds):
        for eng, py in engines:
            keep = getattr(a, "keep_outputs", True)  # the suite's 512x512x256 outputs are 0.8 GB each
            cmd = [py, str(HERE), "--worker", eng, "--out-file", str(tmp / f"{eng}.npy") if keep else ""]
            for k in ("shape", "patch"):
                cmd += [f"--{k}", *map(str, getattr(a, k))]
            cmd += ["--net", a.net, "--overlap", str(a.overlap), "--batch", str(a.batch), "--classes", str(a.classes),
                    "--device", a.device, "--threads", str(a.threads), "--repeats", str(a.repeats),
                    "--seed", str(a.seed)]
            if not a.check or rnd > 0:
                cmd.append("--no-check")
            env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": str(a.threads),
                   "nnUNet_raw": str(tmp), "nnUNet_preprocessed": str(tmp), "nnUNet_results": str(tmp)}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                err = res.stderr.strip().splitlines()
                log(f"[fail] {eng}: {err[-1] if err else res.returncode}")
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            old = best.get(eng)
            if old is None or row["seconds"] < old["seconds"]:
                if old is not None:
                    row["max_abs_diff_fp64"] = old["max_abs_diff_fp64"]
                best[eng] = row
            best[eng]["peak_rss_mb"] = max(row["peak_rss_mb"], old["peak_rss_mb"] if old else 0)
            if rnd == 0 and keep:
                outs[eng] = np.load(tmp / f"{eng}.npy")
    shutil.rmtree(tmp, ignore_errors=True)
    return [best[e] for e, _ in engines if e in best], outs


def print_table(a: argparse.Namespace, rows: list[dict], outs: dict[str, np.ndarray]) -> None:
    voxels = float(np.prod(a.shape))
    print(f"\nshape {a.shape}, patch {a.patch}, overlap {a.overlap}, {a.batch} windows/batch, {a.classes} classes, "
          f"device {a.device}, {a.threads} torch thread(s), best of {a.rounds} interleaved rounds x {a.repeats}")
    print(f"{'engine':<12} {'seconds':>8} {'Mvox/s':>8} {'x medseg':>9} {'peak RSS MB':>12} {'outside fwd':>12} "
          f"{'max|d| fp64':>12} {'max|d| medseg':>14}")
    base = next((r["seconds"] for r in rows if r["engine"] == "medseg"), None)
    for r in rows:
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        outside = 1 - r["forward_seconds"] / r["seconds"] if r["seconds"] else float("nan")
        d64 = f"{r['max_abs_diff_fp64']:.2e}" if r["max_abs_diff_fp64"] is not None else "n/a"
        dm = f"{np.abs(outs[r['engine']] - outs['medseg']).max():.2e}" if "medseg" in outs else "n/a"
        print(f"{r['engine']:<12} {r['seconds']:>8.2f} {voxels / r['seconds'] / 1e6:>8.2f} {ratio:>9} "
              f"{r['peak_rss_mb']:>12.0f} {outside:>11.1%} {d64:>12} {dm:>14}")
    for r in rows:
        if r.get("compile_s"):
            print(f"({r['engine']}: {r['compile_s']:.1f} s of compilation before timing, once per process and network)")
    print("(x medseg > 1: slower than medseg; max|d| medseg differs also because window placement differs)")


if __name__ == "__main__":
    main()
