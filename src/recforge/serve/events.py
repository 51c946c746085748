"""What the service accepts: strict id parsing and feedback-event checks, shared by requests and log replay.

An event is checked *before* it is written to the durable log, and every replayed record is checked again by the
same code (a log may come from an older version or be edited), so a record that could not be applied never stops
the service from starting.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from recforge.models.base import Recommender

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Timestamps are Unix seconds from 1970 up to the end of the year 9999.
TIMESTAMP_MAX = 253_402_300_799
_INTEGER = re.compile(r"-?[0-9]{1,19}(\.0{1,20})?")
#: A request id of an exploring answer: 32 lower-case hex digits (128 random bits).
REQUEST_ID = re.compile(r"[0-9a-f]{32}")


class EventError(ValueError):
    """A request value the service refuses; the message names it (answered with ``status``)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on what clients may send (``recforge serve`` options of the same names).

    Attributes:
        max_id_length: characters of a string id (ids are stored fixed-width: one long id widens them all).
        max_new_users: users unknown to the model that one feedback batch may introduce.
        max_new_items: items unknown to the model that one feedback batch may introduce.
    """

    max_id_length: int = 64
    max_new_users: int = 1000
    max_new_items: int = 100


def exact_integer(value: Any) -> Any:
    """``930.0`` as ``930`` (JSON Schema calls it an integer; beyond 2**53 a float is not exact); anything else
    unchanged."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


def parse_id(value: Any, is_string: bool, what: str, limits: Limits) -> int | str:
    """An id as the model stores it. Integer ids are JSON integers (``930.0`` too, up to 2**53) or plain ASCII
    decimal strings within int64 (no ``_``, spaces, signs other than a leading ``-``, or non-ASCII digits; a zero
    fraction, ``"930.0"``, as for a JSON number, up to 2**53); string ids are non-empty strings
    of at most ``limits.max_id_length`` characters (a JSON integer is taken as its decimal string)."""
    if not is_string:
        value = exact_integer(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise EventError(f"{what} id must be {'a string' if is_string else 'an integer'}, got {value!r}"[:200])
    if is_string:
        text = str(value)
        if not text or len(text) > limits.max_id_length:
            raise EventError(f"{what} id must have 1 to {limits.max_id_length} characters, got {len(text)}")
        if "\x00" in text:  # numpy's fixed-width strings drop trailing NULs: "a\0" would become "a"
            raise EventError(f"{what} id must not contain NUL characters")
        return text
    if isinstance(value, str):
        match = _INTEGER.fullmatch(value)
        if not match:
            raise EventError(f"{what} ids of this model are integers (plain ASCII digits); got {value[:40]!r}")
        value = int(value.partition(".")[0])
        if match.group(1) and abs(value) > 2**53:  # as for a JSON number: beyond 2**53 ".0" is not exact
            raise EventError(f"{what} id {value} must be written without a fraction beyond 2**53")
    if not INT64_MIN <= value <= INT64_MAX:
        raise EventError(f"{what} id {str(value)[:40]} is outside the int64 range of this model's integer ids")
    return value


def parse_ids(values: list[Any], is_string: bool, what: str, limits: Limits) -> np.ndarray:
    """Many ids, parsed as :func:`parse_id`, as an array of the model's id kind."""
    return np.asarray([parse_id(v, is_string, what, limits) for v in values], dtype=str if is_string else np.int64)


def check_event(event: dict[str, Any], model: Recommender, limits: Limits) -> dict[str, Any]:
    """A feedback event with parsed ids, or :class:`EventError` naming the first problem: ids (see
    :func:`parse_id`), ``timestamp`` an integer number of seconds in 0..9999-12-31, ``request_id`` 32 lower-case
    hex digits, ``rating`` a finite number
    (within the trained rating range of a rating model, widened by the range's width on each side)."""
    if not isinstance(event, dict):
        raise EventError(f"an event must be an object, got {type(event).__name__}")
    unknown = set(event) - {"user", "item", "rating", "timestamp", "request_id"}
    if unknown:
        raise EventError(f"unknown event field {min(unknown)!r}")
    for field in ("user", "item"):
        if field not in event:
            raise EventError(f"event lacks {field!r}")
    out = {"user": parse_id(event["user"], model.user_map_.is_string, "user", limits),
           "item": parse_id(event["item"], model.item_map_.is_string, "item", limits)}
    ts = event.get("timestamp")
    if ts is not None:
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= TIMESTAMP_MAX:
            raise EventError(f"timestamp must be whole Unix seconds between 0 and {TIMESTAMP_MAX} "
                             f"(9999-12-31), got {str(ts)[:40]}")
        out["timestamp"] = ts
    request = event.get("request_id")
    if request is not None:
        if not isinstance(request, str) or not REQUEST_ID.fullmatch(request):
            raise EventError("request_id must be 32 lower-case hex digits (a GET /recommend answer's)")
        out["request_id"] = request
    rating = event.get("rating")
    if rating is not None:
        if isinstance(rating, bool) or not isinstance(rating, int | float) or not math.isfinite(rating):
            raise EventError(f"rating must be a finite number, got {str(rating)[:40]}")
        low, high = rating_bounds(model)
        if not low <= rating <= high:
            raise EventError(f"rating {rating} is outside {low:g}..{high:g}, this model's rating range "
                             f"widened by its width on each side")
        out["rating"] = float(rating)
    return out


def rating_bounds(model: Recommender) -> tuple[float, float]:
    """The ratings feedback may carry: the trained range widened by its width each way (a rescaled log still
    fits), or ±1e6 for models that know no range."""
    low, high = getattr(model, "rating_min_", None), getattr(model, "rating_max_", None)
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return -1e6, 1e6
    width = max(high - low, 1.0)
    return low - width, high + width


def check_batch(events: list[dict[str, Any]], model: Recommender, limits: Limits) -> list[dict[str, Any]]:
    """Every event checked (:func:`check_event`, the first problem names the event's position), and the batch
    within ``limits.max_new_users`` / ``max_new_items`` ids the model does not know."""
    out = []
    for n, event in enumerate(events):
        try:
            out.append(check_event(event, model, limits))
        except EventError as exc:
            raise EventError(f"events[{n}]: {exc}", exc.status) from None
    for field, idmap, cap, option in (("user", model.user_map_, limits.max_new_users, "--max-new-users"),
                                      ("item", model.item_map_, limits.max_new_items, "--max-new-items")):
        values = np.asarray([e[field] for e in out], dtype=str if idmap.is_string else np.int64)
        new = np.unique(values[idmap.to_index(values, on_unknown="keep") < 0]) if len(values) else values
        if len(new) > cap:
            raise EventError(f"this batch introduces {len(new)} {field}s the model does not know; at most {cap} "
                             f"per batch ({option})")
    return out


def event_problem(event: dict[str, Any], model: Recommender, limits: Limits) -> str | None:
    """Why a logged event cannot be applied to ``model`` (see :func:`check_event`), or None: the feedback log's
    validator on replay."""
    try:
        check_event(event, model, limits)
    except EventError as exc:
        return str(exc)
    return None
