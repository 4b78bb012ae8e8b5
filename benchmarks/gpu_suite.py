"""The GPU path, verified: one command that checks and times every CUDA path of medseg, with a JSON and a
Markdown report (docs/gpu.md says how to run it on a GPU server and what each check means).

    python benchmarks/gpu_suite.py --device cuda                 # the full suite (one H100/H200-class GPU)
    python benchmarks/gpu_suite.py --device cpu --quick          # the CPU smoke run CI keeps green (~1 minute)
    python benchmarks/gpu_suite.py --device cuda --model RUN     # reuse a trained hippocampus run (no crossval)

Sections, in order (each one's rows are pass / fail / info / "skipped: why" / "error: why"):
  environment   GPU, driver, CUDA, torch, cuDNN, NCCL, free GPU memory, CPU, peers' versions
  accuracy      `medseg crossval` fold 0 on hippocampus for --time-budget minutes on --device; out-of-fold Dice
                and Dice per minute. Its run folder is the hippocampus model of the sections below
  correctness   fp32 vs fp16 vs bf16 masks (Dice >= 0.998 against fp32), GPU vs CPU masks, the out-of-memory
                fallback forced under torch.cuda.set_per_process_memory_fraction (same mask), DDP at world 1 and 2
  training      iterations/s at equal network, patch and batch: medseg Trainer vs a plain MONAI loop vs
                nnU-Net's nnUNetTrainer.train_step, fp16/bf16, with and without torch.compile (target >= 1.5x nnU-Net)
  inference     the engine vs MONAI sliding_window_inference vs nnU-Net's predictor, 512x512x256 volume, 3d_fullres
                network: seconds, peak GPU memory, share of time outside the forward passes (target <= 10%)
  end_to_end    `medseg predict` vs `nnUNetv2_predict` on 20 hippocampus cases

nnU-Net rows run when an interpreter with nnunetv2 is found (--nnunet-python, else .venv-nnunet/ in the checkout
or /tmp/nnunet-venv); they are "skipped" otherwise. The exit code is 1 when any row failed or errored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_helpers as _common  # noqa: E402
from bench_helpers import ROOT, SHARED_DATA, mask_dice, medseg_cmd, medseg_env, sync  # noqa: E402

SECTIONS = ("environment", "accuracy", "correctness", "training", "inference", "end_to_end")
DICE_PRECISION = 0.998  # fp16 / bf16 masks against fp32 (the bar)
DICE_SAME = 0.999  # masks that should be the same up to float rounding (GPU vs CPU, out-of-memory fallback)
NO_CUDA = "skipped: no CUDA"


@dataclass
class Row:
    """One line of the report."""

    section: str
    check: str
    status: str  # pass | fail | info | skipped: why | error: why
    value: str = ""
    target: str = ""
    detail: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------- adapter
# The only calls into medseg internals that the lead's runtime/Predictor refactor may move; keep them here.
def adapter_network(run_dir: Path, device: str):
    """(eval network on ``device``, patch size, number of classes) of fold 0 of a run folder."""
    from medseg.inference import Predictor

    pred = Predictor.from_run(run_dir, folds=[0], device=device, amp="fp32")
    return pred.networks[0], tuple(pred.patch_size), int(pred.num_classes)


def adapter_predict_masks(run_dir: Path, paths: list[Path], device: str, amp: str) -> list[np.ndarray]:
    """Masks (uint8 arrays) of ``paths`` by the run's Predictor at ``amp`` on ``device`` (test-time mirroring on)."""
    from medseg.inference import Predictor
    from medseg.io import read_volume

    pred = Predictor.from_run(run_dir, device=device, amp=amp)
    return [np.asarray(pred.predict(read_volume(p)).array) for p in paths]


def adapter_plan_network(plan_json: Path, configuration: str = "3d_fullres") -> dict:
    """What a plan sizes for its device: network name and kwargs, channels, classes, patch, batch, estimate."""
    plan = json.loads(plan_json.read_text())
    conf = plan["configurations"][configuration]
    return {"name": conf["network"]["name"], "kwargs": conf["network"]["kwargs"],
            "spatial_dims": int(plan["spatial_dims"]), "in_channels": int(plan["in_channels"]),
            "out_channels": int(plan["num_classes"]), "patch_size": [int(p) for p in conf["patch_size"]],
            "batch_size": int(conf["batch_size"]), "estimated_gb": conf.get("estimated_memory_gb"),
            "memory_gb": plan.get("memory_gb")}


