"""Rating-model metrics beyond RMSE: per-user rating-graded NDCG (notebook 001) and a user-level bootstrap CI of
RMSE (a user's ratings resampled together)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recforge.data.interactions import Interactions
from recforge.models.base import RatingPredictor, Recommender


def rating_gain_ndcg(users: np.ndarray, ratings: np.ndarray, predictions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user: NDCG of their rated test items ordered by ``predictions`` with the true ``ratings`` as gains,
    against the ideal order; LensKit's discount ``max(1, log2(rank))`` (ranks 1 and 2 count fully). Returns
    (sorted distinct users, their NDCG). Equal predictions keep row order (a stable sort)."""
    users = np.asarray(users)
    gains = np.asarray(ratings, np.float64)
    pred = np.asarray(predictions, np.float64)
    by_pred = np.lexsort((-pred, users))  # per user, highest prediction first
    by_gain = np.lexsort((-gains, users))
    uniq, starts, counts = np.unique(users[by_pred], return_index=True, return_counts=True)
    rank = np.arange(len(users)) - np.repeat(starts, counts) + 1
    disc = 1.0 / np.maximum(1.0, np.log2(rank))
    row = np.repeat(np.arange(len(uniq)), counts)
    dcg = np.bincount(row, gains[by_pred] * disc, len(uniq))
    idcg = np.bincount(row, gains[by_gain] * disc, len(uniq))
    return uniq, np.divide(dcg, idcg, out=np.zeros(len(uniq)), where=idcg > 0)


def rating_user_metrics(model: Recommender, test: Interactions) -> pd.DataFrame | None:
    """Per test user of a rating model: ``rating_ndcg`` and the squared-error sum and count behind RMSE
    (``rating_sse``, ``rating_n``); None for top-N models or data without ratings."""
    if not isinstance(model, RatingPredictor) or test.ratings is None or len(test) == 0:
        return None
    pred = model.predict_indices(test.users, test.items).astype(np.float64)
    truth = test.ratings.astype(np.float64)
    users, ndcg = rating_gain_ndcg(test.users, truth, pred)
    n = np.bincount(test.users, minlength=model.n_users_)[users]
    sse = np.bincount(test.users, (pred - truth) ** 2, minlength=model.n_users_)[users]
    return pd.DataFrame({"user_id": model.user_map_.to_ids(users), "rating_ndcg": ndcg, "rating_sse": sse,
                         "rating_n": n.astype(np.float64)})


def user_bootstrap_rmse(per_user: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% CI of the pooled RMSE, resampling users (a user's ratings stay together)."""
    sse = per_user["rating_sse"].to_numpy(np.float64)
    n = per_user["rating_n"].to_numpy(np.float64)
    idx = np.random.default_rng(seed).integers(0, len(sse), size=(n_boot, len(sse)))
    boots = np.sqrt(sse[idx].sum(axis=1) / np.maximum(n[idx].sum(axis=1), 1.0))
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(lo), float(hi)
