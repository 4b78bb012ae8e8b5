"""Run under torchrun by tests/test_ddp.py: a tiny Trainer with DDP on gloo; each rank saves its final weights."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import batches_fn, tiny_net, val_cases  # noqa: E402

from medseg.losses import build_loss  # noqa: E402
from medseg.training.config import TrainConfig  # noqa: E402
from medseg.training.distributed import init_process_group  # noqa: E402
from medseg.training.trainer import Trainer  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)
rank, world = init_process_group()
cfg = TrainConfig(epochs=2, batches_per_epoch=2, optimizer="adamw", lr=0.01, val_every=1, amp="fp32",
                  checkpoint_every=1).validate()
net, spec = tiny_net(seed=0)
trainer = Trainer(net, spec, build_loss("dice_ce", num_classes=3), cfg, out / "fold_0",
                  train_batches=batches_fn(seed=rank), val_cases=val_cases() if rank == 0 else [],
                  patch_size=(16, 16, 16), num_classes=3)
res = trainer.fit()
torch.save({"world": world, "rank": rank, "epochs": res.epochs, "state_dict": trainer.network.state_dict()},
           out / f"rank{rank}.pt")
torch.distributed.destroy_process_group()
