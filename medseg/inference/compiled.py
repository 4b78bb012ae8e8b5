"""Compiled inference networks: ``torch.compile`` (inductor) with the weights frozen into the graph.

Sliding windows always have one shape, so a network compiled once for ``(batch, C, *patch)`` serves every window
batch of every case; :class:`FixedBatch` pads the last, smaller batch of a case to that shape (no recompilation).
Measured on a 2-core AVX512 CPU (docs/benchmarks.md): float32 window batches 1.4-1.5x faster than eager, after
7-25 s of compilation per network (so it pays off over a folder, not for one small case); under bf16 autocast on
that CPU the eager network was faster, so ``--compile`` is for float32 (CPUs without bf16) and CUDA.
Compilation needs a C++ compiler on a CPU (Triton on CUDA); when it fails the uncompiled network is used and the
reason is logged.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

__all__ = ["FixedBatch", "compile_for_inference"]

log = logging.getLogger(__name__)


class FixedBatch(nn.Module):
    """Runs ``net`` on batches padded (with zeros) to ``batch`` rows and returns the real rows only.

    Args:
        net: the (compiled) network.
        batch: the batch size ``net`` was compiled for.
    """

    def __init__(self, net: nn.Module, batch: int):
        super().__init__()
        self.net = net
        self.batch = int(batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < self.batch:
            x = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
        y = self.net(x)
        if isinstance(y, (list, tuple)):
            y = y[0]
        return y[:n]


def compile_for_inference(net: nn.Module, example_shape: tuple[int, ...], device: torch.device,
                          amp_dtype: torch.dtype | None = None) -> nn.Module:
    """Compile ``net`` for inference on inputs of ``example_shape`` now (not at the first case).

    Args:
        net: the network in eval mode, on ``device``.
        example_shape: ``(batch, C, *patch)`` of the window batches.
        device: where it runs.
        amp_dtype: the autocast dtype inference runs under (None: float32).

    Returns:
        A :class:`FixedBatch` around the compiled network, or ``net`` itself when compilation fails (logged).
    """
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    try:
        import torch._inductor.config as inductor_config  # freezing: weights become graph constants (inference)

        compiled = torch.compile(net, dynamic=False)
        with inductor_config.patch(freezing=True), torch.inference_mode(), amp:
            compiled(torch.zeros(example_shape, device=device))
    except Exception as exc:  # a missing compiler, an unsupported op: inference goes on uncompiled
        msg = (str(exc).strip().splitlines() or [""])[0][:200]
        log.warning("torch.compile failed (%s: %s); predicting with the uncompiled network", type(exc).__name__, msg)
        return net
    log.info("compiled the network for %s windows in %.1f s", "x".join(map(str, example_shape)),
             time.perf_counter() - t0)
    return FixedBatch(compiled, example_shape[0])
