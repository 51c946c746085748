"""Validation of hyper-parameters, shared by every model: errors name the model, the parameter and the range."""

from __future__ import annotations

from typing import Any

import numpy as np

from recforge.errors import DataError


def check_int(model: Any, name: str, minimum: int = 1) -> None:
    """``model.<name>`` must be an integer >= ``minimum``."""
    value = getattr(model, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{type(model).__name__}.{name} must be an integer >= {minimum}, got {value!r}")


def check_number(model: Any, name: str, strict: bool = False, maximum: float | None = None) -> None:
    """``model.<name>`` must be a finite number >= 0 (> 0 with ``strict``), and <= ``maximum`` when given."""
    value = getattr(model, name)
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = numeric and bool(np.isfinite(value)) and (value > 0 if strict else value >= 0)
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        low = "> 0" if strict else ">= 0"
        high = f" and <= {maximum}" if maximum is not None else ""
        raise DataError(f"{type(model).__name__}.{name} must be a finite number {low}{high}, got {value!r}")


def check_choice(model: Any, name: str, choices: tuple[str, ...]) -> None:
    """``model.<name>`` must be one of ``choices``."""
    value = getattr(model, name)
    if value not in choices:
        raise DataError(f"{type(model).__name__}.{name} must be one of {list(choices)}, got {value!r}")


def check_params(
    model: Any, ints: dict[str, int], positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
) -> None:
    """Several checks at once: ``ints`` maps integer names to their minimum; then positive and non-negative numbers."""
    for name, minimum in ints.items():
        check_int(model, name, minimum)
    for name in positive:
        check_number(model, name, strict=True)
    for name in non_negative:
        check_number(model, name)


def set_params(model: Any, params: dict[str, Any]) -> None:
    """Store constructor arguments (``locals()`` of ``__init__``) under their own names, sklearn-style."""
    for key, value in params.items():
        if key not in ("self", "__class__"):
            setattr(model, key, value)
