"""Train/validation/test splits of :class:`~recforge.data.Interactions`.

Every splitter returns :class:`Split` objects whose parts share the id maps of the input, so indices are
comparable across parts. Per-user splits order each user's events by (timestamp, item index); without
timestamps, by row order. All random splitters take a ``seed`` and give the same split for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from recforge.data.interactions import Interactions, Sequences
from recforge.errors import DataError, EmptyDatasetError


@dataclass(frozen=True)
class Split:
    """One split: ``train`` and ``test``, optionally ``valid``, and for user-based splits the held-out users'
    fold-in ``history`` when it is kept out of ``train``."""

    train: Interactions
    test: Interactions
    valid: Interactions | None = None
    history: Interactions | None = None
    name: str = ""
    #: What was done to the parts and a reader should know (e.g. ``cold_test_users``: test users left out).
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def train_valid(self) -> Interactions:
        """Train and validation together: what a model is refitted on before the final test."""
        return self.train if self.valid is None else self.train.concat(self.valid)

    def summary(self) -> dict[str, int]:
        """Row counts of every part."""
        parts = {"train": self.train, "valid": self.valid, "test": self.test, "history": self.history}
        return {k: len(v) for k, v in parts.items() if v is not None}

    def seen_test_share(self) -> float:
        """The share of test events whose (user, item) pair is already in what the model is tested after (the
        history, else train + validation): with each user's seen items excluded from the rankings, these test
        events can never be hit — repeat consumption (play counts, re-purchases) deflates every metric."""
        before = self.history if self.history is not None else self.train_valid
        if not len(self.test) or not len(before):
            return 0.0
        n_items = np.int64(max(before.n_items, self.test.n_items))
        known = np.unique(before.users.astype(np.int64) * n_items + before.items)
        test = self.test.users.astype(np.int64) * n_items + self.test.items
        return float(np.isin(test, known).mean())


@dataclass(frozen=True)
class NextEventSamples:
    """Next-event samples of the temporal protocol: sample ``s`` asks for ``items[s]`` given the user's history,
    which is ``sequences[users[s]][:positions[s]]`` (all of that user's earlier events, whatever the split)."""

    users: np.ndarray
    items: np.ndarray
    positions: np.ndarray
    sequences: Sequences

    def __len__(self) -> int:
        return len(self.users)

    def history(self, sample: int) -> np.ndarray:
        """The item history of one sample, oldest first."""
        u = self.users[sample]
        start = self.sequences.offsets[u]
        return self.sequences.items[start : start + self.positions[sample]]


def _check(inter: Interactions) -> None:
    if len(inter) == 0:
        raise EmptyDatasetError("cannot split an empty dataset")


def _fraction(x: float, name: str, allow_zero: bool = True) -> float:
    lo_ok = x >= 0 if allow_zero else x > 0
    if not (lo_ok and x < 1):
        raise DataError(f"{name} must be a fraction in {'[0' if allow_zero else '(0'}, 1), got {x}")
    return float(x)


def _parts(inter: Interactions, label: np.ndarray, name: str) -> Split:
    """Build a split from a per-row label: 0 train, 1 valid, 2 test, 3 history."""
    has_valid = bool((label == 1).any())
    has_hist = bool((label == 3).any())
    if not (label == 2).any():
        raise EmptyDatasetError(f"the {name} split left no test interactions; the dataset is too small for it")
    return Split(
        train=inter.subset(label == 0),
        test=inter.subset(label == 2),
        valid=inter.subset(label == 1) if has_valid else None,
        history=inter.subset(label == 3) if has_hist else None,
        name=name,
    )


def random_split(inter: Interactions, test_size: float = 0.2, valid_size: float = 0.0, seed: int = 0) -> Split:
    """Seeded random holdout of rows: ``test_size`` and ``valid_size`` are fractions of all rows."""
    _check(inter)
    _fraction(test_size, "test_size", allow_zero=False)
    _fraction(valid_size, "valid_size")
    if test_size + valid_size >= 1:
        raise DataError("test_size + valid_size must be below 1")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(inter))
    n_test = round(test_size * len(inter))
    n_valid = round(valid_size * len(inter))
    label = np.zeros(len(inter), np.int8)
    label[perm[:n_test]] = 2
    label[perm[n_test : n_test + n_valid]] = 1
    return _parts(inter, label, "random")


def kfold(inter: Interactions, n_folds: int = 5, seed: int = 0) -> Iterator[Split]:
    """Seeded k-fold over rows: every row is a test row in exactly one of the ``n_folds`` splits."""
    _check(inter)
    if n_folds < 2 or n_folds > len(inter):
        raise DataError(f"n_folds must be between 2 and the number of rows ({len(inter)}), got {n_folds}")
    fold = np.random.default_rng(seed).permutation(len(inter)) % n_folds
    for f in range(n_folds):
        yield _parts(inter, np.where(fold == f, 2, 0).astype(np.int8), f"kfold-{f + 1}/{n_folds}")


