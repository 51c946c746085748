"""Metric functions: pure, vectorised, on arrays.

Ranking metrics take a boolean ``hits`` matrix (one row per user, column ``j`` true when the item at rank
``j + 1`` of that user's list is relevant), the number of relevant items per user ``n_rel``, and ``k``.
Definitions (binary relevance, ``h_j`` = hit at rank ``j``):

- ``hr@k``: 1 if any of the top k is relevant.
- ``precision@k``: hits in the top k / k.
- ``recall@k``: hits in the top k / n_rel.
- ``dcg@k``: Σ_j h_j / log2(j + 1).
- ``ndcg@k``: dcg@k / idcg, where idcg puts min(n_rel, k) relevant items first.
- ``map@k``: Σ_j h_j · precision@j / min(n_rel, k).
- ``mrr``: 1 / rank of the first relevant item in the *full* ranking (0 when no relevant item can be ranked);
  ``mrr@k`` counts it only within the top k.
- ``coverage@k``: distinct items in all top-k lists / catalogue size (one value for the whole model).
"""

from __future__ import annotations

import numpy as np

from recforge.errors import DataError


def _check(hits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0:
        raise DataError(f"k must be positive, got {k}")
    if hits.ndim != 2:
        raise DataError("hits must be a 2-D (users × ranks) array")
    if k > hits.shape[1]:
        raise DataError(f"k={k} exceeds the {hits.shape[1]} ranks that were computed")
    return hits[:, :k].astype(np.float64)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def hit_rate(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-user HitRate@k."""
    return (_check(hits, k).sum(axis=1) > 0).astype(np.float64)


def precision(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-user Precision@k."""
    return _check(hits, k).sum(axis=1) / k


def recall(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@k (0 for users without relevant items)."""
    n = np.asarray(n_rel, dtype=np.float64)
    return np.divide(_check(hits, k).sum(axis=1), n, out=np.zeros(len(n)), where=n > 0)


def dcg(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-user DCG@k with binary gains."""
    return _check(hits, k) @ _discounts(k)


def ndcg(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k with binary gains."""
    ideal = np.concatenate([[0.0], np.cumsum(_discounts(k))])
    idcg = ideal[np.minimum(np.asarray(n_rel), k)]
    return np.divide(dcg(hits, k), idcg, out=np.zeros(len(idcg)), where=idcg > 0)


def average_precision(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """Per-user AP@k (its mean over users is MAP@k)."""
    h = _check(hits, k)
    prec_at = np.cumsum(h, axis=1) / np.arange(1, k + 1)
    denom = np.minimum(np.asarray(n_rel, dtype=np.float64), k)
    return np.divide((prec_at * h).sum(axis=1), denom, out=np.zeros(len(denom)), where=denom > 0)


def reciprocal_rank(first_rank: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-user reciprocal rank from the 1-based rank of the first relevant item (0 = none ranked).

    With ``k``, ranks beyond ``k`` count as misses (MRR@k).
    """
    r = np.asarray(first_rank, dtype=np.float64)
    ok = r > 0
    if k is not None:
        ok &= r <= k
    return np.divide(1.0, r, out=np.zeros(len(r)), where=ok)


def coverage(top_items: np.ndarray, k: int, n_items: int) -> float:
    """Catalogue coverage@k: distinct items among all users' top k (``-1`` padding ignored) / n_items."""
    block = np.asarray(top_items)[:, :k]
    distinct = np.unique(block[block >= 0])
    return float(len(distinct)) / n_items if n_items else 0.0


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error."""
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error."""
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.mean(np.abs(y_true - y_pred)))


def _pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    if a.shape != b.shape:
        raise DataError(f"y_true and y_pred differ in shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise DataError("cannot compute an error over zero predictions")
    return a, b


def per_user_metrics(
    hits: np.ndarray, n_rel: np.ndarray, first_rank: np.ndarray, ks: list[int]
) -> dict[str, np.ndarray]:
    """Every per-user ranking metric at every ``k``, plus full-list ``mrr``; keys like ``"ndcg@10"``."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(hits, k)
        out[f"recall@{k}"] = recall(hits, n_rel, k)
        out[f"precision@{k}"] = precision(hits, k)
        out[f"ndcg@{k}"] = ndcg(hits, n_rel, k)
        out[f"dcg@{k}"] = dcg(hits, k)
        out[f"map@{k}"] = average_precision(hits, n_rel, k)
        out[f"mrr@{k}"] = reciprocal_rank(first_rank, k)
    out["mrr"] = reciprocal_rank(first_rank)
    return out
