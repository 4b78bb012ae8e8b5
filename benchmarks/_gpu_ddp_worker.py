"""Run under torchrun by benchmarks/gpu_suite.py: one process group (NCCL on CUDA, gloo on a CPU) at any world
size, an all-reduce, DDP gradients against the same step without DDP, and medseg's Trainer for one epoch (DDP-wrapped
when the world is larger than 1). Each rank saves what it saw as OUT/rankN.pt.

    python -m torch.distributed.run --standalone --nproc-per-node N benchmarks/_gpu_ddp_worker.py OUT cuda|cpu
"""

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _train_helpers import batches_fn, tiny_net, val_cases  # noqa: E402

from medseg.losses import build_loss  # noqa: E402
from medseg.training.config import TrainConfig  # noqa: E402
from medseg.training.trainer import Trainer  # noqa: E402

out, device = Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
torch.backends.cudnn.deterministic = True  # the DDP and local backward passes must be comparable bit for bit
torch.backends.cudnn.benchmark = False
local = int(os.environ.get("LOCAL_RANK", 0))
cuda = device == "cuda"
if cuda:
    torch.cuda.set_device(local)
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", local) if cuda else torch.device("cpu")

t = torch.tensor([rank + 1.0], device=dev)
dist.all_reduce(t)
allreduce_ok = float(t.item()) == world * (world + 1) / 2

# the same batch on every rank: DDP's averaged gradient must equal the local one
net, spec = tiny_net(seed=0)
net = net.to(dev)
ddp = DistributedDataParallel(copy.deepcopy(net), device_ids=[local] if cuda else None)
batch = next(iter(batches_fn(seed=0)(0)))
x, y = batch["image"].to(dev), batch["label"].to(dev)[:, 0]
F.cross_entropy(net(x), y).backward()
F.cross_entropy(ddp(x), y).backward()
grad_diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(net.parameters(), ddp.module.parameters()))

cfg = TrainConfig(epochs=1, batches_per_epoch=2, optimizer="adamw", lr=0.01, val_every=1, amp="none",
                  checkpoint_every=1, device=device).validate()
fresh, spec = tiny_net(seed=0)
trainer = Trainer(fresh, spec, build_loss("dice_ce", num_classes=3), cfg, out / "fold_0",
                  train_batches=batches_fn(seed=rank), val_cases=val_cases() if rank == 0 else [],
                  patch_size=(16, 16, 16), num_classes=3)
res = trainer.fit()
torch.save({"world": world, "rank": rank, "backend": dist.get_backend(), "allreduce_ok": allreduce_ok,
            "grad_diff": grad_diff, "trainer_ddp": isinstance(trainer.model, DistributedDataParallel),
            "epochs": res.epochs, "state_dict": {k: v.cpu() for k, v in trainer.network.state_dict().items()}},
           out / f"rank{rank}.pt")
dist.destroy_process_group()