def adapter_crossval_is_yaml_free() -> bool:
    """Whether `medseg crossval` runs from ``--dataset`` alone (no required ``--config``)."""
    from medseg.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return not any(a.required for a in sub.choices["crossval"]._actions if "--config" in a.option_strings)


# ----------------------------------------------------------------------------------------------------- the suite
class Suite:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.device = a.device
        self.cuda = a.device == "cuda"
        self.quick = a.quick
        self.work = a.work
        self.rows: list[Row] = []
        self.seconds: dict[str, float] = {}
        self.model: Path | None = a.model
        self.nnunet = _common.nnunet_python(a.nnunet_python)
        self.nnunet_root = self.work / "nnunet"
        self.nnunet_setup: subprocess.Popen | None = None
        self.environment: dict = {}

    def add(self, section: str, check: str, status: str, value: str = "", target: str = "", **detail) -> None:
        self.rows.append(Row(section, check, status, value, target, detail))
        print(f"[{section}] {check}: {status} {value}".rstrip(), flush=True)

    # ------------------------------------------------------------------ helpers
    def _cases(self, n: int) -> list[Path]:
        """Images of the first ``n`` fold-0 validation cases of the model's run (hippocampus)."""
        splits = json.loads((self.model / "splits.json").read_text())
        return [self.a.data / "imagesTr" / f"{c}.nii.gz" for c in sorted(splits[0]["val"])[:n]]

    def _start_nnunet_setup(self) -> None:
        if self.nnunet is None or self.nnunet_root.exists():
            return
        log = open(self.work / "nnunet_setup.log", "w")  # noqa: SIM115 (closed with the process)
        self.nnunet_setup = subprocess.Popen(
            [str(self.nnunet), str(ROOT / "benchmarks" / "nnunet_hippocampus.py"), "setup", "--data",
             str(self.a.data), "--root", str(self.nnunet_root)], stdout=log, stderr=subprocess.STDOUT)

    def _nnunet_ready(self) -> str | None:
        """None when nnU-Net's plans variant is ready, else why not."""
        if self.nnunet is None:
            return "skipped: nnunetv2 not found (--nnunet-python, .venv-nnunet/ or /tmp/nnunet-venv)"
        if self.nnunet_setup is not None and self.nnunet_setup.wait() != 0:
            return f"error: nnU-Net setup failed (see {self.work / 'nnunet_setup.log'})"
        return None

    # ------------------------------------------------------------------ sections
    def environment_(self) -> None:
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch.cuda.is_available() is False: install the CUDA build of torch "
                             "(requirements-gpu.txt) or run with --device cpu --quick")
        self.environment = _common.environment(self.device, self.nnunet)
        e = self.environment
        self.add("environment", "GPU", "info", ", ".join(e.get("gpus", [])) or "none (no CUDA)")
        for key in ("driver", "torch_cuda_build", "cudnn", "nccl", "gpu_memory_free_gb", "torch", "monai", "cpu",
                    "cpu_cores", "nnunetv2"):
            if e.get(key) is not None:
                self.add("environment", key, "info", str(e[key]))

    def accuracy(self) -> None:
        if self.a.model is not None:
            self.add("accuracy", "crossval fold 0", f"skipped: --model {self.a.model} given")
            return
        data = self.a.data
        budget = self.a.time_budget
        out = self.work / "hippocampus_run"
        if self.quick:  # a few cases and steps through the same command: proves the path, not the Dice
            data = _common.hippocampus_subset(self.a.data, 10, self.work / "hippocampus_subset")
        if adapter_crossval_is_yaml_free() and not self.quick:
            form = "yaml-free"
            args = ["crossval", "--dataset", str(data), "--folds", "0", "--time-budget", str(budget), "--device",
                    self.device, "--output", str(out), "--no-progress"]
        else:
            import yaml

            form = "pipeline yaml + max_minutes"
            cfg = yaml.safe_load((ROOT / "pipelines" / "hippocampus_3d.yaml").read_text())
            cfg["dataset"] = str(data.resolve())
            cfg["train"]["max_minutes"] = budget
            if self.quick:
                cfg["train"].update(epochs=1, batches_per_epoch=2, batch_size=2, val_every=1, val_max_cases=1)
            yml = self.work / "hippocampus_3d.yaml"
            yml.write_text(yaml.safe_dump(cfg, sort_keys=False))
            args = ["crossval", "--config", str(yml), "--folds", "0", "--time-budget", str(budget), "--device",
                    self.device, "--output", str(out), "--no-progress"]
        cmd = medseg_cmd(*args)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=medseg_env())
        wall = time.perf_counter() - t0
        shown = "medseg " + " ".join(args)
        if res.returncode != 0:
            self.add("accuracy", "crossval fold 0", f"error: exit {res.returncode}: {_tail(res.stderr)}",
                     command=shown)
            return
        self.model = out
        summary = json.loads((out / "crossval_summary.json").read_text())
        dice = summary["mean_foreground_dice"]
        per_class = {lab: round(e["metrics"]["dice"]["mean"], 4) for lab, e in summary["classes"].items()}
        train_min = _training_minutes(out / "fold_0" / "metrics.csv")
        self.add("accuracy", "out-of-fold Dice, fold 0", "info", f"{dice:.4f}",
                 "0.89 (20 CPU minutes, docs/benchmarks.md)" if not self.quick else "",
                 command=shown, form=form, per_class=per_class, cases=summary["n_cases"])
        self.add("accuracy", "wall minutes (plan, preprocess, train, predict)", "info", f"{wall / 60:.2f}",
                 training_minutes=train_min)
        self.add("accuracy", f"Dice per {self.device.upper()} minute", "info",
                 f"{dice / (wall / 60):.3f}", note="out-of-fold Dice / wall minutes of the whole command")

    def correctness(self) -> None:
        if self.model is None:
            self.add("correctness", "all", "skipped: no hippocampus model (accuracy did not run; give --model)")
            return
        paths = self._cases(1 if self.quick else 8)
        from medseg.errors import MedsegError

        ref = adapter_predict_masks(self.model, paths, self.device, "fp32")
        for amp in ("fp16", "bf16"):
            try:
                masks = adapter_predict_masks(self.model, paths, self.device, amp)
            except (MedsegError, RuntimeError) as err:  # medseg refuses fp16 on a CPU
                self.add("correctness", f"{amp} vs fp32 masks", f"skipped: {amp} on {self.device}: {_first(err)}")
                continue
            dices = [mask_dice(m, r) for m, r in zip(masks, ref)]
            # --quick's model has had two steps: its logits are near ties, so the bar is for a trained model only
            status = "info" if self.quick else _ok(min(dices) >= DICE_PRECISION)
            self.add("correctness", f"{amp} vs fp32 masks ({len(paths)} cases, min Dice)", status,
                     f"{min(dices):.5f}", f">= {DICE_PRECISION}" + (" (trained model; not in --quick)" * self.quick),
                     per_case=[round(d, 5) for d in dices])
        if not self.cuda:
            self.add("correctness", "GPU vs CPU masks", NO_CUDA)
        else:
            cpu = adapter_predict_masks(self.model, paths, "cpu", "fp32")
            dices = [mask_dice(m, r) for m, r in zip(cpu, ref)]
            same = float(np.mean([np.mean(m == r) for m, r in zip(cpu, ref)]))
            self.add("correctness", "GPU vs CPU masks (fp32, min Dice)", _ok(min(dices) >= DICE_SAME),
                     f"{min(dices):.5f}", f">= {DICE_SAME}", identical_voxels=same)
        self._plan_memory()
        self._oom_fallback()
        for world in (1, 2):
            self._ddp(world)

    def _plan_memory(self) -> None:
        """`medseg plan --device cuda --gpu-memory G`: does one training step at the plan's patch and batch fit G?"""
        from medseg.networks.memory import measure_peak_memory

        data = self.a.plan_data if (self.a.plan_data / "dataset.json").is_file() else self.a.data
        gb = self.a.gpu_memory
        out = self.work / "plan_cuda.json"
        args = ["plan", str(data), "-o", str(out), "--device", "cuda", "--gpu-memory", str(gb), "--max-cases",
                "2" if self.quick else "6"]
        res = subprocess.run(medseg_cmd("-q", *args), capture_output=True, text=True, env=medseg_env())
        name = f"plan for a {gb:g} GB GPU ({data.name}): training step peak"
        if res.returncode != 0:
            self.add("correctness", name, f"error: exit {res.returncode}: {_tail(res.stderr)}")
            return
        n = adapter_plan_network(out)
        planned = f"patch {'x'.join(map(str, n['patch_size']))}, batch {n['batch_size']}, estimate {n['estimated_gb']} GB"
        if not self.cuda:
            self.add("correctness", name, NO_CUDA, planned, f"<= {gb:g} GB", command="medseg " + " ".join(args))
            return
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.cuda.empty_cache()
        peak = measure_peak_memory(n["name"], n["kwargs"], n["spatial_dims"], n["in_channels"], n["out_channels"],
                                   n["patch_size"], n["batch_size"], dtype=dtype, device="cuda") / 2**30
        self.add("correctness", name, _ok(peak <= gb), f"{peak:.2f} GB measured ({planned})", f"<= {gb:g} GB",
                 command="medseg " + " ".join(args), measured_gb=peak, dtype=str(dtype),
                 estimate_over_measured=(n["estimated_gb"] / peak) if n["estimated_gb"] else None)

    def _oom_fallback(self) -> None:
        name = "out-of-memory fallback under a memory cap"
        if not self.cuda:
            self.add("correctness", name, NO_CUDA)
            return
        from medseg.inference import sliding_window_predict
        from medseg.io import read_volume

        net, patch, k = adapter_network(self.model, "cuda")
        case = np.asarray(read_volume(self._cases(1)[0]).array, dtype=np.float32)
        case = (case - case.mean()) / (case.std() + 1e-8)
        kw = {"patch_size": patch, "overlap": 0.25, "batch_size": 4, "device": "cuda", "activation": "softmax"}

        def predict(vol, **extra):  # the mask, argmax taken on the host (no device memory beyond the engine's)
            t0 = time.perf_counter()
            prob = sliding_window_predict(net, vol, **kw, **extra)
            return prob.cpu().argmax(0).to(torch.uint8).numpy(), time.perf_counter() - t0

        # what the windows alone need on the device: host accumulation of a small volume
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        predict(tiled_volume(case, [2 * p for p in patch]), accumulate_on_host=True)
        windows_peak = torch.cuda.max_memory_allocated() - base
        cap_extra = int(windows_peak * 1.5) + 64 * 2**20
        shape = oom_volume_shape(cap_extra, k, case.shape[0])
        vol = tiled_volume(case, shape)
        acc = (k + case.shape[0]) * vol[0].numel() * 4  # device accumulator + the input moved to the device
        host, host_s = predict(vol, accumulate_on_host=True)
        ref, ref_s = predict(vol)  # uncapped, accumulation on the device
        messages = _capture_log("medseg")
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + cap_extra) / total)
        try:
            capped, capped_s = predict(vol)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            logging.getLogger("medseg").removeHandler(messages)
        fell_back = any("out of memory" in m for m in messages.records)
        d = mask_dice(capped, ref)
        self.add("correctness", f"{name} ({'x'.join(map(str, shape))} volume, cap +{cap_extra / 2**20:.0f} MB)",
                 _ok(fell_back and d >= DICE_SAME), f"fallback {'taken' if fell_back else 'NOT taken'}, Dice {d:.5f}",
                 f"fallback taken, >= {DICE_SAME}", cap_extra_mb=round(cap_extra / 2**20),
                 accumulator_and_input_mb=round(acc / 2**20), windows_peak_mb=round(windows_peak / 2**20),
                 capped_s=round(capped_s, 2), device_accumulation_s=round(ref_s, 2),
                 host_accumulation_s=round(host_s, 2), identical_voxels=float(np.mean(capped == ref)),
                 host_vs_device_dice=mask_dice(host, ref), log=messages.records[:3])

    def _ddp(self, world: int) -> None:
        backend = "NCCL" if self.cuda else "gloo"
        name = f"DDP, {backend}, world size {world}"
        if self.cuda and torch.cuda.device_count() < world:
            self.add("correctness", name, f"skipped: {torch.cuda.device_count()} GPU(s)")
            return
        if self.quick and world > 1:
            self.add("correctness", name, "skipped: --quick (the default test suite runs gloo at world 2)")
            return
        out = self.work / f"ddp_{world}"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(ROOT / "benchmarks" / "_gpu_ddp_worker.py"), str(out), self.device]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**medseg_env(), "OMP_NUM_THREADS": "1"},
                             timeout=300)
        if res.returncode != 0:
            self.add("correctness", name, f"error: exit {res.returncode}: {_tail(res.stderr)}")
            return
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
        same = all(torch.equal(v, ranks[-1]["state_dict"][k]) for k, v in ranks[0]["state_dict"].items())
        ok = (all(r["allreduce_ok"] and r["grad_diff"] <= 1e-6 and r["epochs"] == 1 for r in ranks) and same
              and all(r["trainer_ddp"] == (world > 1) for r in ranks)
              and all(r["backend"] == backend.lower() for r in ranks))
        self.add("correctness", name, _ok(ok), f"max |DDP grad - local grad| {max(r['grad_diff'] for r in ranks):.1e}"
                 + (", ranks identical" if world > 1 and same else ""),
                 "all-reduce exact, grads equal, ranks identical", backend=ranks[0]["backend"])

    def training(self) -> None:
        import bench_training as bt

        patch, batch, steps = ((24, 24, 24), 2, 1) if self.quick else ((40, 56, 40), 4, 50 if self.cuda else 10)
        batches = bt._batches(steps + 1, batch, patch, 3, device=self.device)
        precisions = ["bf16"] if not self.cuda else ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
        if not self.cuda and not self.quick:
            precisions = ["fp32", "bf16"]
        compiles = [False] if self.quick or self.a.no_compile else [False, True]
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        rates: dict[tuple[str, str, bool], float] = {}
        for comp in compiles:
            # compiled: one precision only (a compilation of each loop takes about a minute); bf16 where it runs
            for prec in precisions if not comp else [precisions[-1]]:
                s = bt.monai_loop(batches, amp=prec != "fp32", device=self.device, dtype=dtypes[prec], compile=comp)
                rates["monai", prec, comp] = 1 / s
                amp = {"fp32": "none"}.get(prec, prec)
                s, _ = bt.medseg_step(batches, patch, device=self.device, amp=amp, compile=comp)
                rates["medseg", prec, comp] = 1 / s
        if self.quick or self.a.no_compile:
            self.add("training", "torch.compile rows", "skipped: --quick or --no-compile")
        why = self._nnunet_ready()
        nn_rate = None
        if why is None:
            try:
                r = bt.nnunet_step(str(self.nnunet), self.nnunet_root, steps, batch, self.device)
                nn_rate = 1 / r["s_per_step"]
                self.add("training", f"nnU-Net nnUNetTrainer.train_step ({r['amp']})", "info", f"{nn_rate:.2f} it/s",
                         batch=r["batch"], patch=r["patch"], data_wait_s_per_step=r["data_wait_s_per_step"])
            except RuntimeError as err:
                why = f"error: {err}"
        if why is not None:
            self.add("training", "nnU-Net nnUNetTrainer.train_step", why)
        for (loop, prec, comp), rate in rates.items():
            label = f"{'medseg Trainer' if loop == 'medseg' else 'plain MONAI loop'}, {prec}" + (", compiled" * comp)
            vs_monai = rate / rates["monai", prec, comp]
            if loop == "medseg" and nn_rate:
                ratio = rate / nn_rate
                self.add("training", label, _ok(ratio >= 1.5), f"{rate:.2f} it/s, {ratio:.2f}x nnU-Net",
                         ">= 1.5x nnU-Net", vs_monai=round(vs_monai, 3), patch=patch, batch=batch)
            else:
                self.add("training", label, "info", f"{rate:.2f} it/s ({vs_monai:.2f}x MONAI)", patch=patch,
                         batch=batch)

    def inference(self) -> None:
        import bench_inference as bi

        if self.cuda:
            shape, patch, net, batch = (512, 512, 256), (128, 128, 128), "fullres", 2
            # (medseg_compile, bench_inference.py's compiled engine, is left out: a minute of compilation here)
            engines = ["medseg", "medseg_fp16", "medseg_bf16", "monai", "monai_bf16", "nnunet"]
        elif self.quick:
            shape, patch, net, batch, engines = (48, 48, 32), (32, 32, 32), "tiny", 2, ["medseg", "monai"]
        else:
            shape, patch, net, batch = (96, 96, 64), (48, 48, 48), "tiny", 2
            engines = ["medseg", "medseg_bf16", "monai", "monai_bf16", "nnunet"]
        if self.nnunet is None and "nnunet" in engines:
            engines.remove("nnunet")
            self.add("inference", "nnU-Net predictor", "skipped: nnunetv2 not found")
        a = SimpleNamespace(shape=list(shape), patch=list(patch), overlap=0.5, batch=batch, classes=3, net=net,
                            device=self.device, threads=1 if not self.cuda else 4, repeats=1, rounds=1, seed=0,
                            check=False, engines=engines, nnunet_python=str(self.nnunet or ""), keep_outputs=False)
        failures: list[str] = []
        rows, _ = bi.run_engines(a, log=failures.append)
        for msg in failures:
            self.add("inference", msg.split(":")[0].strip("[] "), f"error: {msg}")
        base = next((r["seconds"] for r in rows if r["engine"] == "medseg"), None)
        where = f"{'x'.join(map(str, shape))}, patch {'x'.join(map(str, patch))}, {net} network"
        for r in rows:
            outside = 1 - r["forward_seconds"] / r["seconds"]
            gpu = f", peak GPU {r['gpu_peak_mb']:.0f} MB" if r.get("gpu_peak_mb") else ""
            value = f"{r['seconds']:.2f} s{gpu}, {outside:.1%} outside forward"
            detail = {"seconds": r["seconds"], "outside_forward": outside, "gpu_peak_mb": r.get("gpu_peak_mb"),
                      "peak_rss_mb": r["peak_rss_mb"], "vs_medseg": r["seconds"] / base if base else None,
                      "compile_s": r.get("compile_s"), "volume": where}
            if r["engine"].startswith("medseg"):
                self.add("inference", f"{r['engine']} ({where})", _ok(outside <= 0.10), value,
                         "<= 10% outside forward", **detail)
            else:
                self.add("inference", f"{r['engine']} ({where})", "info", value, **detail)

    def end_to_end(self) -> None:
        import bench_predict as bp

        if self.model is None:
            self.add("end_to_end", "medseg predict", "skipped: no hippocampus model")
            return
        why = self._nnunet_ready()
        results_ok = why is None and any((self.nnunet_root / "results").rglob("checkpoint_final.pth"))
        if why is None and not results_ok:
            why = "skipped: no nnU-Net results folder (the training section's nnU-Net row writes it)"
        if why is None and self.quick:
            why = "skipped: --quick runs medseg's row only"
        if why is not None:
            self.add("end_to_end", "nnUNetv2_predict", why)
        a = SimpleNamespace(medseg_run=self.model, data=self.a.data, nnunet_python=str(self.nnunet or "/nonexistent"),
                            nnunet_root=self.nnunet_root, cases=2 if self.quick else 20, rounds=1,
                            rows=["m0"] if self.quick else ["m0", "n0", "mn", "nn"] if results_ok else ["m0", "mn"],
                            device=self.device)
        failures: list[str] = []
        for r in bp.run_rows(a, log=failures.append):
            ok = r["masks"] == r["cases"] and r["geometry_same"]
            ratio = f", {r['vs_nnunet']:.2f}x nnU-Net" if r["vs_nnunet"] and r["key"][0] == "m" else ""
            self.add("end_to_end", f"{r['command']} ({r['precision_mirrors']})", _ok(ok),
                     f"{r['wall_s']:.1f} s for {r['cases']} cases{ratio}, Dice {r['dice']:.3f}",
                     "every mask written, input geometry", **r)
        for msg in failures:
            if not msg.startswith("[skip]"):
                self.add("end_to_end", msg.split(":")[0].strip("[] "), f"error: {msg}")

    # ------------------------------------------------------------------ running and reporting
    def run(self) -> int:
        wanted = self.a.sections or list(SECTIONS)
        if {"training", "end_to_end"} & set(wanted):
            self._start_nnunet_setup()  # nnU-Net's CPU preprocessing overlaps the accuracy run
        for name in SECTIONS:
            if name not in wanted:
                continue
            t0 = time.perf_counter()
            try:
                getattr(self, name + "_" if name == "environment" else name)()
            except SystemExit:
                raise
            except Exception as err:  # one broken section must not cost the rest of a short GPU slot
                self.add(name, "section", f"error: {type(err).__name__}: {_first(err)}",
                         traceback=traceback.format_exc())
            if self.cuda:
                sync("cuda")
                torch.cuda.empty_cache()
            self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.write()
        bad = [r for r in self.rows if r.status in ("fail",) or r.status.startswith("error")]
        return 1 if bad else 0

    def write(self) -> None:
        out = self.a.out
        out.mkdir(parents=True, exist_ok=True)
        report = {"suite": "medseg gpu_suite", "device": self.device, "quick": self.quick,
                  "args": {k: str(v) for k, v in vars(self.a).items()}, "environment": self.environment,
                  "section_seconds": self.seconds, "rows": [asdict(r) for r in self.rows],
                  "passed": not any(r.status == "fail" or r.status.startswith("error") for r in self.rows)}
        (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=str))
        e = self.environment
        lines = [f"# medseg GPU suite: {self.device}{' (--quick)' if self.quick else ''}", "",
                 f"Machine: {', '.join(e.get('gpus', [])) or 'no GPU'}; driver {e.get('driver')}, CUDA "
                 f"{e.get('torch_cuda_build')}, cuDNN {e.get('cudnn')}, torch {e.get('torch')}, MONAI {e.get('monai')}"
                 f", {e.get('cpu')} ({e.get('cpu_cores')} cores), medseg {e.get('git_revision')}.", ""]
        for name in SECTIONS:
            rows = [r for r in self.rows if r.section == name and name != "environment"]
            if not rows:
                continue
            lines += [f"## {name} ({self.seconds.get(name, 0):.0f} s)", "", "| check | status | value | target |",
                      "|---|---|---|---|"]
            lines += [f"| {r.check} | {r.status.replace('|', '/')} | {r.value} | {r.target} |" for r in rows]
            lines.append("")
        (out / "gpu_suite.md").write_text("\n".join(lines))
        print(f"report: {out / 'gpu_suite.md'} and {out / 'gpu_suite.json'}")


