"""Training throughput: medseg's trainer step vs a plain MONAI loop at the same network size, patch and batch.

    .venv/bin/python benchmarks/bench_training.py [--steps 10] [--patch 40 56 40] [--batch 4] \
        [--nnunet-python /tmp/nnunet-venv/bin/python --nnunet-root /tmp/nnunet_bench]

Rows (all on random batches of the hippocampus plan's patch and batch, so only the step is timed):
  monai_dynunet_fp32   plain MONAI loop: DynUNet 16-128 filters, DiceCELoss, AdamW, float32 (the reference bar)
  monai_dynunet_bf16   the same loop under torch.autocast(bfloat16)
  medseg_unet          medseg's Trainer epoch: the plan's U-Net (16-128, deep supervision), Dice+CE with
                       normalised deep-supervision weights, SGD Nesterov, gradient clipping, autocast as
                       `amp: auto` resolves on this machine
  nnunet_trainer       nnU-Net v2's own nnUNetTrainer.train_step (PlainConvUNet 16-128 on the plans variant
                       that benchmarks/nnunet_hippocampus.py writes: the same network, patch and batch; Dice+CE
                       with deep supervision, SGD, clipping; float32, as nnU-Net disables autocast on a CPU), fed
                       by its own background augmentation from the preprocessed hippocampus; only when
                       --nnunet-python has nnunetv2 and --nnunet-root was set up (run in its own process)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from bench_helpers import sync


def _batches(n, batch, patch, k, seed=0, device="cpu"):
    """``n`` random batches (two distinct ones, alternating), already on ``device`` so that only the step is timed."""
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, 1, *patch, generator=g).to(device),
             torch.randint(0, k, (batch, 1, *patch), generator=g).to(device)) for _ in range(2)]
    return [{"image": data[i % 2][0], "label": data[i % 2][1]} for i in range(n)]


def nnunet_step(nnunet_python: str, root: Path, steps: int, batch: int, device: str = "cpu") -> dict:
    """nnU-Net's own ``nnUNetTrainer.train_step`` in its interpreter (after ``nnunet_hippocampus.py setup``).

    Returns:
        The JSON row of ``nnunet_hippocampus.py train-bench`` (``s_per_step``, ``batch``, ``patch``, ...).

    Raises:
        RuntimeError: the nnU-Net process failed (its last stderr line).
    """
    res = subprocess.run([nnunet_python, str(Path(__file__).with_name("nnunet_hippocampus.py")), "train-bench",
                          "--root", str(root), "--steps", str(steps), "--batch", str(batch), "--device", device],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError((res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1])
    return json.loads(res.stdout.strip().splitlines()[-1])


def monai_loop(batches, amp: bool, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
               compile: bool = False) -> float:
    """Seconds per step of a plain MONAI loop (autocast ``dtype`` when ``amp``; a GradScaler for fp16)."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    net = DynUNet(3, 1, 3, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
                  filters=[16, 32, 64, 128], norm_name="instance", res_block=False).to(device)
    model = torch.compile(net) if compile else net
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    scaler = torch.amp.GradScaler("cuda") if amp and dtype == torch.float16 else None
    dev_type = torch.device(device).type
    net.train()

    def step(b):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev_type, dtype=dtype, enabled=amp):
            out = model(b["image"])
        loss = loss_fn(out.float(), b["label"])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    step(batches[0])  # warm-up (and compilation)
    sync(device)
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
    sync(device)
    return (time.perf_counter() - t0) / (len(batches) - 1)


def medseg_step(batches, patch, device: str = "cpu", amp: str = "auto", compile: bool = False) -> tuple[float, str]:
    """Seconds per step of medseg's Trainer epoch and the autocast dtype that ``amp`` resolved to."""
    import tempfile

    from medseg.losses import build_loss
    from medseg.networks import create_model, model_spec
    from medseg.training.config import TrainConfig
    from medseg.training.trainer import Trainer

    torch.manual_seed(0)
    net = create_model("unet", spatial_dims=3, in_channels=1, out_channels=3, features=[16, 32, 64, 128],
                       strides=[1, 2, 2, 2], kernel_sizes=3, deep_supervision=True, norm="instance")
    cfg = TrainConfig(device=torch.device(device).type, amp=amp, compile=compile).validate()
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(net, model_spec(net), build_loss("dice_ce", num_classes=3, deep_supervision=True), cfg, tmp,
                     train_batches=lambda epoch: batches[:1] if epoch == 0 else batches[1:], val_cases=[],
                     patch_size=patch, num_classes=3)
        tr._train_epoch(0)  # warm-up (and compilation)
        sync(device)
        t0 = time.perf_counter()
        tr._train_epoch(1)
        sync(device)
        return (time.perf_counter() - t0) / (len(batches) - 1), str(tr.amp_dtype).replace("torch.", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--nnunet-python", default="/tmp/nnunet-venv/bin/python")
    ap.add_argument("--nnunet-root", type=Path, default=Path("/tmp/nnunet_bench"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    patch = tuple(a.patch)
    batches = _batches(a.steps + 1, a.batch, patch, 3)
    rows = [("monai_dynunet_fp32", monai_loop(batches, amp=False), "fp32"),
            ("monai_dynunet_bf16", monai_loop(batches, amp=True), "bf16")]
    t, dtype = medseg_step(batches, patch)
    rows.append(("medseg_unet", t, dtype or "fp32"))
    plans = a.nnunet_root / "preprocessed" / "Dataset004_Hippocampus" / "nnUNetPlans_medseg.json"
    if Path(a.nnunet_python).exists() and plans.is_file():
        try:
            r = nnunet_step(a.nnunet_python, a.nnunet_root, a.steps, a.batch)
            if r["batch"] != a.batch or list(r["patch"]) != list(patch):
                print(f"[note] nnU-Net row at batch {r['batch']}, patch {r['patch']} (its plans variant)")
            rows.append(("nnunet_trainer", r["s_per_step"], "fp32"))
        except RuntimeError as err:
            print(f"[fail] nnunet_trainer: {err}")
    else:
        print(f"[skip] nnunet_trainer: needs {a.nnunet_python} and {plans} (benchmarks/nnunet_hippocampus.py setup)")
    ref = rows[0][1]
    print(f"training step, patch {'x'.join(map(str, patch))}, batch {a.batch}, {a.steps} timed steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'loop':<22}{'autocast':>9}{'s/step':>9}{'it/s':>8}{'vs MONAI fp32':>15}")
    for name, sec, dt in rows:
        print(f"{name:<22}{dt:>9}{sec:>9.3f}{1 / sec:>8.2f}{ref / sec:>14.2f}x")


if __name__ == "__main__":
    main()
