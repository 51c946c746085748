"""Hyper-parameters: one vocabulary, declarative constraints checked at ``fit``, and renamed parameters.

Every model declares one :class:`Constraint` per constructor parameter (``param_constraints``, like
scikit-learn's ``_parameter_constraints``); :func:`check_params` checks them all when the model is fitted and
raises :class:`~recforge.errors.ParameterError` naming the model, the parameter and what is allowed. The
constraints also list values they must reject, which is how the shared contract suite probes every parameter of
every model.

The vocabulary (:data:`VOCABULARY`) names the ideas several models share; :data:`SYNONYMS` are the names that
mean the same and must not be used. A parameter renamed to the vocabulary keeps working for one release through
:func:`translate_renamed`, with a ``FutureWarning`` naming the new name.
"""

from __future__ import annotations

import math
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recforge.errors import DataError, ParameterError

#: Shared parameter names and what they mean, the same in every model that has them.
VOCABULARY: dict[str, str] = {
    "epochs": "passes over the training data",
    "n_neighbors": "size of a neighbourhood (similar items kept per item)",
    "num_threads": "threads for numba, BLAS and torch (0 = all cores)",
    "seed": "the random seed (the same seed gives the same model)",
    "progress": "show progress bars on stderr",
    "half_life_days": "recency half-life measured in days",
    "half_life_events": "recency half-life measured in events of the user's history",
}
#: Names that mean a vocabulary entry and must not be used as parameter names.
SYNONYMS: dict[str, str] = {
    "iterations": "epochs",
    "n_iter": "epochs",
    "n_epochs": "epochs",
    "max_iter": "epochs",
    "k": "n_neighbors",
    "neighbors": "n_neighbors",
    "n_jobs": "num_threads",
    "threads": "num_threads",
    "random_state": "seed",
    "verbose": "progress",
    "half_life": "half_life_days or half_life_events",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _finite(value: Any) -> bool:
    """Whether a number is finite as a float (an integer beyond float's range is not: ``float()`` overflows)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


class Constraint(ABC):
    """What values one hyper-parameter accepts."""

    optional: bool = False

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is allowed (``None`` only for optional parameters)."""
        if value is None:
            return self.optional
        return self._accepts(value)

    @abstractmethod
    def _accepts(self, value: Any) -> bool: ...

    @abstractmethod
    def _describe(self) -> str: ...

    def describe(self) -> str:
        """The allowed values in words, as error messages show them."""
        return self._describe() + (" or None" if self.optional else "")

    def rejects(self) -> list[Any]:
        """Values this constraint must refuse (the contract suite tries each)."""
        return ([] if self.optional else [None]) + self._rejects()

    @abstractmethod
    def _rejects(self) -> list[Any]: ...


@dataclass
class Integer(Constraint):
    """An integer in ``[low, high]`` (either bound may be open-ended)."""

    low: int | None = None
    high: int | None = None
    optional: bool = False

    def _accepts(self, value: Any) -> bool:
        return _is_int(value) and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def _describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"an integer in [{self.low}, {self.high}]"
        if self.low is not None:
            return f"an integer >= {self.low}"
        return "an integer" if self.high is None else f"an integer <= {self.high}"

    def _rejects(self) -> list[Any]:
        out: list[Any] = [2.5, "3", True]
        if self.low is not None:
            out.append(self.low - 1)
        if self.high is not None:
            out.append(self.high + 1)
        return out


@dataclass
class Real(Constraint):
    """A finite real number between ``low`` and ``high``; ``strict`` excludes ``low`` itself."""

    low: float | None = None
    high: float | None = None
    strict: bool = False
    optional: bool = False

    def _accepts(self, value: Any) -> bool:
        if not _is_real(value) or not _finite(value):
            return False
        if self.low is not None and (value <= self.low if self.strict else value < self.low):
            return False
        return self.high is None or value <= self.high

    def _describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.strict else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")

    def _rejects(self) -> list[Any]:
        out: list[Any] = [float("nan"), float("inf"), 10**400, "1", True]
        if self.low is not None:
            out.append(self.low if self.strict else self.low - 1)
        if self.high is not None:
            out.append(self.high + 1)
        return out


@dataclass
class Choice(Constraint):
    """One of a fixed set of values."""

    values: tuple[Any, ...] = ()
    optional: bool = False

    def __init__(self, *values: Any, optional: bool = False) -> None:
        self.values = values
        self.optional = optional

    def _accepts(self, value: Any) -> bool:
        try:
            return any(value == v and type(value) is type(v) for v in self.values)
        except (TypeError, ValueError):
            return False

    def _describe(self) -> str:
        return f"one of {list(self.values)}"

    def _rejects(self) -> list[Any]:
        return ["__not_a_choice__", 12345]


@dataclass
class Boolean(Constraint):
    """True or False."""

    optional: bool = False

    def _accepts(self, value: Any) -> bool:
        return isinstance(value, (bool, np.bool_))

    def _describe(self) -> str:
        return "True or False"

    def _rejects(self) -> list[Any]:
        return ["yes", 2]


@dataclass
class Text(Constraint):
    """A non-empty string (a name such as an encoder or a column)."""

    optional: bool = False

    def _accepts(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def _describe(self) -> str:
        return "a non-empty string"

    def _rejects(self) -> list[Any]:
        return [3, ""]


#: The device names :func:`device_name` reads, in words (for the messages that refuse one).
DEVICE_NAMES = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def device_name(value: Any) -> str | None:
    """``value`` as the device name it spells — ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, in any case,
    spaces around it ignored — or None when it spells none: the one rule of a ``device`` parameter, the
    ``--device`` option and ``$RECFORGE_DEVICE``."""
    name = value.strip().lower() if isinstance(value, str) else None
    return name if name is not None and re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,4})?", name) else None


