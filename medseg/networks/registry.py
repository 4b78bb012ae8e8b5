"""Model registry: a network is built from a name and plain keyword arguments, and rebuilt from ``{name, kwargs}``.

A checkpoint stores ``model_spec(model)`` (never a dotted import path), so a run folder alone rebuilds its
network with ``build_model(spec)``. A renamed model keeps loading old checkpoints through
``register_model_deprecations({"old_name": "new_name"})`` (timm's ``register_model_deprecations``): the old
name builds the new model with a ``FutureWarning``, and the spec it gets carries the new name.

A model's options are declared by signatures: the builder's keyword parameters, plus those of
``options_from`` for a builder that forwards ``**kwargs`` to a class. :func:`register_model` checks that
declaration when the model is registered, not when a user first asks for it.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from medseg.errors import ConfigError
from medseg.networks.contract import conform

__all__ = [
    "ModelEntry",
    "register_model",
    "register_model_deprecations",
    "create_model",
    "list_models",
    "model_entry",
    "model_spec",
    "build_model",
]

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
#: old name -> current name of renamed models.
_DEPRECATIONS: dict[str, str] = {}


def _keywords(fn: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """The keyword-passable parameter names of ``fn`` and whether it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    names = frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _declared_options(name: str, fn: Callable[..., Any], options_from: Callable[..., Any] | None) -> frozenset[str]:
    """The options of a builder, checked: every declared option is one the builder accepts."""
    own, forwards = _keywords(fn)
    missing = [k for k in _RESERVED if k not in own]
    if missing:
        raise ValueError(f"builder of model {name!r} must take keyword arguments {', '.join(_RESERVED)}; "
                         f"missing {', '.join(missing)}")
    if options_from is None:
        if forwards:
            raise ValueError(f"builder of model {name!r} takes **kwargs but declares no options_from: "
                             "its options would be undeclared")
        return own - set(_RESERVED)
    declared, _ = _keywords(options_from)
    if not forwards:
        lost = sorted(declared - own - set(_RESERVED))
        if lost:
            raise ValueError(f"model {name!r} declares options {lost} (from {options_from.__qualname__}) that its "
                             "builder does not accept")
    return (own | declared) - set(_RESERVED)


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
        ValueError: programming errors, raised at registration: the name is taken (by a model or a
            deprecated alias) or not lower case; the builder does not take ``spatial_dims``,
            ``in_channels`` and ``out_channels`` as keywords; it takes ``**kwargs`` without ``options_from``;
            or ``options_from`` declares an option the builder cannot accept.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY or name in _DEPRECATIONS:
            raise ValueError(f"model {name!r} is already registered")
        if name != name.lower():
            raise ValueError(f"model name {name!r} must be lower case")
        options = _declared_options(name, fn, options_from)
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = ModelEntry(name, fn, tuple(spatial_dims), options, doc.split("\n", 1)[0])
        return fn

    return decorator


def register_model_deprecations(deprecations: dict[str, str]) -> None:
    """Declare renamed models: each old name keeps building (and loading checkpoints of) its new model.

    ``create_model``, ``model_entry`` and ``build_model`` accept an old name with a ``FutureWarning`` and
    build the new model, whose spec stores the new name; :func:`list_models` lists only current names.

    Args:
        deprecations: ``{"old_name": "new_name"}``; every new name must already be registered.

    Raises:
        ValueError: when an old name is a registered model or already deprecated, or a new name is not a
            registered (current) model (programming errors).
    """
    _ensure_builtin()  # so a deprecation of a built-in model can be declared right after import
    for old, new in deprecations.items():
        if old in _REGISTRY or old in _DEPRECATIONS:
            raise ValueError(f"cannot deprecate {old!r}: it is already a model name or a deprecated alias")
        if new not in _REGISTRY:
            raise ValueError(f"cannot deprecate {old!r} in favour of {new!r}: {new!r} is not a registered model")
    _DEPRECATIONS.update(deprecations)


def _current_name(name: str) -> str:
    new = _DEPRECATIONS.get(name)
    if new is None:
        return name
    warnings.warn(f"model name {name!r} is deprecated; building {new!r} (use that name)", FutureWarning,
                  stacklevel=3)
    return new


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

    Warns:
        FutureWarning: for a deprecated name (the entry of its new name is returned).
    """
    _ensure_builtin()
    name = _current_name(name)
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
        The network, a :class:`~medseg.networks.contract.SegmentationNetwork`; ``forward`` returns logits
        ``(B, K, *spatial)``, or with ``deep_supervision=True`` in training mode a list ``[full, 1/2, ...]``.

    Raises:
        ConfigError: unknown name, unsupported ``spatial_dims``, unknown or invalid option.

    Warns:
        FutureWarning: for a deprecated name (the new model is built and its spec carries the new name).
    """
    _ensure_builtin()
    entry = model_entry(_current_name(name))
    name = entry.name
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
    spec = {
        "name": name,
        "kwargs": {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels, **kwargs},
    }
    return conform(model, name=name, spatial_dims=spatial_dims, in_channels=in_channels,
                   out_channels=out_channels, spec=spec)


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

    Warns:
        FutureWarning: for a deprecated model name (the renamed model is built; its state dict loads).
    """
    if not isinstance(spec, dict) or "name" not in spec or not isinstance(spec.get("kwargs"), dict):
        raise ConfigError("network", spec, 'a dict {"name": ..., "kwargs": {...}}')
    kwargs = dict(spec["kwargs"])
    missing = [k for k in _RESERVED if k not in kwargs]
    if missing:
        raise ConfigError("network.kwargs", sorted(kwargs), "spatial_dims, in_channels and out_channels present")
    return create_model(spec["name"], **kwargs)
