"""Synthetic interactions with planted structure, for tests, demos and benchmarks.

:func:`make_synthetic` draws a dataset whose structure is known, so that tests can check that models find it:

* **taste clusters**: every user and item belongs to one of ``n_clusters`` clusters (balanced sizes). A fresh
  pick comes from the user's own cluster with probability ``cluster_affinity`` and otherwise from the whole
  catalogue (own cluster included), so the expected in-cluster share of fresh picks is
  ``cluster_affinity + (1 - cluster_affinity) * mass(own cluster)``;
* **popularity skew**: within either choice items are drawn with weight ``rank ** -popularity_alpha``, where
  the ranks are a random permutation of the items, so popularity is not aligned with item ids;
* **sequential dependence**: with probability ``sequential_strength`` a user's next item is the planted
  successor of the previous one instead of a fresh pick. The successor map is a random cycle through the items
  of each cluster (every item is the successor of exactly one item of its cluster; an item that is alone in
  its cluster is its own successor). Because the cycles are bijections, following them flattens popularity:
  a high ``sequential_strength`` weakens the skew of the item counts;
* **timestamps**: integer Unix seconds, strictly increasing per user (exponential gaps of at least one
  second). Users start at different moments of 2020 and stay active for roughly one week to one year, so
  global temporal splits are meaningful;
* **lengths**: heavy-tailed (log-normal shares), at least 5 events per user, ``n_interactions`` in all;
* **ratings** (optional): integers 1..5 stored as float32, higher for in-cluster items, plus user and item
  biases and noise.

Repeated (user, item) pairs happen (re-consumption, popular items, successor cycles); use
:meth:`~recforge.data.Interactions.deduplicate` when a model needs unique pairs. Rows come ordered by user,
then time.

The planted truth travels with the data: ``item_data`` has ``title`` ("Item 17"), ``genres`` (the cluster
label such as ``"c3"``, sometimes followed by a random second label, ``"c3|c5"``), ``cluster``, ``successor``
(the *id* of the planted next item, which stays valid after ``compact()``) and ``popularity`` (the normalised
sampling weight); ``user_data`` has ``cluster``. User and item ids are ``0..n-1``.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import pandas as pd
from numba import njit

from recforge.core.progress import progress_bar
from recforge.data.idmap import IdMap
from recforge.data.interactions import Interactions
from recforge.errors import DataError

__all__ = ["MIN_EVENTS_PER_USER", "make_synthetic"]

MIN_EVENTS_PER_USER = 5
"""Every synthetic user has at least this many events."""

_EPOCH_2020 = 1_577_836_800  # 2020-01-01T00:00:00Z
_DAY = 86_400
# Log-normal spread of per-user activity: a heavy tail without a handful of users taking everything.
_LENGTH_SIGMA = 1.0
_SECOND_GENRE_PROB = 0.3


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_prob(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise DataError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@njit(cache=True, nogil=True)
def _follow_successors(items: np.ndarray, take_successor: np.ndarray, successor: np.ndarray) -> None:
    """Replace flagged events by the successor of the event before them, in order (chains can be long)."""
    # The first event of a user is never flagged, so ``i - 1`` is always the same user's previous event.
    for i in range(items.shape[0]):
        if take_successor[i]:
            items[i] = successor[items[i - 1]]


def make_synthetic(
    n_users: int = 1000,
    n_items: int = 500,
    n_interactions: int = 50_000,
    n_clusters: int = 8,
    popularity_alpha: float = 1.0,
    sequential_strength: float = 0.3,
    ratings: bool = True,
    seed: int = 0,
    progress: bool = False,
    *,
    cluster_affinity: float = 0.8,
) -> Interactions:
    """Generate interactions with planted clusters, popularity skew and next-item dependence.

    See the module docstring for the generative process and the columns of ``item_data`` / ``user_data``.
    The same arguments and ``seed`` always give identical arrays; ``ratings=False`` leaves every other array
    unchanged (ratings are drawn last). 20 million interactions take about 5 s and 1 GB of peak memory.

    Raises:
        DataError: on sizes below 1, ``n_interactions < 5 * n_users``, ``n_clusters > n_items``, a negative
            ``popularity_alpha`` or a strength outside [0, 1].
    """
    n_users = _as_int("n_users", n_users)
    n_items = _as_int("n_items", n_items)
    n_interactions = _as_int("n_interactions", n_interactions)
    n_clusters = _as_int("n_clusters", n_clusters)
    if n_users < 1:
        raise DataError(f"n_users must be at least 1, got {n_users}")
    if n_items < 1:
        raise DataError(f"n_items must be at least 1, got {n_items}")
    if n_clusters < 1:
        raise DataError(f"n_clusters must be at least 1, got {n_clusters}")
    if n_clusters > n_items:
        raise DataError(
            f"n_clusters ({n_clusters}) cannot exceed n_items ({n_items}): every cluster needs items"
        )
    if n_users >= 2**31 or n_items >= 2**31:
        raise DataError("n_users and n_items must fit in int32 indices")
    if n_interactions < MIN_EVENTS_PER_USER * n_users:
        raise DataError(
            f"n_interactions ({n_interactions:,}) must be at least {MIN_EVENTS_PER_USER} per user "
            f"({MIN_EVENTS_PER_USER * n_users:,} for {n_users:,} users); lower n_users or raise it"
        )
    if (
        isinstance(popularity_alpha, bool)
        or not isinstance(popularity_alpha, numbers.Real)
        or not 0.0 <= float(popularity_alpha) < float("inf")
    ):
        raise DataError(
            f"popularity_alpha must be a finite number >= 0 (0 = no skew), got {popularity_alpha!r}"
        )
    seq_p = _as_prob("sequential_strength", sequential_strength)
    aff_p = _as_prob("cluster_affinity", cluster_affinity)

    stages = ["structure", "lengths", "items", "sequences", "timestamps"] + (["ratings"] if ratings else [])
    bar = progress_bar(total=len(stages), desc="synthetic", unit="stage", enabled=progress)

    started: list[str] = []

    def stage(name: str) -> None:
        if started:
            bar.update(1)
        started.append(name)
        bar.set_postfix_str(name)

    rng = np.random.default_rng(seed)
    n = n_interactions

    # ---------------------------------------------------------------- structure
    stage("structure")
    item_cluster = rng.permutation(np.arange(n_items, dtype=np.int32) % n_clusters)
    user_cluster = rng.permutation(np.arange(n_users, dtype=np.int32) % n_clusters)
    log_weight = -float(popularity_alpha) * np.log1p(rng.permutation(n_items).astype(np.float64))
    weight = np.exp(log_weight)
    weight /= weight.sum()

    # Items grouped by cluster; each block holds a CDF in (c, c + 1] so one searchsorted serves all clusters.
    by_cluster = np.argsort(item_cluster, kind="stable").astype(np.int32)
    sizes = np.bincount(item_cluster, minlength=n_clusters)
    starts = np.zeros(n_clusters + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    block = item_cluster[by_cluster].astype(np.int64)
    # Rescale by each cluster's top weight so a steep alpha cannot underflow a whole cluster to zero mass.
    lw = log_weight[by_cluster]
    cum = np.cumsum(np.exp(lw - np.maximum.reduceat(lw, starts[:-1])[block]))
    before = np.r_[0.0, cum[starts[1:-1] - 1]]
    mass = cum[starts[1:] - 1] - before
    cluster_key = block + (cum - before[block]) / mass[block]
    cluster_key[starts[1:] - 1] = np.arange(1, n_clusters + 1)  # exact block ends despite rounding
    global_cdf = np.cumsum(weight)
    global_cdf[-1] = 1.0

    # Successor cycle: shuffle each cluster's items, then each one points to the next in its block.
    cycle = by_cluster[np.lexsort((rng.random(n_items), block))]
    pos = np.arange(n_items, dtype=np.int64)
    nxt = np.where(pos + 1 == starts[block + 1], starts[block], pos + 1)
    successor = np.empty(n_items, dtype=np.int32)
    successor[cycle] = cycle[nxt]

    labels = np.array([f"c{k}" for k in range(n_clusters)], dtype=object)
    genres = labels[item_cluster]
    if n_clusters > 1:
        second = rng.random(n_items) < _SECOND_GENRE_PROB
        other = (item_cluster + rng.integers(1, n_clusters, n_items)) % n_clusters
        genres = np.where(second, genres + "|" + labels[other], genres)

    # ---------------------------------------------------------------- lengths
    stage("lengths")
    share = rng.lognormal(0.0, _LENGTH_SIGMA, n_users)
    share /= share.sum()
    lengths = MIN_EVENTS_PER_USER + rng.multinomial(n - MIN_EVENTS_PER_USER * n_users, share)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    users = np.repeat(np.arange(n_users, dtype=np.int32), lengths)
    firsts = offsets[:-1]

    # ---------------------------------------------------------------- fresh picks
    stage("items")
    take_successor = rng.random(n) < seq_p
    take_successor[firsts] = False
    fresh = np.flatnonzero(~take_successor)
    items = np.empty(n, dtype=np.int32)
    in_cluster = rng.random(fresh.size) < aff_p
    u = rng.random(fresh.size)

    rows = fresh[in_cluster]
    c = user_cluster[users[rows]].astype(np.int64)
    p = np.searchsorted(cluster_key, c + u[in_cluster], side="right")
    items[rows] = by_cluster[np.minimum(p, starts[c + 1] - 1)]
    del rows, c, p

    rows = fresh[~in_cluster]
    p = np.searchsorted(global_cdf, u[~in_cluster], side="right")
    items[rows] = np.minimum(p, n_items - 1)
    del rows, p, u, in_cluster, fresh

    # ---------------------------------------------------------------- sequential dependence
    stage("sequences")
    _follow_successors(items, take_successor, successor)
    del take_successor

    # ---------------------------------------------------------------- timestamps
    stage("timestamps")
    start = _EPOCH_2020 + rng.integers(0, 365 * _DAY, n_users)
    span = rng.uniform(7 * _DAY, 365 * _DAY, n_users)
    mean_gap = (span / lengths).astype(np.float32)
    gaps = rng.standard_exponential(n, dtype=np.float32)
    gaps *= mean_gap[users]
    steps = gaps.astype(np.int64)
    del gaps
    steps += 1  # at least one second apart: strictly increasing per user
    steps[firsts] = 0
    np.cumsum(steps, out=steps)
    timestamps = steps
    timestamps += np.repeat(start - timestamps[firsts], lengths)

    # ---------------------------------------------------------------- ratings
    rating_arr = None
    if ratings:
        stage("ratings")
        user_bias = rng.normal(0.0, 0.4, n_users).astype(np.float32)
        item_bias = rng.normal(0.0, 0.3, n_items).astype(np.float32)
        score = rng.normal(2.6, 0.7, n).astype(np.float32)
        score += user_bias[users]
        score += item_bias[items]
        score += np.float32(1.4) * (item_cluster[items] == user_cluster[users])
        rating_arr = np.clip(np.rint(score), 1, 5).astype(np.float32)
        del score

    bar.update(1)
    bar.close()

    item_ids = np.arange(n_items)
    item_data = pd.DataFrame(
        {
            "title": [f"Item {i}" for i in range(n_items)],
            "genres": genres,
            "cluster": item_cluster,
            "successor": successor,
            "popularity": weight,
        },
        index=pd.Index(item_ids, name="id"),
    )
    user_data = pd.DataFrame({"cluster": user_cluster}, index=pd.Index(np.arange(n_users), name="id"))
    return Interactions(
        users,
        items,
        IdMap(np.arange(n_users)),
        IdMap(item_ids),
        ratings=rating_arr,
        timestamps=timestamps,
        item_data=item_data,
        user_data=user_data,
    )