@dataclass
class DeviceName(Constraint):
    """Where torch work runs, by name (:func:`device_name`), as :func:`recforge.core.device.resolve_device` reads
    them (whether that device exists is checked when it is used: an artifact saved on a GPU machine loads on a CPU
    one)."""

    optional: bool = False

    def _accepts(self, value: Any) -> bool:
        return device_name(value) is not None

    def _describe(self) -> str:
        return DEVICE_NAMES

    def _rejects(self) -> list[Any]:
        return ["tpu", "cuda:x", 3, ""]


@dataclass
class ListOf(Constraint):
    """A list (or tuple) whose every element satisfies ``item``; ``min_len`` elements at least."""

    item: Constraint = field(default_factory=Text)
    min_len: int = 0
    optional: bool = False

    def _accepts(self, value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) >= self.min_len
                and all(self.item.accepts(v) and v is not None for v in value))

    def _describe(self) -> str:
        at_least = f" (at least {self.min_len})" if self.min_len else ""
        return f"a list of {self.item.describe().removeprefix('a ').removeprefix('an ')}s{at_least}"

    def _rejects(self) -> list[Any]:
        bad_item = next((v for v in self.item.rejects() if v is not None), None)
        out: list[Any] = ["not a list", [bad_item]]
        if self.min_len:
            out.append([])
        return out


@dataclass
class AnyOf(Constraint):
    """Any value one of several constraints accepts (e.g. ``"auto"`` or a list of names)."""

    options: tuple[Constraint, ...] = ()
    optional: bool = False

    def __init__(self, *options: Constraint, optional: bool = False) -> None:
        self.options = options
        self.optional = optional

    def _accepts(self, value: Any) -> bool:
        return any(option.accepts(value) for option in self.options)

    def _describe(self) -> str:
        return " or ".join(option.describe() for option in self.options)

    def _rejects(self) -> list[Any]:
        return [v for option in self.options for v in option._rejects() if not self._accepts(v)][:4]


@dataclass
class Custom(Constraint):
    """A rule of its own: ``check(value) -> bool``, described in words, with examples it must refuse."""

    check: Callable[[Any], bool] = bool
    description: str = ""
    invalid: tuple[Any, ...] = ()
    optional: bool = False

    def _accepts(self, value: Any) -> bool:
        try:
            return bool(self.check(value))
        except (TypeError, ValueError):
            return False

    def _describe(self) -> str:
        return self.description

    def _rejects(self) -> list[Any]:
        return list(self.invalid)


def check_params(model: Any, constraints: Mapping[str, Constraint], params: Mapping[str, Any]) -> None:
    """Check every value of ``params`` against its constraint; the first violation raises
    :class:`~recforge.errors.ParameterError` naming the model, the parameter, the allowed values and the value."""
    owner = type(model).__name__
    for name, value in params.items():
        constraint = constraints.get(name)
        if constraint is not None and not constraint.accepts(value):
            raise ParameterError(f"{owner}.{name} must be {constraint.describe()}, got {_shown(value)}")


def parameter_error(model: Any, name: str, rule: str, value: Any) -> ParameterError:
    """The error for a parameter that breaks a rule its constraint cannot express (e.g. one tied to another)."""
    return ParameterError(f"{type(model).__name__}.{name} {rule}, got {_shown(value)}")


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a value from a file or a request may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def translate_renamed(owner: str, renamed: Mapping[str, str], params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with renamed parameters under their new names, each with a ``FutureWarning``; giving both the
    old and the new name is an error."""
    if not renamed or not any(old in params for old in renamed):
        return params
    out = dict(params)
    for old, new in renamed.items():
        if old in out:
            if new in out:
                raise ParameterError(f"{owner}: give {new!r} only; {old!r} is its old name")
            warnings.warn(f"{owner}: parameter {old!r} is renamed {new!r}; the old name will stop working in the "
                          "next release", FutureWarning, stacklevel=4)
            out[new] = out.pop(old)
    return out


def store_params(model: Any, params: dict[str, Any]) -> None:
    """Store constructor arguments (``locals()`` of ``__init__``) under their own names, sklearn-style."""
    for key, value in params.items():
        if key not in ("self", "__class__"):
            setattr(model, key, value)


def check_k(k: Any) -> int:
    """Validate a list length ``k`` (a positive integer)."""
    if not _is_int(k) or k <= 0:
        raise DataError(f"k must be a positive integer, got {k!r}")
    return int(k)
