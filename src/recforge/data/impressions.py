"""Logged impressions: what a policy showed, with which probabilities, and what users did — the input of
off-policy evaluation (:mod:`recforge.ope`).

One row per impression (a slate shown once), stored as Parquet (written atomically):

======================== ==================== ===========================================================
column                   type                 meaning
======================== ==================== ===========================================================
``request_id``           string               unique per impression (joins later feedback)
``timestamp``            float                seconds (any origin)
``user_id``              int or string        the user's id, as in the interaction data
``policy``               string               the logging policy's name
``policy_version``       string               its version (a model artifact's hash, a date, ...)
``slate``                list of item ids     the items shown, top position first
``position_propensity``  list of floats       probability of each shown item at its position, in (0, 1]
``slate_propensity``     float                probability of the whole slate, in (0, 1]
``prefix_propensity``    list of floats       optional: of the first 1, 2, ... items (the cascade's weights)
``session_id``           string               optional: impressions of one session (a simulator episode)
                                              share it; policies do not repeat an item within a session
``reward``               list of floats       per position (1 for a click, 0 otherwise; any finite number)
======================== ==================== ===========================================================

Every slate of a log has the same size. :func:`check_impressions` refuses a log that breaks any of this with one
line naming the problem and the first offending row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recforge.data.idmap import IdMap
from recforge.data.io import read_table, table_format, write_table
from recforge.errors import DataError

#: Columns every log has (``prefix_propensity`` is optional).
IMPRESSION_COLUMNS = ("request_id", "timestamp", "user_id", "policy", "policy_version", "slate",
                      "position_propensity", "slate_propensity", "reward")
_LISTS = ("slate", "position_propensity", "reward")


@dataclass(frozen=True)
class ImpressionArrays:
    """A checked log as aligned arrays: ``users`` (n, indices), ``slates`` (n × k item indices), the logging
    probabilities ``position`` (n × k), ``slate`` (n), ``prefix`` (n × k or None) and ``rewards`` (n × k)."""

    users: np.ndarray
    slates: np.ndarray
    position: np.ndarray
    slate: np.ndarray
    prefix: np.ndarray | None
    rewards: np.ndarray


def _list_matrix(column: pd.Series, name: str, k: int | None) -> np.ndarray:
    """A column of equal-length lists as an (n × k) array, refusing other values and other lengths."""
    lengths = []
    for row, value in enumerate(column.tolist()):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise DataError(f"impression log: {name} of row {row} must be a list, got {type(value).__name__}")
        lengths.append(len(value))
    size = k if k is not None else (lengths[0] if lengths else 0)
    wrong = [row for row, n in enumerate(lengths) if n != size]
    if wrong:
        raise DataError(f"impression log: every slate must have {size} positions; {name} of row {wrong[0]} has "
                        f"{lengths[wrong[0]]} ({len(wrong)} such rows)")
    if size == 0:
        raise DataError("impression log: slates must hold at least one item")
    return np.array([np.asarray(v) for v in column.tolist()]) if len(column) else np.zeros((0, size))


def _probabilities(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":  # numbers only: text that reads as a number is still the wrong type
        raise DataError(f"impression log: {name} must be numbers, got {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = ~((arr > 0) & (arr <= 1))  # NaN (missing) fails too
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(len(arr), -1).any(axis=1))[0])
        raise DataError(f"impression log: {name} must lie in (0, 1]; row {row} has {arr[row].tolist()} "
                        f"({int(bad.reshape(len(arr), -1).any(axis=1).sum())} such rows)")
    return arr


def check_impressions(frame: pd.DataFrame) -> pd.DataFrame:
    """The log, checked against the schema of this module (missing columns, types, slate sizes, repeated items,
    propensities outside (0, 1], non-finite rewards, repeated request ids); returns it unchanged."""
    _parsed(frame)
    return frame


def _parsed(frame: pd.DataFrame) -> dict[str, np.ndarray | None]:
    """The checks of :func:`check_impressions`, returning the list columns as (n × k) matrices, parsed once."""
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"impression log: expected a table, got {type(frame).__name__}")
    missing = [c for c in IMPRESSION_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"impression log: missing column(s) {', '.join(missing)}")
    if len(frame) == 0:
        raise DataError("impression log: no impressions")
    out: dict[str, np.ndarray | None] = {"slate": _list_matrix(frame["slate"], "slate", None), "prefix_propensity": None}
    k = out["slate"].shape[1]  # type: ignore[union-attr]
    for name in ("position_propensity", "reward") + (("prefix_propensity",) if "prefix_propensity" in frame else ()):
        values = _list_matrix(frame[name], name, k)
        if name == "reward":
            try:
                values = values.astype(np.float64)
            except (TypeError, ValueError):
                raise DataError("impression log: reward must be numbers") from None
            ok = np.isfinite(values)
            if not ok.all():
                raise DataError(f"impression log: reward must be finite; row {int(np.flatnonzero(~ok.all(axis=1))[0])}")
            out[name] = values
        else:
            out[name] = _probabilities(values, name)
    out["slate_propensity"] = _probabilities(frame["slate_propensity"].to_numpy(), "slate_propensity")
    slates = out["slate"]
    ordered = np.sort(slates.astype(str) if slates.dtype == object else slates, axis=1)  # type: ignore[union-attr]
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    if repeated.any():
        raise DataError(f"impression log: a slate repeats an item (row {int(np.flatnonzero(repeated)[0])})")
    ts = pd.to_numeric(frame["timestamp"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(ts).all():
        raise DataError(f"impression log: timestamp must be a number; row {int(np.flatnonzero(~np.isfinite(ts))[0])}")
    dup = frame["request_id"].astype(str).duplicated()
    if dup.any():
        raise DataError(f"impression log: request_id must be unique; {frame['request_id'].iloc[int(np.flatnonzero(dup)[0])]!r} repeats")
    return out


def impression_arrays(frame: pd.DataFrame, user_map: IdMap, item_map: IdMap) -> ImpressionArrays:
    """A checked log as index arrays of the given id maps; unknown users or items are refused, naming them."""
    parsed = _parsed(frame)
    slates = parsed["slate"]
    assert slates is not None
    k = slates.shape[1]
    items = item_map.to_index(slates.ravel(), on_unknown="keep").astype(np.int64).reshape(-1, k)
    users = user_map.to_index(frame["user_id"].to_numpy(), on_unknown="keep").astype(np.int64)
    for what, idx, ids in (("items", items, slates), ("users", users, frame["user_id"].to_numpy())):
        unknown = idx < 0
        if unknown.any():
            row = int(np.flatnonzero(unknown.reshape(len(idx), -1).any(axis=1))[0])
            first = np.asarray(ids)[unknown][0]
            first = first.item() if isinstance(first, np.generic) else first
            raise DataError(f"impression log: {int(unknown.sum())} unknown {what} (e.g. {first!r} in row {row}); "
                            "the log and the data must use the same ids")
    return ImpressionArrays(users, items, parsed["position_propensity"], parsed["slate_propensity"],  # type: ignore[arg-type]
                            parsed["prefix_propensity"], parsed["reward"])  # type: ignore[arg-type]


def write_impressions(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Check the log and write it as Parquet, atomically (a reader never sees half a file)."""
    if table_format(path) != "parquet":
        raise DataError(f"impression logs are Parquet files; use a .parquet name, not {str(path)!r}")
    return write_table(check_impressions(frame), path)


def read_impressions(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and check a log written by :func:`write_impressions` (or any Parquet file of this schema)."""
    if table_format(path) != "parquet":
        raise DataError(f"impression logs are Parquet files; {str(path)!r} is not")
    return check_impressions(read_table(path))