# ----------------------------------------------------------------------------------------------------- small helpers
def oom_volume_shape(cap_extra: int, classes: int, channels: int, minimum: int = 256) -> tuple[int, int, int]:
    """A cube whose float32 accumulator (``classes``) and input (``channels``) take at least twice ``cap_extra``
    bytes, so that device accumulation cannot fit the cap while the windows alone (host accumulation) do."""
    voxels = 2 * cap_extra / (4 * (classes + channels))
    side = max(minimum, int(np.ceil(voxels ** (1 / 3) / 16)) * 16)
    return (side, side, side)


def tiled_volume(case: np.ndarray, shape) -> torch.Tensor:
    """``(C, *shape)``: a real case repeated (tiled) to fill ``shape``, so that the masks have structure."""
    reps = [int(np.ceil(s / t)) for s, t in zip(shape, case.shape[1:])]
    tiled = np.tile(case, [1, *reps])[(slice(None), *(slice(0, s) for s in shape))]
    return torch.from_numpy(np.ascontiguousarray(tiled))


def _ok(cond: bool) -> str:
    return "pass" if cond else "fail"


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _tail(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[:600]


def _training_minutes(metrics_csv: Path) -> float | None:
    import csv

    if not metrics_csv.is_file():
        return None
    rows = list(csv.DictReader(metrics_csv.open()))
    return round(float(rows[-1]["elapsed_s"]) / 60, 2) if rows else None


def _capture_log(name: str):
    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records: list[str] = []

        def emit(self, record):
            self.records.append(record.getMessage())

    handler = Keep()
    logging.getLogger(name).addHandler(handler)
    return handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes and few steps: the path, not the numbers")
    ap.add_argument("--out", type=Path, default=Path("gpu_suite_report"), help="where gpu_suite.{json,md} go")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "hippocampus", help="the MSD hippocampus folder")
    ap.add_argument("--plan-data", type=Path, default=SHARED_DATA / "brats2013_6cases",
                    help="data set planned for --gpu-memory (default: BraTS 6 cases when present, else --data)")
    ap.add_argument("--gpu-memory", type=float, default=8.0, help="GPU memory budget the planning check uses")
    ap.add_argument("--model", type=Path, default=None, help="a trained hippocampus run folder (skips crossval)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="crossval training minutes (default 5; --quick: 0.05)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    ap.add_argument("--nnunet-python", default=None, help="interpreter of a side venv with nnunetv2")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    a = ap.parse_args(argv)
    if a.time_budget is None:
        a.time_budget = 0.05 if a.quick else 5.0
    if not (a.data / "dataset.json").is_file() and (a.sections is None or set(a.sections) - {"environment"}):
        ap.error(f"--data {a.data}: no dataset.json there; give the MSD hippocampus folder (Task04)")
    if a.quick and a.device == "cpu":  # a smoke run on a shared CI machine: one thread per process
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    a.work = a.work or Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    a.work.mkdir(parents=True, exist_ok=True)
    return Suite(a).run()


if __name__ == "__main__":
    sys.exit(main())
