"""Memory estimate vs measured peak, and training-step speed of medseg's U-Net vs MONAI's DynUNet.

Part 1 prints, per configuration, ``estimate_memory`` (fake-tensor simulation, no compute) beside the peak
measured for the same two training steps (CPU: profiler allocation events; CUDA: max_memory_allocated),
their ratio and the time each took. Part 2 times one forward+backward of the nnU-Net-like ``unet`` and of
``monai.networks.nets.DynUNet`` built with the same stages, kernels and strides, in the same run.

    .venv/bin/python benchmarks/bench_network_memory.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from medseg.networks import count_parameters, create_model, estimate_memory, measure_peak_memory

NNUNET_3D = {
    "features": [32, 64, 128, 256, 320],
    "strides": [1, 2, 2, 2, 2],
    "kernel_sizes": 3,
    "deep_supervision": True,
    "norm": "instance",
}
NNUNET_2D = {"features": [32, 64, 128, 256, 512], "strides": [1, 2, 2, 2, 2], "deep_supervision": True}

CONFIGS = [
    # name, kwargs, spatial_dims, patch, batch, dtype, training, optimizer
    ("unet", NNUNET_3D, 3, (48, 48, 48), 2, torch.float32, True, "sgd"),
    ("unet", NNUNET_3D, 3, (48, 48, 48), 2, torch.bfloat16, True, "sgd"),
    ("unet", NNUNET_3D, 3, (64, 64, 64), 1, torch.float32, False, "sgd"),
    ("unet", NNUNET_2D, 2, (256, 256), 4, torch.float32, True, "adamw"),
    ("res_unet", {"features": [16, 32, 64, 128]}, 3, (32, 48, 48), 2, torch.float32, True, "sgd"),
    ("attention_unet", {"features": [16, 32, 64, 128]}, 2, (128, 128), 4, torch.float32, True, "sgd"),
    ("unetpp", {"features": [16, 16, 32, 64, 128, 16]}, 2, (128, 128), 4, torch.float32, True, "sgd"),
    ("classic_unet", {}, 2, (572, 572), 1, torch.float32, False, "sgd"),
]


def memory_table(device: str, quick: bool) -> None:
    print(f"\nMemory: estimate vs measured peak ({device}); MiB")
    print(f"{'model':15s} {'dims':>4s} {'patch':>14s} {'B':>2s} {'dtype':>9s} {'mode':>5s} {'opt':>5s} "
          f"{'params':>9s} {'estimate':>9s} {'measured':>9s} {'est/meas':>8s} {'t_est s':>7s} {'t_meas s':>8s}")
    for name, kwargs, dims, patch, batch, dtype, training, opt in CONFIGS[: 3 if quick else None]:
        t0 = time.perf_counter()
        est = estimate_memory(name, kwargs, dims, 1, 3, patch, batch, dtype=dtype, training=training, optimizer=opt)
        t1 = time.perf_counter()
        meas = measure_peak_memory(name, kwargs, dims, 1, 3, patch, batch, dtype=dtype, training=training,
                                   optimizer=opt, device=device)
        t2 = time.perf_counter()
        params = count_parameters(create_model(name, spatial_dims=dims, in_channels=1, out_channels=3, **kwargs))
        print(f"{name:15s} {dims:4d} {'x'.join(map(str, patch)):>14s} {batch:2d} {str(dtype)[6:]:>9s} "
              f"{'train' if training else 'infer':>5s} {opt:>5s} {params / 1e6:8.2f}M {est / 2**20:9.1f} "
              f"{meas / 2**20:9.1f} {est / meas:8.3f} {t1 - t0:7.2f} {t2 - t1:8.2f}", flush=True)


def _time_step(model: torch.nn.Module, x: torch.Tensor, amp: bool, repeats: int) -> float:
    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, list) else out[:, 0]
        out.float().mean().backward()

    step()  # warm-up (oneDNN primitive creation)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def speed_table(device: str, quick: bool) -> None:
    from monai.networks.nets import DynUNet

    print(f"\nSpeed: one forward+backward, medseg unet vs MONAI DynUNet, same topology ({device}); seconds")
    print(f"{'config':30s} {'medseg':>8s} {'DynUNet':>8s} {'ratio':>6s}")
    feats = [16, 32, 64, 128]
    cases = [(3, (2, 1, 48, 48, 48), False), (3, (2, 1, 48, 48, 48), True), (2, (8, 1, 128, 128), False)]
    for dims, shape, amp in cases[:1] if quick else cases:
        torch.manual_seed(0)
        ours = create_model("unet", spatial_dims=dims, in_channels=1, out_channels=3, features=feats,
                            deep_supervision=True).to(device)
        peer = DynUNet(spatial_dims=dims, in_channels=1, out_channels=3, kernel_size=[3] * 4,
                       strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2], filters=feats,
                       norm_name=("instance", {"affine": True}), act_name=("leakyrelu", {"negative_slope": 0.01}),
                       deep_supervision=True, deep_supr_num=2, res_block=False).to(device)
        x = torch.randn(shape, device=device)
        t_ours = _time_step(ours.train(), x, amp, 2 if quick else 3)
        t_peer = _time_step(peer.train(), x, amp, 2 if quick else 3)
        label = f"{dims}D {'x'.join(map(str, shape))}{' bf16' if amp else ''}"
        print(f"{label:30s} {t_ours:8.3f} {t_peer:8.3f} {t_peer / t_ours:6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    memory_table(args.device, args.quick)
    speed_table(args.device, args.quick)


if __name__ == "__main__":
    main()
