"""The :class:`Interactions` table: who interacted with what, when, and how much.

Everything inside recforge works on dense int32 indices; the :class:`~recforge.data.idmap.IdMap` of users and
items translates them back to the user's own ids at the edges (``to_frame``, ``recommend``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recforge.data.idmap import IdMap, _as_id_array
from recforge.data.io import read_table
from recforge.data.sidedata import align_side_data
from recforge.errors import DataError, DuplicateInteractionError, EmptyDatasetError, UnknownIdError, argument

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from os import PathLike

DuplicatePolicy = Literal["keep", "first", "last", "sum", "mean", "raise"]
CsrValues = Literal["auto", "ones", "rating", "weight"]
_DEFAULT_COLUMNS = {"rating_col": "rating", "timestamp_col": "timestamp"}


@dataclass(frozen=True)
class Sequences:
    """Time-ordered item sequences of every user, stored flat: user ``u`` owns ``items[offsets[u]:offsets[u+1]]``.

    ``positions`` maps each flat entry back to its row in the :class:`Interactions` it came from.
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None
    positions: np.ndarray

    @property
    def n_users(self) -> int:
        """Number of users (including users with an empty sequence)."""
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Length of every user's sequence."""
        return np.diff(self.offsets)

    def __getitem__(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]


def gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the ranges ``[starts[r], starts[r] + lengths[r])`` without a Python loop.

    Returns the offsets of the result (range ``r`` lands at ``flat[offsets[r]:offsets[r+1]]``) and the flat
    positions to take, e.g. ``sequences.items[flat]``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], lengths) + np.arange(offsets[-1])
    return offsets, flat


def _to_frame(df: Any) -> pd.DataFrame:
    """Accept pandas or polars (or anything with ``to_pandas``) and return a pandas DataFrame."""
    if isinstance(df, pd.DataFrame):
        return df
    if hasattr(df, "to_pandas"):
        return df.to_pandas()
    raise DataError(f"expected a pandas or polars DataFrame, got {type(df).__name__}")


def _timestamps_to_int(col: pd.Series, name: str) -> np.ndarray:
    """Timestamps as int64: numbers are kept (truncated to whole units), dates become Unix seconds (UTC)."""
    if col.isna().any():
        raise DataError(f"timestamp column {name!r} contains missing values")
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        values = col.to_numpy()
        if values.dtype.kind == "f":
            bad = ~np.isfinite(values) | (np.abs(values) >= 2.0**62)  # int64 would wrap around silently
            if bad.any():
                raise DataError(f"timestamp column {name!r} holds {values[bad][0]!r}, which is not a finite "
                                f"time within ±2**62 ({int(bad.sum())} such rows)")
        return values.astype(np.int64)
    if not pd.api.types.is_datetime64_any_dtype(col):
        try:
            col = pd.to_datetime(col, utc=True)
        except (ValueError, TypeError) as exc:
            raise DataError(f"timestamp column {name!r} is neither numeric nor a date/time: {exc}") from None
    if col.dt.tz is not None:
        col = col.dt.tz_convert("UTC").dt.tz_localize(None)
    return col.astype("datetime64[s]").astype("int64").to_numpy()


def _float_column(col: pd.Series, name: str, what: str) -> np.ndarray:
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        try:
            col = pd.to_numeric(col)
        except (ValueError, TypeError):
            raise DataError(f"{what} column {name!r} is not numeric") from None
    arr = col.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(arr).any():
        raise DataError(f"{what} column {name!r} contains missing values; drop or fill them first")
    bad = ~np.isfinite(arr) | (np.abs(arr) > np.finfo(np.float32).max)  # stored as float32: 1e308 would be inf
    if bad.any():
        raise DataError(f"{what} column {name!r} holds {arr[bad][0]!r}, which is not a finite float32 value "
                        f"({int(bad.sum())} such rows)")
    return arr.astype(np.float32)


