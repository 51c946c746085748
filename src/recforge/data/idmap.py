"""Dense id maps: the user's own ids (int or str) on the outside, contiguous int32 indices inside."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd

from recforge.errors import DataError, UnknownIdError, argument

log = logging.getLogger(__name__)

UnknownPolicy = Literal["raise", "warn", "ignore"]


def _as_id_array(values: object, what: str) -> np.ndarray:
    """Convert ids to a numpy array of int64 or str, rejecting NaN/None/empty ids with a clear message."""
    if isinstance(values, (pd.Series, pd.Index)):
        arr = values.to_numpy()
    else:
        arr = np.asarray(values)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind == "u" and len(arr) and arr.max() > np.iinfo(np.int64).max:
        # int64 would wrap them negative; as strings they still come back exactly as given
        log.warning("%s above 2**63-1 do not fit int64: every one of them is kept as a string", what)
        return arr.astype(str)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        if np.isnan(arr).any():
            raise DataError(f"{what} contain NaN; drop or fill those rows before building the dataset")
        if not np.all(arr == np.round(arr)):
            raise DataError(f"{what} are non-integer floats; ids must be integers or strings")
        if len(arr) and np.abs(arr).max() > 2.0**53:
            raise DataError(f"{what} are floats beyond 2**53, where floats skip integers; read the id column "
                            "as integers or strings")
        return arr.astype(np.int64)
    if arr.dtype.kind == "b":
        raise DataError(f"{what} are booleans; ids must be integers or strings")
    # Strings or mixed objects: normalise to str, rejecting missing values.
    ser = pd.Series(arr, dtype=object)
    if ser.isna().any():
        raise DataError(f"{what} contain missing values (None/NaN); drop or fill those rows first")
    text = ser.astype(str)
    if text.str.contains("\x00", regex=False).any():  # numpy's fixed-width strings drop trailing NULs: "a\0" == "a"
        raise DataError(f"{what} contain NUL characters; they would merge with other ids")
    out = text.to_numpy(dtype=str)
    if len(out) and (np.char.str_len(out) == 0).any():
        raise DataError(f"{what} contain empty strings; every id must be non-empty")
    return out


class IdMap:
    """A bijection between external ids and dense indices ``0..n-1``.

    Indices follow the sorted order of the ids, so ties broken "by smaller index" are broken by smaller id too,
    and two maps built from the same set of ids are equal whatever the row order of the data.
    """

    def __init__(self, ids: object) -> None:
        arr = _as_id_array(ids, "ids")
        index = pd.Index(arr)
        if not index.is_unique:
            raise DataError("IdMap ids must be unique")
        self._ids = arr
        self._index = index

    @classmethod
    def from_values(cls, values: object, what: str = "ids") -> tuple[IdMap, np.ndarray]:
        """Build a map from (possibly repeated) ids; return it and the int32 index of every value."""
        arr = _as_id_array(values, what)
        codes, uniques = pd.factorize(arr, sort=True)
        return cls(np.asarray(uniques)), codes.astype(np.int32)

    @property
    def ids(self) -> np.ndarray:
        """The external ids, position ``i`` holding the id of index ``i``."""
        return self._ids

    @property
    def is_string(self) -> bool:
        """True when ids are strings, False when they are integers."""
        return self._ids.dtype.kind in "US"

    def __len__(self) -> int:
        return len(self._ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and len(self) == len(other) and bool(np.all(self._ids == other._ids))

    def __repr__(self) -> str:
        kind = "str" if self.is_string else "int"
        return f"IdMap(n={len(self)}, {kind} ids)"

    def find(self, value: int | str) -> int:
        """The index of one id already of this map's kind (an ``int`` for integer ids, a ``str`` for string
        ids), or ``-1`` when it is unknown: a hash lookup, for one id per request."""
        if isinstance(value, str) != self.is_string:
            return -1
        try:
            loc = self._index.get_loc(value)
        except (KeyError, TypeError, OverflowError):
            return -1
        return loc if isinstance(loc, int) else -1

    def to_index(
        self, ids: object, on_unknown: UnknownPolicy | Literal["keep"] = "raise", what: str = "ids"
    ) -> np.ndarray:
        """Translate external ids to int32 indices.

        ``on_unknown``: ``"raise"`` raises :class:`UnknownIdError` naming a few unknown ids; ``"warn"`` logs a
        warning and drops them; ``"ignore"`` drops them silently; ``"keep"`` keeps them as ``-1`` (same length
        as the input, for callers that mask themselves).
        """
        arr = np.atleast_1d(np.asarray(ids))
        if arr.dtype.kind != self._ids.dtype.kind:
            if self.is_string:
                arr = arr.astype(str)
            elif arr.dtype.kind in "US" or arr.dtype == object:
                try:
                    arr = arr.astype(np.int64)
                except (TypeError, ValueError, OverflowError):  # some are not int64 ids: those are unknown
                    as_int = [_int64_or_none(v) for v in arr.tolist()]
                    unusable = np.array([v is None for v in as_int])
                    arr = np.array([-1 if v is None else v for v in as_int], dtype=np.int64)
                    idx = np.where(unusable, -1, self._index.get_indexer(arr))
                    if unusable.any() or (idx < 0).any():
                        return self._handle_unknown(idx, idx < 0, ids, on_unknown, what)
                    return idx.astype(np.int32)
        idx = self._index.get_indexer(arr)
        missing = idx < 0
        if missing.any():
            return self._handle_unknown(idx, missing, arr, on_unknown, what)
        return idx.astype(np.int32)

    @staticmethod
    def _handle_unknown(idx: np.ndarray, missing: np.ndarray, arr: object, on_unknown: str, what: str) -> np.ndarray:
        shown = ", ".join(map(repr, np.atleast_1d(np.asarray(arr, dtype=object))[missing][:5].tolist()))
        n = int(missing.sum())
        msg = f"{n} unknown {what} (e.g. {shown})"
        if on_unknown == "keep":
            return np.where(missing, -1, idx).astype(np.int32)
        if on_unknown == "raise":
            raise UnknownIdError(msg + f"; pass {argument('on_unknown', 'warn')} or {argument('on_unknown', 'ignore')} to skip them")
        if on_unknown == "warn":
            log.warning("%s were skipped", msg)
        elif on_unknown != "ignore":
            raise DataError(f"on_unknown must be 'raise', 'warn', 'ignore' or 'keep', not {on_unknown!r}")
        return np.asarray(idx)[~missing].astype(np.int32)

    def to_ids(self, indices: object) -> np.ndarray:
        """Translate indices back to the external ids."""
        return self._ids[np.asarray(indices, dtype=np.int64)]

    def extend(self, ids: object) -> tuple[IdMap, np.ndarray]:
        """A map with the unseen ``ids`` appended (existing indices unchanged) and the int32 index of every id.

        Appended ids break the sorted order, so for them "smaller index" no longer means "smaller id".
        """
        arr = _as_id_array(ids, "ids")
        if len(self) and self.is_string != (arr.dtype.kind in "US"):
            if self.is_string:
                arr = arr.astype(str)
            else:
                try:
                    arr = arr.astype(np.int64)
                except ValueError:
                    raise DataError("these ids are strings but the map holds integer ids") from None
        idx = self._index.get_indexer(arr)
        new = pd.unique(arr[idx < 0])
        if len(new) == 0:
            return self, idx.astype(np.int32)
        merged = IdMap(np.concatenate([self._ids, np.asarray(new)]))
        return merged, merged._index.get_indexer(arr).astype(np.int32)

    def take(self, indices: np.ndarray) -> IdMap:
        """A new map holding only the given indices (renumbered densely in the given order)."""
        return IdMap(self._ids[np.asarray(indices)])


def _int64_or_none(value: object) -> int | None:
    """``value`` as an int64 id, or ``None`` when it is not one (not an integer, or beyond int64)."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return number if -(2**63) <= number < 2**63 else None
