"""Run under torchrun by tests/test_ddp.py: a tiny Trainer with DDP on gloo; each rank saves its final weights.

``argv[2] == "budget"``: one long epoch under a few-second time budget, rank 1 slower than rank 0, so the ranks must
stop mid-epoch at the same step (rank 0's clock) to finish at all.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import batches_fn, tiny_net, val_cases  # noqa: E402

from medseg.losses import build_loss  # noqa: E402
from medseg.training.config import TrainConfig  # noqa: E402
from medseg.training.distributed import init_process_group  # noqa: E402
from medseg.training.trainer import Trainer  # noqa: E402

out = Path(sys.argv[1])
budget = len(sys.argv) > 2 and sys.argv[2] == "budget"
torch.set_num_threads(1)
rank, world = init_process_group()
if budget:
    cfg = TrainConfig(epochs=5, batches_per_epoch=100_000, optimizer="adamw", lr=0.01, amp="fp32",
                      max_minutes=0.1).validate()
    inner = batches_fn(seed=rank, per_epoch=100_000)

    def batches(epoch: int):
        for b in inner(epoch):
            if rank == 1:
                time.sleep(0.01)  # the ranks' clocks and speeds differ; rank 0's clock decides
            yield b
else:
    cfg = TrainConfig(epochs=2, batches_per_epoch=2, optimizer="adamw", lr=0.01, val_every=1, amp="fp32",
                      checkpoint_every=1).validate()
    batches = batches_fn(seed=rank)
net, spec = tiny_net(seed=0)
trainer = Trainer(net, spec, build_loss("dice_ce", num_classes=3), cfg, out / "fold_0",
                  train_batches=batches, val_cases=val_cases() if rank == 0 else [],
                  patch_size=(16, 16, 16), num_classes=3)
t0 = time.perf_counter()
res = trainer.fit()
torch.save({"world": world, "rank": rank, "epochs": res.epochs, "state_dict": trainer.network.state_dict(),
            "wall_s": time.perf_counter() - t0}, out / f"rank{rank}.pt")
torch.distributed.destroy_process_group()
