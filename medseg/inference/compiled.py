"""Compiled inference networks: ``torch.compile`` (inductor) with the weights frozen into the graph.

Sliding windows have one spatial shape, so a network compiled once for ``(batch, C, *patch)`` serves every full
window batch of every case; a smaller batch (a case's last, or a whole case with fewer windows than the batch)
runs the eager network (:class:`CompiledNetwork`). Both alternatives measured worse on MSD hippocampus crops (one
or two windows per case): a static graph per batch size recompiled for 3-4 s each, and padding to the full batch
cost up to 4x the compute. So compilation pays off on large volumes (many full batches), not on small crops.
Measured on a 2-core AVX512 CPU (docs/benchmarks.md): float32 window batches from no gain to 1.5x faster,
depending on network, batch and threads, after 7-25 s of compilation per network; under bf16 autocast on that
CPU the eager network was faster. ``--compile`` is therefore opt-in.
Compilation needs a C++ compiler on a CPU (Triton on CUDA); when it fails the uncompiled network is used and the
reason is logged.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

__all__ = ["CompiledNetwork", "compile_for_inference"]

log = logging.getLogger(__name__)


class CompiledNetwork(nn.Module):
    """Runs window batches of the compiled shape through the compiled network (with inductor's weight freezing
    on) and any other batch through the eager one; returns the first output of several (deep supervision).

    Args:
        compiled: the result of ``torch.compile(network, dynamic=False)``.
        network: the eager network.
        shape: the input shape ``compiled`` was compiled for.
    """

    def __init__(self, compiled: nn.Module, network: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.compiled = compiled
        self.network = network
        self.shape = tuple(int(s) for s in shape)
        self.failed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config  # freezing: weights become graph constants (inference)

        if tuple(x.shape) != self.shape or self.failed:
            y = self.network(x)
        else:
            try:
                with inductor_config.patch(freezing=True):
                    y = self.compiled(x)
            except torch.cuda.OutOfMemoryError:
                raise  # the engine's out-of-memory fallback handles it
            except Exception as exc:  # e.g. a recompilation that fails: go on uncompiled
                log.warning("the compiled network failed (%s); running uncompiled from now on", type(exc).__name__)
                self.failed = True
                y = self.network(x)
        return y[0] if isinstance(y, (list, tuple)) else y


def compile_for_inference(net: nn.Module, example_shape: tuple[int, ...], device: torch.device,
                          amp_dtype: torch.dtype | None = None) -> nn.Module:
    """Compile ``net`` for inference on inputs of ``example_shape`` now (not at the first case).

    Args:
        net: the network in eval mode, on ``device``.
        example_shape: ``(batch, C, *patch)`` of the window batches.
        device: where it runs.
        amp_dtype: the autocast dtype inference runs under (None: float32).

    Returns:
        A :class:`CompiledNetwork`, or ``net`` itself when compilation fails (logged).
    """
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    try:
        import torch._inductor.config as inductor_config

        # dynamic=False: one static graph (a dynamic batch dimension failed to compile in torch 2.13)
        compiled = torch.compile(net, dynamic=False)
        with inductor_config.patch(freezing=True), torch.inference_mode(), amp:
            compiled(torch.zeros(example_shape, device=device))
    except Exception as exc:  # a missing compiler, an unsupported op: inference goes on uncompiled
        msg = (str(exc).strip().splitlines() or [""])[0][:200]
        log.warning("torch.compile failed (%s: %s); predicting with the uncompiled network", type(exc).__name__, msg)
        return net
    log.info("compiled the network for %s windows in %.1f s", "x".join(map(str, example_shape)),
             time.perf_counter() - t0)
    return CompiledNetwork(compiled, net, example_shape)
