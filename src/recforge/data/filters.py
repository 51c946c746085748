"""Filters that return new :class:`Interactions`: k-core, minimum counts, rating threshold, duplicates.

Every filter compacts the id maps (users and items left without interactions are dropped) and raises
:class:`~recforge.errors.EmptyDatasetError` when nothing is left, naming the filter that emptied the data.
"""

from __future__ import annotations

import logging

import numpy as np

from recforge.data.interactions import DuplicatePolicy, Interactions
from recforge.errors import DataError, EmptyDatasetError

log = logging.getLogger(__name__)


def _finish(inter: Interactions, keep: np.ndarray, what: str) -> Interactions:
    if not keep.any():
        raise EmptyDatasetError(f"no interactions are left after {what}; loosen the filter")
    out = inter.subset(keep) if not keep.all() else inter
    return out.compact()


def k_core(inter: Interactions, user_k: int = 5, item_k: int | None = None, max_iter: int = 1000) -> Interactions:
    """Iteratively drop users with fewer than ``user_k`` and items with fewer than ``item_k`` interactions.

    Repeats until both hold for every remaining user and item (the iterative k-core). ``item_k`` defaults to
    ``user_k``. Counts are rows, so with duplicates kept a repeated pair counts more than once.
    """
    item_k = user_k if item_k is None else item_k
    if user_k < 0 or item_k < 0:
        raise DataError("k-core thresholds must be >= 0")
    keep = np.ones(len(inter), dtype=bool)
    for _ in range(max_iter):
        u_cnt = np.bincount(inter.users[keep], minlength=inter.n_users)
        i_cnt = np.bincount(inter.items[keep], minlength=inter.n_items)
        bad = keep & ((u_cnt[inter.users] < user_k) | (i_cnt[inter.items] < item_k))
        if not bad.any():
            break
        keep &= ~bad
    else:
        log.warning("k_core stopped after max_iter=%d rounds before converging", max_iter)
    return _finish(inter, keep, f"the {user_k}/{item_k}-core filter")


def min_item_count(inter: Interactions, n: int) -> Interactions:
    """Keep items with at least ``n`` interactions (one pass, users are not re-checked)."""
    cnt = inter.item_counts()
    return _finish(inter, cnt[inter.items] >= n, f"keeping items seen at least {n} times")


def min_user_count(inter: Interactions, n: int) -> Interactions:
    """Keep users with at least ``n`` interactions (one pass)."""
    cnt = inter.user_counts()
    return _finish(inter, cnt[inter.users] >= n, f"keeping users with at least {n} interactions")


def rating_threshold(inter: Interactions, threshold: float, keep_ratings: bool = False) -> Interactions:
    """Turn explicit ratings into implicit feedback: keep rows rated ``>= threshold``.

    The rating column is dropped unless ``keep_ratings`` is true.
    """
    if inter.ratings is None:
        raise DataError("rating_threshold needs a rating column, and these interactions have none")
    out = _finish(inter, inter.ratings >= threshold, f"keeping ratings >= {threshold}")
    if not keep_ratings:
        out = Interactions(
            out.users, out.items, out.user_map, out.item_map, None, out.timestamps, out.weights,
            item_data=out.item_data, user_data=out.user_data,
        )
    return out


def deduplicate(inter: Interactions, policy: DuplicatePolicy = "last") -> Interactions:
    """Resolve repeated (user, item) pairs; see :meth:`Interactions.from_frame` for the policies."""
    return inter.deduplicate(policy)