def _position_from_end(inter: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """For every row: how many of its user's events come after it (0 = last) and the user's event count."""
    seq = inter.sequences()
    counts = seq.lengths
    pos_sorted = np.arange(len(inter)) - np.repeat(seq.offsets[:-1], counts)
    from_end_sorted = np.repeat(counts, counts) - 1 - pos_sorted
    from_end = np.empty(len(inter), np.int64)
    from_end[seq.positions] = from_end_sorted
    return from_end, counts[inter.users]


def last_n(inter: Interactions, n: int = 1, valid_n: int = 0, min_train: int = 1) -> Split:
    """Per user: the last ``n`` events are test, the ``valid_n`` before them validation, the rest train.

    Users with fewer than ``n + valid_n + min_train`` events keep all their events in train.
    """
    _check(inter)
    if n < 1 or valid_n < 0 or min_train < 0:
        raise DataError("last_n needs n >= 1, valid_n >= 0 and min_train >= 0")
    from_end, count = _position_from_end(inter)
    eligible = count >= n + valid_n + min_train
    label = np.zeros(len(inter), np.int8)
    label[eligible & (from_end < n)] = 2
    label[eligible & (from_end >= n) & (from_end < n + valid_n)] = 1
    return _parts(inter, label, f"last-{n}")


def holdout_one(inter: Interactions, seed: int = 0, min_events: int = 3) -> Split:
    """Per user: one event held out (the ``test`` part of the result), the rest train — the last event when the
    data has timestamps, a random one otherwise (file order is not time). Users with fewer than ``min_events``
    events stay whole in train. This is how a validation part is carved from a TRAIN file."""
    _check(inter)
    if inter.timestamps is not None:
        split = last_n(inter, n=1, min_train=min_events - 1)
        return Split(split.train, split.test, name="holdout-last")
    counts = np.bincount(inter.users, minlength=inter.n_users)
    # a uniformly random row per user: the row of smallest random key within each user
    keys = np.random.default_rng(seed).random(len(inter))
    order = np.lexsort((keys, inter.users))
    first = np.zeros(inter.n_users + 1, np.int64)
    np.cumsum(counts, out=first[1:])
    label = np.zeros(len(inter), np.int8)
    users = np.flatnonzero(counts >= min_events)
    label[order[first[users]]] = 2
    return _parts(inter, label, "holdout-random")


def leave_one_out(inter: Interactions, valid: bool = True, min_events: int = 3) -> Split:
    """Leave-last-one-out: each user's last event is test, the one before validation (``valid=True``).

    Users with fewer than ``min_events`` events stay whole in train (they still count for popularity).
    """
    need = 2 if valid else 1
    if min_events < need:
        raise DataError(f"min_events must be at least {need} here")
    split = last_n(inter, n=1, valid_n=1 if valid else 0, min_train=min_events - need)
    return Split(split.train, split.test, split.valid, name="leave-one-out")


def user_folds_last_n(inter: Interactions, n_folds: int = 5, n: int = 5, seed: int = 0) -> Iterator[Split]:
    """Users partitioned into ``n_folds`` random folds; in fold ``f`` the last ``n`` events of that fold's users
    are test and everything else is train (LensKit's ``partition_users`` with ``LastN``).

    Users with ``n`` or fewer events can never be tested, so they are always in train.
    """
    _check(inter)
    from_end, _count = _position_from_end(inter)
    eligible_users = np.flatnonzero(inter.user_counts() > n)
    if len(eligible_users) < n_folds:
        raise DataError(f"only {len(eligible_users)} users have more than {n} events; cannot make {n_folds} folds")
    rng = np.random.default_rng(seed)
    user_fold = np.full(inter.n_users, -1, np.int64)
    user_fold[rng.permutation(eligible_users)] = np.arange(len(eligible_users)) % n_folds
    row_fold = user_fold[inter.users]
    for f in range(n_folds):
        label = np.where((row_fold == f) & (from_end < n), 2, 0).astype(np.int8)
        yield _parts(inter, label, f"user-fold-{f + 1}/{n_folds}-last-{n}")


def user_split(
    inter: Interactions,
    test_users: float = 0.2,
    fold_in: float = 0.5,
    seed: int = 0,
    fold_in_to_train: bool = True,
) -> Split:
    """Held-out users: a random ``test_users`` fraction (or count) of users is held out; of each one's
    time-ordered events the first ``fold_in`` (fraction or count) are their known history, the rest test.

    With ``fold_in_to_train`` the history joins ``train`` (a model may use it, like LensKit); otherwise it is
    returned as ``split.history`` for models that score a history (``recommend_for_history``).
    """
    _check(inter)
    users_with_data = np.flatnonzero(inter.user_counts() > 0)
    n_test = round(test_users * len(users_with_data)) if isinstance(test_users, float) else int(test_users)
    if not 0 < n_test < len(users_with_data):
        raise DataError(f"test_users must select between 1 and {len(users_with_data) - 1} users, got {test_users}")
    rng = np.random.default_rng(seed)
    held = np.zeros(inter.n_users, bool)
    held[rng.choice(users_with_data, size=n_test, replace=False)] = True
    from_end, count = _position_from_end(inter)
    pos = count - 1 - from_end
    if isinstance(fold_in, float):
        _fraction(fold_in, "fold_in")
        n_hist = np.floor(count * fold_in).astype(np.int64)
    else:
        n_hist = np.full(len(inter), int(fold_in))
    label = np.zeros(len(inter), np.int8)
    is_held = held[inter.users]
    label[is_held & (pos >= n_hist)] = 2
    label[is_held & (pos < n_hist)] = 0 if fold_in_to_train else 3
    return _parts(inter, label, "user-based")


def _cut_time(value: float | str | pd.Timestamp | None, ts: np.ndarray, quantile: float) -> int:
    if value is None:
        return int(np.quantile(ts, quantile, method="lower"))
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return int(pd.Timestamp(value).tz_localize(None).timestamp()) if pd.Timestamp(value).tzinfo is None else int(
        pd.Timestamp(value).timestamp()
    )


def temporal_cut_points(
    inter: Interactions,
    valid: float = 0.1,
    test: float = 0.1,
    valid_start: int | str | None = None,
    test_start: int | str | None = None,
) -> tuple[int, int]:
    """The (valid_start, test_start) timestamps of a global temporal split: quantiles of all timestamps
    (``1 - valid - test`` and ``1 - test``), or the given dates/Unix times."""
    if inter.timestamps is None:
        raise DataError("a temporal split needs timestamps, and these interactions have none")
    _check(inter)
    _fraction(valid, "valid")
    _fraction(test, "test", allow_zero=False)
    ts = inter.timestamps
    t_test = _cut_time(test_start, ts, 1 - test)
    t_valid = _cut_time(valid_start, ts, 1 - test - valid) if (valid > 0 or valid_start is not None) else t_test
    if t_valid > t_test:
        raise DataError("the validation window must start before the test window")
    return t_valid, t_test


def temporal_split(
    inter: Interactions,
    valid: float = 0.1,
    test: float = 0.1,
    valid_start: int | str | None = None,
    test_start: int | str | None = None,
) -> Split:
    """Global temporal split: events before the validation cut are train, then validation, then test.

    Cuts are timestamp quantiles (default 80% / 90%) or dates / Unix times. Events exactly at a cut go to the
    later part.
    """
    t_valid, t_test = temporal_cut_points(inter, valid, test, valid_start, test_start)
    ts = inter.timestamps
    assert ts is not None
    label = np.where(ts >= t_test, 2, np.where(ts >= t_valid, 1, 0)).astype(np.int8)
    return _parts(inter, label, "temporal")


def warm_temporal_split(inter: Interactions, valid: float = 0.1, test: float = 0.1) -> Split:
    """:func:`temporal_split` whose validation and test parts keep only users with training events, so every
    scored user has a history before the cut (notebook 002's session protocol)."""
    split = temporal_split(inter, valid, test)
    known = np.zeros(inter.n_users, bool)
    known[split.train.users] = True
    valid_part = split.valid.subset(known[split.valid.users]) if split.valid is not None else None
    warm_test = split.test.subset(known[split.test.users])
    if len(warm_test) == 0:
        raise EmptyDatasetError("no test user has training events; the temporal cut leaves nothing to score")
    return Split(split.train, warm_test, valid_part if valid_part is not None and len(valid_part) else None,
                 name="session")


def next_event_samples(history: Interactions, scored: Interactions) -> NextEventSamples:
    """Every event of ``scored`` as one sample whose history is all earlier events of its user in ``history``
    and ``scored`` (ordered by time, then item index). Events without any earlier event are dropped (there is
    nothing to predict them from), as in the temporal next-event protocol."""
    both = history.concat(scored)
    is_scored = np.r_[np.zeros(len(history), bool), np.ones(len(scored), bool)]
    seq = both.sequences()
    flat = np.flatnonzero(is_scored[seq.positions])
    owner = np.repeat(np.arange(seq.n_users, dtype=np.int32), seq.lengths)[flat]
    pos = (flat - seq.offsets[owner]).astype(np.int64)
    keep = pos > 0
    return NextEventSamples(users=owner[keep], items=seq.items[flat[keep]], positions=pos[keep], sequences=seq)
