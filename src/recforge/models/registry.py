"""Models by name: ``register`` a class, then ``create_model("ease", ...)`` from code, configs or the CLI.

Every built-in model registers itself when :mod:`recforge.models` is imported (it imports all of them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from recforge.errors import ParameterError, UnknownModelError

_REGISTRY: dict[str, type] = {}
_ALIASES: dict[str, str] = {}
T = TypeVar("T", bound=type)


def register(name: str, *aliases: str) -> Callable[[T], T]:
    """Class decorator that registers a model under ``name`` (and optional aliases)."""

    def deco(cls: T) -> T:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"model name {name!r} is registered twice")
        cls.name = key  # type: ignore[attr-defined]
        _REGISTRY[key] = cls
        for alias in aliases:
            _ALIASES[alias.lower()] = key
        return cls

    return deco


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type:
    """The class registered under ``name`` (or an alias); :class:`UnknownModelError` lists the valid names."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
    return _REGISTRY[key]


def create_model(name: str, **params: Any) -> Any:
    """Instantiate a registered model; unknown parameters raise :class:`ParameterError` naming the valid ones
    (renamed parameters are translated, with a FutureWarning)."""
    cls = get_model_class(name)
    return cls(**cls.check_param_names(params))


def parse_params(assignments: Iterable[str]) -> dict[str, Any]:
    """Parse ``["factors=64", "reg=0.1", "name=foo"]`` into typed values (JSON literals, else strings)."""
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ParameterError(f"parameter {item!r} must look like name=value")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ParameterError(f"parameter {item!r} has an empty name")
        lowered = raw.strip().lower()
        if lowered in ("none", "null"):
            value: Any = None
        elif lowered in ("true", "false"):
            value = lowered == "true"
        else:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        out[key] = value
    return out
