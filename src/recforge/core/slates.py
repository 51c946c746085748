"""Stochastic slates with known probabilities, from a block of scores: what off-policy evaluation needs logged.

A :class:`SlateSampler` turns each row of scores (items a user may not see excluded) into a slate of ``k``
distinct items, and for any slate gives the probabilities the off-policy estimators use
(:class:`SlateDraw`): of each item at its position, of each prefix (the first ``j`` items), of the whole slate.

- :class:`Greedy`: the top ``k`` (recforge's tie-break), with probability 1.
- :class:`EpsilonGreedy`: the top ``k`` with probability ``1 − ε``, else a uniformly random ordered slate of
  allowed items; every allowed slate has a positive probability, so any target policy is supported.
- :class:`PositionSwaps`: the top ``k``; with probability ``swap`` two adjacent positions (a uniformly chosen pair)
  exchange their items — explores the order, not the items.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from recforge.core.topk import mask_and_topk
from recforge.errors import DataError


@dataclass(frozen=True)
class SlateDraw:
    """Slates (n × k item indices) and their probabilities under the policy that drew or is asked about them:
    ``position[i, j]`` of item ``slates[i, j]`` at position ``j``, ``prefix[i, j]`` of the first ``j + 1`` items,
    ``slate[i]`` of the whole slate (``prefix[:, -1]``)."""

    slates: np.ndarray
    position: np.ndarray
    prefix: np.ndarray

    @property
    def slate(self) -> np.ndarray:
        """Probability of each whole slate."""
        return self.prefix[:, -1]


def _allowed_counts(n_rows: int, n_items: int, ex_ptr: np.ndarray | None, ex_idx: np.ndarray | None) -> np.ndarray:
    """Items each row may show: the catalogue minus its excluded items (distinct within a row, as in a CSR matrix
    whose duplicates are summed)."""
    if ex_ptr is None or ex_idx is None:
        return np.full(n_rows, n_items, np.int64)
    return n_items - np.diff(np.asarray(ex_ptr, np.int64))


class SlateSampler(ABC):
    """Draws slates of ``k`` items around a greedy slate and gives the probabilities of any slate (see the
    module). The greedy slates come from score rows (:meth:`sample`, :meth:`probabilities`) or from a policy's
    own deterministic choice (:meth:`draw`, :meth:`probabilities_of`); excluded items (the CSR pattern
    ``ex_ptr``/``ex_idx``, one row per slate, distinct indices within a row) are never drawn."""

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DataError(f"slate size must be a positive integer, got {k!r}")
        self.k = int(k)

    def __repr__(self) -> str:
        settings = "".join(f", {name}={getattr(self, name):g}" for name in ("epsilon", "swap") if hasattr(self, name))
        return f"{type(self).__name__}(k={self.k}{settings})"

    def greedy(self, scores: np.ndarray, ex_ptr: np.ndarray | None = None, ex_idx: np.ndarray | None = None) -> np.ndarray:
        """The top ``k`` allowed items of every score row (recforge's tie-break)."""
        top, _ = mask_and_topk(np.array(scores, dtype=np.float32), self.k, ex_ptr, ex_idx)
        if top.shape[1] < self.k or (top < 0).any():
            raise DataError(f"a slate of {self.k} items needs at least {self.k} allowed items for every user")
        return top.astype(np.int64)

    def sample(self, scores: np.ndarray, rng: np.random.Generator, ex_ptr: np.ndarray | None = None,
               ex_idx: np.ndarray | None = None) -> SlateDraw:
        """One slate per score row, with its probabilities."""
        return self.draw(self.greedy(scores, ex_ptr, ex_idx), rng, np.shape(scores)[1], ex_ptr, ex_idx)

    def probabilities(self, scores: np.ndarray, slates: np.ndarray, ex_ptr: np.ndarray | None = None,
                      ex_idx: np.ndarray | None = None) -> SlateDraw:
        """The probabilities of given slates (one per score row)."""
        return self.probabilities_of(self.greedy(scores, ex_ptr, ex_idx), slates, np.shape(scores)[1], ex_ptr, ex_idx)

    @abstractmethod
    def draw(self, greedy: np.ndarray, rng: np.random.Generator, n_items: int, ex_ptr: np.ndarray | None = None,
             ex_idx: np.ndarray | None = None) -> SlateDraw:
        """One slate around each greedy slate (n × k), with its probabilities."""

    @abstractmethod
    def probabilities_of(self, greedy: np.ndarray, slates: np.ndarray, n_items: int, ex_ptr: np.ndarray | None = None,
                         ex_idx: np.ndarray | None = None) -> SlateDraw:
        """The probabilities of ``slates`` when the greedy slates are ``greedy``."""


class _FiniteMixture(SlateSampler):
    """A policy choosing among a few rearrangements of the greedy slate: ``outcomes`` (m × k position orders) with
    probabilities ``weights`` (m)."""

    outcomes: np.ndarray
    weights: np.ndarray

    def draw(self, greedy: np.ndarray, rng: np.random.Generator, n_items: int, ex_ptr: np.ndarray | None = None,
             ex_idx: np.ndarray | None = None) -> SlateDraw:
        greedy = _checked_slates(greedy, len(greedy), self.k)
        pick = rng.choice(len(self.weights), size=len(greedy), p=self.weights)
        return self.probabilities_of(greedy, np.take_along_axis(greedy, self.outcomes[pick], axis=1), n_items)

    def probabilities_of(self, greedy: np.ndarray, slates: np.ndarray, n_items: int, ex_ptr: np.ndarray | None = None,
                         ex_idx: np.ndarray | None = None) -> SlateDraw:
        greedy = _checked_slates(greedy, len(greedy), self.k)
        return mixture_probabilities(greedy[:, self.outcomes], self.weights, _checked_slates(slates, len(greedy), self.k))


def mixture_probabilities(options: np.ndarray, weights: np.ndarray, slates: np.ndarray) -> SlateDraw:
    """The probabilities of ``slates`` (n × k) under a policy that shows option ``o`` of ``options`` (n × m × k,
    the slates it can show in each context) with probability ``weights[o]`` (several options may coincide)."""
    same = options == slates[:, None, :]
    w = np.asarray(weights, np.float64)[None, :, None]
    return SlateDraw(slates, (same * w).sum(axis=1), (np.cumprod(same, axis=2) * w).sum(axis=1))


class Greedy(_FiniteMixture):
    """The top ``k`` items, always."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.outcomes = np.arange(self.k)[None, :]
        self.weights = np.ones(1)


class PositionSwaps(_FiniteMixture):
    """The top ``k`` items; with probability ``swap`` one uniformly chosen pair of adjacent positions is exchanged."""

    def __init__(self, k: int, swap: float = 0.2) -> None:
        super().__init__(k)
        if not 0 <= swap <= 1 or (swap > 0 and self.k < 2):
            raise DataError(f"swap must lie in [0, 1] (and needs slates of 2+ items), got {swap!r}")
        orders = [np.arange(self.k)]
        for t in range(self.k - 1):
            order = np.arange(self.k)
            order[[t, t + 1]] = order[[t + 1, t]]
            orders.append(order)
        self.outcomes = np.array(orders)
        self.weights = np.array([1 - swap] + [swap / (self.k - 1)] * (self.k - 1)) if self.k > 1 else np.ones(1)
        self.swap = float(swap)


class EpsilonGreedy(SlateSampler):
    """The top ``k`` with probability ``1 − epsilon``, else an ordered slate of ``k`` distinct allowed items drawn
    uniformly. Every allowed slate has probability at least ``epsilon / (n (n − 1) ⋯ (n − k + 1))`` (``n``: the
    user's allowed items)."""

    def __init__(self, k: int, epsilon: float = 0.2) -> None:
        super().__init__(k)
        if not 0 <= epsilon <= 1:
            raise DataError(f"epsilon must lie in [0, 1], got {epsilon!r}")
        self.epsilon = float(epsilon)

    def draw(self, greedy: np.ndarray, rng: np.random.Generator, n_items: int, ex_ptr: np.ndarray | None = None,
             ex_idx: np.ndarray | None = None) -> SlateDraw:
        slates = _checked_slates(greedy, len(greedy), self.k).copy()
        explore = np.flatnonzero(rng.random(len(slates)) < self.epsilon)
        if len(explore):
            # k distinct allowed items in a uniformly random order: the top k of random keys, excluded items masked
            keys = rng.random((len(explore), n_items)).astype(np.float32)
            sub_ptr = sub_idx = None
            if ex_ptr is not None and ex_idx is not None:
                starts, ends = ex_ptr[explore], ex_ptr[explore + 1]
                sub_ptr = np.concatenate([[0], np.cumsum(ends - starts)])
                sub_idx = np.concatenate([ex_idx[a:b] for a, b in zip(starts, ends)] or [np.zeros(0, np.int64)])
            slates[explore] = self.greedy(keys, sub_ptr, sub_idx)
        return self.probabilities_of(greedy, slates, n_items, ex_ptr, ex_idx)

    def probabilities_of(self, greedy: np.ndarray, slates: np.ndarray, n_items: int, ex_ptr: np.ndarray | None = None,
                         ex_idx: np.ndarray | None = None) -> SlateDraw:
        greedy = _checked_slates(greedy, len(greedy), self.k)
        slates = _checked_slates(slates, len(greedy), self.k)
        allowed = _allowed_counts(len(greedy), n_items, ex_ptr, ex_idx)
        # a uniform draw never shows an excluded item nor one twice: such slates have only the greedy part
        free = ~_excluded(slates, n_items, ex_ptr, ex_idx)
        drawable = free.copy()
        for j in range(1, self.k):
            drawable[:, j] &= (slates[:, j, None] != slates[:, :j]).all(axis=1)
        eps = self.epsilon
        same = greedy == slates
        # uniform ordered draws: 1/n at a position, 1/(n (n-1) ... (n-j)) for the first j+1 items
        falling = np.cumprod((allowed[:, None] - np.arange(self.k)[None, :]).astype(np.float64), axis=1)
        position = (1 - eps) * same + eps * free / allowed[:, None]
        prefix = (1 - eps) * np.cumprod(same, axis=1) + eps * np.cumprod(drawable, axis=1) / falling
        return SlateDraw(slates, position, prefix)


def pseudo_inverse_weights(targets: np.ndarray, slates: np.ndarray, greedy: np.ndarray, allowed: np.ndarray,
                           epsilon: float) -> np.ndarray:
    """Per impression, the pseudo-inverse estimator's weight ``1_tᵀ Γ⁺ 1_s`` (Swaminathan et al. 2017) of the
    target slate ``t`` (``targets``, n × k) given the logged slate ``s`` (``slates``), when the logging policy was
    :class:`EpsilonGreedy` around ``greedy`` over ``allowed`` items per row (``Γ``: the logging policy's second
    moment of slate indicators). Under a uniform ordered draw of ``k`` of ``m`` items, ``Γ_U``'s eigenspaces give
    ``1_tᵀ Γ_U⁺ 1_s = 1 + (m − 1)(m·M − k²) / (k (m − k)) + (m − 1)(D − M/k)`` (``M``: items ``t`` and ``s`` share,
    ``D``: of them at the same position); the greedy slate's point mass is a rank-one update (Sherman–Morrison on
    the range every slate indicator lies in). With additive per-position rewards, ``mean(weight · Σ_j r_j)`` is
    unbiased for the target's value."""
    if not 0 < epsilon <= 1:
        raise DataError(f"the pseudo-inverse estimator needs exploration: epsilon in (0, 1], got {epsilon!r}")
    k = targets.shape[1]
    m = np.asarray(allowed, np.float64)
    if (m <= k).any():
        raise DataError(f"the pseudo-inverse estimator needs more than {k} allowed items per impression")

    def form(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        shared = (a[:, :, None] == b[:, None, :]).sum(axis=(1, 2))
        same = (a == b).sum(axis=1)
        return 1 + (m - 1) * (m * shared - k * k) / (k * (m - k)) + (m - 1) * (same - shared / k)

    if epsilon == 1:
        return form(targets, slates)
    c = (1 - epsilon) / epsilon
    return (form(targets, slates) - c * form(targets, greedy) * form(greedy, slates) / (1 + c * form(greedy, greedy))) / epsilon


def _excluded(slates: np.ndarray, n_items: int, ex_ptr: np.ndarray | None, ex_idx: np.ndarray | None) -> np.ndarray:
    """Which entries of ``slates`` are excluded items of their row (or outside the catalogue)."""
    outside = (slates < 0) | (slates >= n_items)
    if ex_ptr is None or ex_idx is None or not len(ex_idx):
        return outside
    rows = np.repeat(np.arange(len(ex_ptr) - 1, dtype=np.int64), np.diff(ex_ptr))
    excluded = rows * n_items + np.asarray(ex_idx, np.int64)  # sorted when each row's indices are
    if len(excluded) > 1 and (excluded[1:] < excluded[:-1]).any():
        excluded = np.sort(excluded)
    keys = np.arange(len(slates), dtype=np.int64)[:, None] * n_items + slates
    at = np.minimum(np.searchsorted(excluded, keys), len(excluded) - 1)
    return outside | (excluded[at] == keys)


def _checked_slates(slates: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    arr = np.asarray(slates)
    if arr.shape != (n_rows, k):
        raise DataError(f"slates must have shape {(n_rows, k)}, got {arr.shape}")
    return arr.astype(np.int64)