class Interactions:
    """Interactions between users and items with dense indices, id maps and optional columns.

    Build one with :meth:`from_frame` or :meth:`from_file`. Objects are immutable by convention: filters and
    splits return new objects that share the id maps, so indices stay comparable between train and test.

    Attributes:
        users, items: int32 indices into ``user_map`` / ``item_map``.
        ratings, timestamps, weights: optional float32 / int64 / float32 columns, one value per row.
        item_data, user_data: optional side-data frames whose row ``i`` describes index ``i``.
    """

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        user_map: IdMap,
        item_map: IdMap,
        ratings: np.ndarray | None = None,
        timestamps: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        item_data: pd.DataFrame | None = None,
        user_data: pd.DataFrame | None = None,
    ) -> None:
        self.users = np.ascontiguousarray(users, dtype=np.int32)
        self.items = np.ascontiguousarray(items, dtype=np.int32)
        n = len(self.users)
        if len(self.items) != n:
            raise DataError("users and items must have the same length")
        for name, col in (("ratings", ratings), ("timestamps", timestamps), ("weights", weights)):
            if col is not None and len(col) != n:
                raise DataError(f"{name} must have one value per interaction ({n}), got {len(col)}")
        if n and (self.users.min() < 0 or self.users.max() >= len(user_map)):
            raise DataError("user indices fall outside the user id map")
        if n and (self.items.min() < 0 or self.items.max() >= len(item_map)):
            raise DataError("item indices fall outside the item id map")
        self.user_map = user_map
        self.item_map = item_map
        self.ratings = None if ratings is None else np.asarray(ratings, dtype=np.float32)
        self.timestamps = None if timestamps is None else np.asarray(timestamps, dtype=np.int64)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        self.item_data = item_data
        self.user_data = user_data
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_frame(
        cls,
        df: Any,
        user_col: str = "user_id",
        item_col: str = "item_id",
        rating_col: str | None = "rating",
        timestamp_col: str | None = "timestamp",
        weight_col: str | None = None,
        *,
        duplicates: DuplicatePolicy = "keep",
        user_map: IdMap | None = None,
        item_map: IdMap | None = None,
        on_unknown: Literal["raise", "warn", "ignore"] = "raise",
        item_data: pd.DataFrame | None = None,
        user_data: pd.DataFrame | None = None,
        item_data_id_col: str | None = None,
        user_data_id_col: str | None = None,
        side_data_items: bool = False,
    ) -> Interactions:
        """Build interactions from a pandas or polars DataFrame.

        ``rating_col`` and ``timestamp_col`` default to ``"rating"`` and ``"timestamp"`` and are used only if
        present; any other name given must exist. Pass ``None`` to ignore a column. ``user_map``/``item_map``
        reuse existing id maps (ids outside them follow ``on_unknown``); otherwise maps are built from the data,
        sorted by id. ``duplicates`` says what to do with repeated (user, item) pairs: keep every row (default;
        repeated consumption counts in implicit matrices), keep the ``first``/``last`` by time, ``sum`` their
        weights (the number of rows becomes the weight when there is no weight column; ratings are averaged),
        ``mean`` ratings and weights, or ``raise``.

        ``item_data`` rows are aligned with the item map; rows for items without interactions are dropped unless
        ``side_data_items=True``, which puts them in the item map as well: cold items that content and hybrid
        models can recommend from their side data alone.
        """
        frame = _to_frame(df)
        if side_data_items:
            if item_data is None or item_map is not None:
                raise DataError("side_data_items=True builds the item map from the data and item_data: pass "
                                "item_data and no item_map")
            side = _to_frame(item_data)
            key = item_data_id_col or item_col
            side_ids = side[key] if key in side.columns else side.index.to_series()
            if item_col in frame.columns:
                item_map, _ = IdMap.from_values(
                    pd.concat([pd.Series(frame[item_col].to_numpy()), pd.Series(side_ids.to_numpy())]),
                    what="item ids of the data and item_data",
                )
        for arg, name in (("user_col", user_col), ("item_col", item_col)):
            if name not in frame.columns:
                raise DataError(
                    f"missing {arg.split('_')[0]} column {name!r}; the data has columns {list(frame.columns)}; "
                    f"pass {argument(arg)} to name the right one"
                )
        cols: dict[str, str | None] = {}
        for arg, name in (("rating_col", rating_col), ("timestamp_col", timestamp_col), ("weight_col", weight_col)):
            if name is not None and name not in frame.columns:
                if _DEFAULT_COLUMNS.get(arg) == name:
                    name = None
                else:
                    raise DataError(
                        f"missing {arg.split('_')[0]} column {name!r}; the data has columns {list(frame.columns)}"
                    )
            cols[arg] = name
        if len(frame) == 0:
            raise EmptyDatasetError("the input has no rows; an Interactions object needs at least one interaction")

        def ids(col: str, idmap: IdMap | None, what: str) -> tuple[IdMap, np.ndarray]:
            if idmap is None:
                return IdMap.from_values(frame[col], what=f"{what} ids in column {col!r}")
            return idmap, idmap.to_index(_as_id_array(frame[col], f"{what} ids"), on_unknown="keep")

        umap, users = ids(user_col, user_map, "user")
        imap, items = ids(item_col, item_map, "item")
        keep = (users >= 0) & (items >= 0)
        if not keep.all():
            n_bad = int((~keep).sum())
            if on_unknown == "raise":
                raise UnknownIdError(
                    f"{n_bad} rows have user or item ids outside the given id maps; pass "
                    f"{argument('on_unknown', 'warn')} or {argument('on_unknown', 'ignore')}"
                )
            if on_unknown == "warn":
                log.warning("dropped %d rows with ids outside the given id maps", n_bad)
        ratings = None if cols["rating_col"] is None else _float_column(frame[cols["rating_col"]], cols["rating_col"], "rating")
        timestamps = (
            None if cols["timestamp_col"] is None else _timestamps_to_int(frame[cols["timestamp_col"]], cols["timestamp_col"])
        )
        weights = None if cols["weight_col"] is None else _float_column(frame[cols["weight_col"]], cols["weight_col"], "weight")
        if not keep.all():
            users, items = users[keep], items[keep]
            ratings = None if ratings is None else ratings[keep]
            timestamps = None if timestamps is None else timestamps[keep]
            weights = None if weights is None else weights[keep]
            if len(users) == 0:
                raise EmptyDatasetError("no rows are left after dropping ids outside the given id maps")
        out = cls(
            users,
            items,
            umap,
            imap,
            ratings,
            timestamps,
            weights,
            item_data=None if item_data is None else align_side_data(item_data, imap, item_data_id_col or item_col),
            user_data=None if user_data is None else align_side_data(user_data, umap, user_data_id_col or user_col),
        )
        return out.deduplicate(duplicates) if duplicates != "keep" else out

    @classmethod
    def from_file(cls, path: str | PathLike[str], *, sep: str | None = None, **kwargs: Any) -> Interactions:
        """Read CSV, TSV, Parquet or JSON-lines (by extension) and build interactions; kwargs go to :meth:`from_frame`."""
        return cls.from_frame(read_table(path, sep=sep), **kwargs)

    # ------------------------------------------------------------------ basic facts
    def __len__(self) -> int:
        return len(self.users)

    @property
    def n_users(self) -> int:
        """Number of users in the id map (some may have no interaction in a split)."""
        return len(self.user_map)

    @property
    def n_items(self) -> int:
        """Number of items in the id map."""
        return len(self.item_map)

    def __repr__(self) -> str:
        extras = [n for n in ("ratings", "timestamps", "weights") if getattr(self, n) is not None]
        return (
            f"Interactions({len(self):,} rows, {self.n_users:,} users, {self.n_items:,} items"
            + (f", with {', '.join(extras)}" if extras else "")
            + ")"
        )

    def describe(self) -> dict[str, Any]:
        """Summary statistics: counts, density, rating and time ranges."""
        n_u = int(np.unique(self.users).size)
        n_i = int(np.unique(self.items).size)
        info: dict[str, Any] = {
            "interactions": len(self),
            "users": n_u,
            "items": n_i,
            "density": len(self) / max(1, n_u * n_i),
        }
        if self.ratings is not None and len(self):
            info["rating_min"] = float(self.ratings.min())
            info["rating_max"] = float(self.ratings.max())
            info["rating_mean"] = float(self.ratings.mean())
        if self.timestamps is not None and len(self):
            info["time_min"] = int(self.timestamps.min())
            info["time_max"] = int(self.timestamps.max())
        counts = np.bincount(self.users, minlength=self.n_users)
        counts = counts[counts > 0]
        if counts.size:
            info["events_per_user_median"] = float(np.median(counts))
        if len(self):
            pairs = self.users.astype(np.int64) * max(1, self.n_items) + self.items
            info["repeat_share"] = 1.0 - np.unique(pairs).size / len(self)
        if self.timestamps is not None and len(self):
            first = np.full(self.n_users, np.iinfo(np.int64).max)
            last = np.full(self.n_users, np.iinfo(np.int64).min)
            np.minimum.at(first, self.users, self.timestamps)
            np.maximum.at(last, self.users, self.timestamps)
            seen = np.bincount(self.users, minlength=self.n_users) > 0
            info["user_span_days_median"] = float(np.median(last[seen] - first[seen])) / 86_400
        return info

    def regime(self) -> str:
        """One line on what kind of data this is: size and density, repeated user-item pairs, the rating scale, the
        weights (play counts and the like), and whether histories look like sessions (a median user's events within
        a day) or like long-lived users."""
        d = self.describe()
        pairs = d["interactions"] * (1.0 - d.get("repeat_share", 0.0))  # density counts each user-item pair once
        density = pairs / max(1, d["users"] * d["items"])
        size = f"{d['users']:,} users × {d['items']:,} items, {d['interactions']:,} events (density {density:.3%})"
        parts = [size, f"{d.get('repeat_share', 0.0):.1%} repeated user-item pairs"]
        if "rating_min" in d:
            parts.append(f"ratings {d['rating_min']:g}–{d['rating_max']:g}")
        else:
            parts.append("no ratings (implicit)")
        if self.weights is not None and len(self):
            parts.append(f"weights (counts) median {float(np.median(self.weights)):,.4g}, "
                         f"max {float(self.weights.max()):,.4g}")
        median = d.get("events_per_user_median", 0.0)
        if "user_span_days_median" not in d:
            parts.append(f"no timestamps; median {median:g} events per user")
        else:
            span = d["user_span_days_median"]
            kind = "session-like" if span <= 1 else "user-like"
            parts.append(f"{kind} histories (median {median:g} events {'within' if span <= 1 else 'over'} "
                         f"{span:,.1f} days)")
        return ", ".join(parts)

    # ------------------------------------------------------------------ derived tables
    def subset(self, rows: np.ndarray) -> Interactions:
        """Rows selected by a boolean mask or index array; id maps and side data are shared."""
        rows = np.asarray(rows)
        pick = (lambda a: None if a is None else a[rows])
        return Interactions(
            self.users[rows],
            self.items[rows],
            self.user_map,
            self.item_map,
            pick(self.ratings),
            pick(self.timestamps),
            pick(self.weights),
            item_data=self.item_data,
            user_data=self.user_data,
        )

    def concat(self, other: Interactions) -> Interactions:
        """Rows of both (which must share id maps), self's first."""
        if other.user_map is not self.user_map and other.user_map != self.user_map:
            raise DataError("cannot concatenate interactions with different user id maps")
        if other.item_map is not self.item_map and other.item_map != self.item_map:
            raise DataError("cannot concatenate interactions with different item id maps")

        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            if (a is None) != (b is None):
                raise DataError("cannot concatenate interactions where only one side has a ratings/timestamps/weights column")
            return None if a is None or b is None else np.concatenate([a, b])

        return Interactions(
            np.concatenate([self.users, other.users]),
            np.concatenate([self.items, other.items]),
            self.user_map,
            self.item_map,
            cat(self.ratings, other.ratings),
            cat(self.timestamps, other.timestamps),
            cat(self.weights, other.weights),
            item_data=self.item_data,
            user_data=self.user_data,
        )

    def compact(self) -> Interactions:
        """Drop users and items without interactions from the id maps and renumber densely (order kept)."""
        u_keep = np.unique(self.users)
        i_keep = np.unique(self.items)
        if len(u_keep) == self.n_users and len(i_keep) == self.n_items:
            return self
        u_new = np.full(self.n_users, -1, np.int32)
        u_new[u_keep] = np.arange(len(u_keep), dtype=np.int32)
        i_new = np.full(self.n_items, -1, np.int32)
        i_new[i_keep] = np.arange(len(i_keep), dtype=np.int32)
        return Interactions(
            u_new[self.users],
            i_new[self.items],
            self.user_map.take(u_keep),
            self.item_map.take(i_keep),
            self.ratings,
            self.timestamps,
            self.weights,
            item_data=None if self.item_data is None else self.item_data.iloc[i_keep],
            user_data=None if self.user_data is None else self.user_data.iloc[u_keep],
        )

    def deduplicate(self, policy: DuplicatePolicy = "last") -> Interactions:
        """Resolve repeated (user, item) pairs: see :meth:`from_frame` for the policies."""
        if policy not in get_args(DuplicatePolicy):
            raise DataError(f"unknown duplicate policy {policy!r}; choose one of {', '.join(get_args(DuplicatePolicy))}")
        if policy == "keep":
            return self
        key = self.users.astype(np.int64) * self.n_items + self.items
        order = self.time_order()
        key_sorted = key[order]
        # Group boundaries in (user, item, time) order.
        order = order[np.argsort(key_sorted, kind="stable")]
        key_sorted = key[order]
        starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
        if len(starts) == len(self):
            return self
        if policy == "raise":
            n_dup = len(self) - len(starts)
            raise DuplicateInteractionError(
                f"{n_dup} duplicate (user, item) rows; choose duplicates='first', 'last', 'sum', 'mean' or 'keep'"
            )
        if policy in ("first", "last"):
            ends = np.r_[starts[1:], len(order)] - 1
            rows = order[starts if policy == "first" else ends]
            return self.subset(np.sort(rows))
        if policy in ("sum", "mean"):
            counts = np.diff(np.r_[starts, len(order)])
            last_rows = order[np.r_[starts[1:], len(order)] - 1]
            out = self.subset(np.sort(last_rows))
            rank = np.argsort(np.argsort(last_rows))  # position of each group in the sorted output

            def agg(col: np.ndarray | None, how: str = policy) -> np.ndarray | None:
                if col is None:
                    return None
                sums = np.add.reduceat(col[order].astype(np.float64), starts)
                vals = sums / counts if how == "mean" else sums
                res = np.empty(len(vals), np.float32)
                res[rank] = vals
                return res

            return Interactions(
                # Ratings are averaged even under "sum": a summed rating would leave the rating scale.
                out.users, out.items, self.user_map, self.item_map, agg(self.ratings, "mean"), out.timestamps,
                agg(self.weights) if self.weights is not None else (
                    None if policy == "mean" else _counts_in_output(counts, rank)
                ),
                item_data=self.item_data, user_data=self.user_data,
            )
        raise DataError(f"unknown duplicate policy {policy!r}; use keep, first, last, sum, mean or raise")

    def time_order(self) -> np.ndarray:
        """Row order sorted by (user, timestamp, item); by (user, row) when there are no timestamps."""
        if "time_order" not in self._cache:
            if self._is_time_ordered():
                order = np.arange(len(self))  # common for logs; skips an O(n log n) sort of millions of rows
            elif self.timestamps is None:
                order = np.argsort(self.users, kind="stable")
            else:
                order = np.lexsort((self.items, self.timestamps, self.users))
            self._cache["time_order"] = order
        return self._cache["time_order"]

    def _is_time_ordered(self) -> bool:
        du = np.diff(self.users)
        if (du < 0).any():
            return False
        if self.timestamps is None:
            return True
        same = du == 0
        dt = np.diff(self.timestamps)[same]
        if (dt < 0).any():
            return False
        return bool(((dt > 0) | (np.diff(self.items)[same] >= 0)).all())

    def sequences(self) -> Sequences:
        """Every user's items in time order (ties by item index), as flat arrays with offsets."""
        if "sequences" not in self._cache:
            order = self.time_order()
            counts = np.bincount(self.users, minlength=self.n_users)
            offsets = np.zeros(self.n_users + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            self._cache["sequences"] = Sequences(
                offsets=offsets,
                items=self.items[order],
                timestamps=None if self.timestamps is None else self.timestamps[order],
                positions=order,
            )
        return self._cache["sequences"]

    def csr(self, values: CsrValues = "auto") -> sp.csr_matrix:
        """The user × item matrix in CSR form (duplicates summed).

        ``values``: ``"ones"`` (counts), ``"rating"``, ``"weight"``, or ``"auto"`` (weight if present, else ones).
        Repeated (user, item) pairs are summed, except for ratings, where the latest one counts. The result is
        cached; treat it as read-only.
        """
        if values == "auto":
            values = "weight" if self.weights is not None else "ones"
        if values not in self._cache:
            if values == "ones":
                data = np.ones(len(self), dtype=np.float32)
            elif values == "rating":
                if self.ratings is None:
                    raise DataError("these interactions have no ratings; use values='ones'")
                # Summing repeated ratings would be meaningless: the latest rating of a pair wins.
                latest = self.deduplicate("last")
                if latest is not self:
                    self._cache[values] = latest.csr("rating")
                    return self._cache[values]
                data = self.ratings
            elif values == "weight":
                if self.weights is None:
                    raise DataError("these interactions have no weights; use values='ones'")
                data = self.weights
            else:
                raise DataError(f"unknown csr values {values!r}; use auto, ones, rating or weight")
            mat = sp.csr_matrix((data, (self.users, self.items)), shape=(self.n_users, self.n_items), dtype=np.float32)
            mat.sum_duplicates()
            mat.sort_indices()
            self._cache[values] = mat
        return self._cache[values]

    def fingerprint(self) -> str:
        """A short hash of the events (indices, ratings, times, weights), the id maps and the side data: equal
        data, equal fingerprints."""
        digest = hashlib.blake2b(digest_size=8)
        for arr in (self.users, self.items, self.ratings, self.timestamps, self.weights, self.user_map.ids,
                    self.item_map.ids):
            digest.update(b"-" if arr is None else np.ascontiguousarray(arr).tobytes())
        for frame in (self.item_data, self.user_data):
            digest.update(b"-" if frame is None else _frame_hash(frame))
        return digest.hexdigest()

    def item_counts(self) -> np.ndarray:
        """Number of interactions of every item index."""
        return np.bincount(self.items, minlength=self.n_items)

    def user_counts(self) -> np.ndarray:
        """Number of interactions of every user index."""
        return np.bincount(self.users, minlength=self.n_users)

    def to_frame(self, user_col: str = "user_id", item_col: str = "item_id") -> pd.DataFrame:
        """A pandas DataFrame with the original ids and every optional column."""
        data: dict[str, Any] = {
            user_col: self.user_map.to_ids(self.users),
            item_col: self.item_map.to_ids(self.items),
        }
        if self.ratings is not None:
            data["rating"] = self.ratings
        if self.timestamps is not None:
            data["timestamp"] = self.timestamps
        if self.weights is not None:
            data["weight"] = self.weights
        return pd.DataFrame(data)


def _frame_hash(frame: pd.DataFrame) -> bytes:
    """The row hashes of a side-data frame and its column names (cells that pandas cannot hash, such as lists,
    by their text)."""
    try:
        rows = pd.util.hash_pandas_object(frame, index=True)
    except TypeError:
        rows = pd.util.hash_pandas_object(frame.astype(str), index=True)
    return rows.to_numpy().tobytes() + "|".join(map(str, frame.columns)).encode()


def _counts_in_output(counts: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """With ``duplicates='sum'`` and no weight column, the number of merged rows becomes the weight."""
    res = np.empty(len(counts), np.float32)
    res[rank] = counts
    return res
