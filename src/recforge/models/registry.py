"""Models by name: ``register`` a class, then ``create_model("ease", ...)`` from code, configs or the CLI.

The built-in models are listed in :data:`BUILTIN_MODELS` (name, module, aliases), so their names resolve without
importing them: a model's module (and torch, for the neural ones) is imported the first time its class is
asked for. Other models register themselves with ``@register(name, *aliases)`` when their module is imported.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from recforge.errors import ParameterError, UnknownModelError

#: Every built-in model: its name, the module that defines (and registers) it, and the aliases it answers to.
BUILTIN_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "random": ("recforge.models.baselines", ("rand",)),
    "pop": ("recforge.models.baselines", ("popular", "mostpopular", "most-popular")),
    "globalmean": ("recforge.models.baselines", ("mean", "global-mean")),
    "bias": ("recforge.models.baselines", ("biases", "baseline")),
    "itemknn": ("recforge.models.neighbors", ("knn", "item-knn")),
    "rp3beta": ("recforge.models.graph", ("rp3", "rp3b")),
    "ease": ("recforge.models.linear", ()),
    "als": ("recforge.models.als", ("wals", "implicit-als")),
    "biasedals": ("recforge.models.als", ("als-explicit",)),
    "bpr": ("recforge.models.bpr", ("bpr-mf",)),
    "pointwise": ("recforge.models.pointwise", ("sampled-mf", "focal-mf")),
    "funksvd": ("recforge.models.sgd_mf", ("svd", "biasedmf-sgd")),
    "svdpp": ("recforge.models.sgd_mf", ("svd++",)),
    "content": ("recforge.models.content", ("content-based",)),
    "blend": ("recforge.models.blend", ()),
    "scoreblend": ("recforge.models.hybrid", ("hybrid",)),
    "slatemix": ("recforge.models.hybrid", ("mix",)),
    "twotower": ("recforge.models.two_tower", ("two-tower",)),
    "pooling": ("recforge.models.sequential.pooling", ("cbow",)),
    "gru4rec": ("recforge.models.sequential.gru4rec", ("gru",)),
    "sasrec": ("recforge.models.sequential.sasrec", ("sas",)),
    "bert4rec": ("recforge.models.sequential.bert4rec", ("bert",)),
}

_REGISTRY: dict[str, type] = {}
_ALIASES: dict[str, str] = {alias: name for name, (_, aliases) in BUILTIN_MODELS.items() for alias in aliases}
T = TypeVar("T", bound=type)


def register(name: str, *aliases: str) -> Callable[[T], T]:
    """Class decorator that registers a model under ``name`` (and optional aliases; a built-in model's are in
    :data:`BUILTIN_MODELS`)."""

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
    """Registered model names (the built-in ones whether imported yet or not), sorted."""
    return sorted(set(_REGISTRY) | set(BUILTIN_MODELS))


def get_model_class(name: str) -> type:
    """The class registered under ``name`` (or an alias), importing a built-in model's module on first use;
    :class:`UnknownModelError` lists the valid names."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY and key in BUILTIN_MODELS:
        importlib.import_module(BUILTIN_MODELS[key][0])  # registers the class
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
