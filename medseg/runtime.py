"""The runtime layer that training and inference share: device, mixed precision, checkpoints, networks.

One definition each of:

* :func:`resolve_device` -- ``auto``/``cpu``/``cuda``/``cuda:N`` -> :class:`torch.device` (``auto`` and ``cuda``
  take this process's ``LOCAL_RANK`` GPU under torchrun);
* :func:`resolve_precision` -- one vocabulary, ``auto | bf16 | fp16 | fp32``, for the YAML, the CLI, training and
  inference (the old ``none`` is accepted as an alias of ``fp32`` with a deprecation warning);
  ``auto`` is bf16 on CUDA devices that support it (else fp16), bf16 on CPUs with native bf16 (AVX512-BF16 or
  AMX), float32 elsewhere;
* :func:`save_checkpoint` / :func:`load_checkpoint` -- plain dicts of tensors, written atomically, read with
  ``torch.load(weights_only=True)`` and one acceptance rule (a dict with ``network`` and ``state_dict``);
* :func:`build_network` -- a network rebuilt from its ``{"name", "kwargs"}`` record;
* :func:`valid_crop` -- voxels a valid-convolution network loses per side, from its declared ``output_shape``.

The 2D/3D choice lives with the configuration (:attr:`medseg.planning.Configuration.network_dims`: the number
of patch axes).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import ConfigError, InputError

if TYPE_CHECKING:  # torch is imported lazily: `import medseg` does not import it
    import torch
    from torch import nn

__all__ = ["PRECISIONS", "cpu_has_bf16", "normalize_precision", "resolve_device", "resolve_precision",
           "save_checkpoint", "load_checkpoint", "build_network", "valid_crop"]

log = logging.getLogger(__name__)

#: The mixed-precision vocabulary of every option that chooses it.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_ALIASES = {"none": "fp32"}


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def normalize_precision(name: object, key: str = "amp") -> str:
    """Check a precision name against :data:`PRECISIONS`; map the deprecated ``none`` to ``fp32``.

    Args:
        name: the value given (YAML, CLI or Python).
        key: the option's name, for messages.

    Returns:
        One of :data:`PRECISIONS`.

    Raises:
        ConfigError: not a known precision.
    """
    text = str(name).lower() if isinstance(name, str) else name
    if text in _ALIASES:
        new = _ALIASES[str(text)]
        msg = f"{key}={name!r} is deprecated; use {new!r}"
        warnings.warn(msg, FutureWarning, stacklevel=3)
        log.warning(msg)
        return new
    if text not in PRECISIONS:
        raise ConfigError(key, name, "one of " + ", ".join(PRECISIONS))
    return str(text)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device to run on.

    Args:
        name: ``None``/``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` (this process's
            ``LOCAL_RANK`` GPU), ``"cuda:N"`` or a :class:`torch.device`.

    Returns:
        The device.

    Raises:
        ConfigError: an unknown device name, or CUDA asked for where there is none.
    """
    import torch

    if isinstance(name, torch.device):
        dev = name
    else:
        text = "auto" if name is None else str(name)
        if text == "auto":
            text = "cuda" if torch.cuda.is_available() else "cpu"
        if text == "cuda":
            text = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        try:
            dev = torch.device(text)
        except (RuntimeError, TypeError):
            raise ConfigError("device", name, "'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError("device", name, "'cpu', 'cuda', 'cuda:N' or 'auto'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "'cpu' or 'auto' on a machine without CUDA")
    return dev


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name on ``device``; ``None`` means float32 (no autocast).

    Args:
        name: one of :data:`PRECISIONS` (or the deprecated ``none``).
        device: where the network runs.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or ``None``.

    Raises:
        ConfigError: an unknown name, or fp16 on the CPU.
    """
    import torch

    name = normalize_precision(name)
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError("amp", name, "'bf16', 'fp32' or 'auto' on the CPU (fp16 autocast is for CUDA)")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    """The :data:`PRECISIONS` name of a resolved autocast dtype (``None`` -> ``fp32``)."""
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# --------------------------------------------------------------------------------------------- checkpoints
_EXPECTED = "a checkpoint_*.pt written by `medseg train` or `medseg crossval`"


def save_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> None:
    """Write a checkpoint (a dict of tensors and plain types) atomically: a kill -9 leaves the previous file.

    Args:
        path: the ``.pt`` file.
        checkpoint: the dict; must hold ``network`` and ``state_dict``.
    """
    import torch

    from medseg.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(dict(checkpoint), tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a medseg checkpoint with ``torch.load(weights_only=True)``: no code in the file is ever run.

    Args:
        path: the ``.pt`` file.
        map_location: where tensors go.

    Returns:
        The checkpoint dict (at least ``network`` ``{name, kwargs}`` and ``state_dict``).

    Raises:
        InputError: missing, empty, unreadable, holding more than tensors and plain data (refused for safety), or
            not a medseg checkpoint.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist", _EXPECTED)
    if path.stat().st_size == 0:
        raise InputError(path, "is empty (0 bytes: an interrupted write or copy)", _EXPECTED)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run whatever the file carries
        raise InputError(path, "holds more than tensors and plain data (Python objects that loading would run) "
                         "and is refused for safety", _EXPECTED) from None
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for corrupt or foreign files
        first = (str(exc).splitlines() or [""])[0][:160]
        raise InputError(path, f"cannot be read as a checkpoint ({type(exc).__name__}: {first})",
                         _EXPECTED) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(ckpt.get("network"), dict):
        raise InputError(path, "is not a medseg checkpoint (no network/state_dict)", _EXPECTED)
    return ckpt


# --------------------------------------------------------------------------------------------- networks
def build_network(spec: Mapping[str, Any], *, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """Rebuild a network from its ``{"name", "kwargs"}`` record (:func:`medseg.networks.create_model`).

    The dimensions and channel counts come from the caller (the model record), not from ``kwargs``.

    Args:
        spec: ``{"name": ..., "kwargs": {...}}``.
        spatial_dims: 2 or 3 (the network's, i.e. 2 for a slice-wise configuration of 3D data).
        in_channels: input channels.
        out_channels: output channels.

    Returns:
        A freshly initialised network (load the state dict into it).

    Raises:
        ConfigError: a spec without a name, an unknown name or option.
    """
    from medseg.networks import create_model

    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError("network", spec, 'a mapping {"name": ..., "kwargs": {...}}')
    kwargs = {k: v for k, v in dict(spec.get("kwargs") or {}).items()
              if k not in ("spatial_dims", "in_channels", "out_channels")}
    return create_model(str(spec["name"]), spatial_dims=spatial_dims, in_channels=in_channels,
                        out_channels=out_channels, **kwargs)


def valid_crop(network: nn.Module, patch: Sequence[int]) -> tuple[int, ...]:
    """Voxels per side that a valid-convolution network loses on ``patch`` (0 for same-padded networks).

    Args:
        network: a network built by :func:`medseg.networks.create_model` (it declares ``output_shape``).
        patch: the spatial input patch.

    Returns:
        One int per axis.

    Raises:
        ConfigError: the network's output is not centred in its input (an odd loss).
    """
    from medseg.networks.contract import valid_crop as _crop

    return _crop(network, patch)
