"""Model registry: a network is built from a name and plain keyword arguments, and rebuilt from ``{name, kwargs}``.

A checkpoint stores ``model_spec(model)`` (never a dotted import path), so a run folder alone rebuilds its
network with ``build_model(spec)``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from medseg.errors import ConfigError

__all__ = ["ModelEntry", "register_model", "create_model", "list_models", "model_entry", "model_spec", "build_model"]

_RESERVED = ("spatial_dims", "in_channels", "out_channels")


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, the spatial dimensions it supports, its options and a summary."""

    name: str
    builder: Callable[..., nn.Module]
    spatial_dims: tuple[int, ...]
    options: frozenset[str]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def _options_of(fn: Callable[..., Any]) -> frozenset[str]:
    params = inspect.signature(fn).parameters
    return frozenset(
        n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in _RESERVED
    )


def register_model(
    name: str,
    *,
    spatial_dims: Iterable[int] = (2, 3),
    options_from: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(*, spatial_dims, in_channels, out_channels, **options)``.

    Args:
        name: the registry name (lower case).
        spatial_dims: the spatial dimensions the model supports.
        options_from: a callable whose keyword parameters are the accepted options, for builders that
            forward ``**kwargs`` (defaults to the builder's own signature).

    Returns:
        The decorator; it returns the builder unchanged.

    Raises:
        ValueError: when the name is already registered (a programming error).
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        options = _options_of(fn) | (_options_of(options_from) if options_from is not None else frozenset())
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = ModelEntry(name, fn, tuple(spatial_dims), options, doc.split("\n", 1)[0])
        return fn

    return decorator


def _ensure_builtin() -> None:
    # The built-in models register on import of these modules (imported here, not at package import time).
    from medseg.networks import monai_nets, presets  # noqa: F401


def list_models(spatial_dims: int | None = None) -> list[str]:
    """Names of the registered models, sorted; only those supporting ``spatial_dims`` when given.

    Args:
        spatial_dims: 2 or 3 to filter, or ``None`` for all.

    Returns:
        The sorted model names.
    """
    _ensure_builtin()
    return sorted(n for n, e in _REGISTRY.items() if spatial_dims is None or spatial_dims in e.spatial_dims)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``.

    Args:
        name: a registered model name.

    Returns:
        The :class:`ModelEntry`.

    Raises:
        ConfigError: for an unknown name, listing the valid names and the closest match.
    """
    _ensure_builtin()
    if name not in _REGISTRY:
        names = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name).lower(), names, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError("network.name", name, "one of " + ", ".join(names) + hint)
    return _REGISTRY[name]


def create_model(name: str, *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """Build a registered network; the returned module carries its ``{name, kwargs}`` spec.

    Args:
        name: registered model name (see :func:`list_models`).
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes).
        **kwargs: the model's options (plain JSON-compatible values).

    Returns:
        The network; ``forward`` returns logits ``(B, K, *spatial)``, or with ``deep_supervision=True`` in
        training mode a list ``[full, 1/2, 1/4, ...]``.

    Raises:
        ConfigError: unknown name, unsupported ``spatial_dims``, unknown or invalid option.
    """
    entry = model_entry(name)
    if spatial_dims not in entry.spatial_dims:
        raise ConfigError("spatial_dims", spatial_dims, f"one of {list(entry.spatial_dims)} for model {name!r}")
    unknown = sorted(set(kwargs) - entry.options)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(entry.options), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"network.kwargs.{unknown[0]}", kwargs[unknown[0]],
            f"an option of {name!r}: " + ", ".join(sorted(entry.options)) + hint,
        )
    model = entry.builder(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
    model.medseg_spec = {
        "name": name,
        "kwargs": {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels, **kwargs},
    }
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The ``{"name", "kwargs"}`` that rebuilds ``model`` (kwargs include spatial_dims and channel counts).

    Args:
        model: a network made by :func:`create_model`.

    Returns:
        A JSON-compatible dict for checkpoints and ``model.json``.

    Raises:
        ValueError: when the model was not built by :func:`create_model` (a programming error).
    """
    spec = getattr(model, "medseg_spec", None)
    if spec is None:
        raise ValueError("model was not built by medseg.networks.create_model; it has no {name, kwargs} spec")
    return {"name": spec["name"], "kwargs": dict(spec["kwargs"])}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a network from a ``{"name", "kwargs"}`` spec (from a checkpoint or ``model.json``).

    Args:
        spec: ``{"name": str, "kwargs": {"spatial_dims", "in_channels", "out_channels", ...}}``.

    Returns:
        A freshly initialised network of the same architecture (load the state dict into it).

    Raises:
        ConfigError: when the spec lacks a name or the required kwargs.
    """
    if not isinstance(spec, dict) or "name" not in spec or not isinstance(spec.get("kwargs"), dict):
        raise ConfigError("network", spec, 'a dict {"name": ..., "kwargs": {...}}')
    kwargs = dict(spec["kwargs"])
    missing = [k for k in _RESERVED if k not in kwargs]
    if missing:
        raise ConfigError("network.kwargs", sorted(kwargs), "spatial_dims, in_channels and out_channels present")
    return create_model(spec["name"], **kwargs)
