"""The direct method's reward model: any recforge model's scores, calibrated to a log's clicks per position.

``q̂(u, a, p) = σ(α_p + β · z(u, a))`` where ``z`` is the model's score of item ``a`` for user ``u`` standardised
over the logged (user, item) pairs, ``α_p`` an intercept per position (position bias) and ``β`` one slope; fitted
by logistic regression on every logged (position, item, click). Rewards count as clicks where positive.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from recforge.errors import DataError
from recforge.models.base import Recommender


class ClickModel:
    """Expected click of an item at a position for a user, from a fitted recforge ``model`` (see the module)."""

    def __init__(self, model: Recommender, reg: float = 1.0) -> None:
        self.model = model
        self.reg = reg

    def _scores(self, users: np.ndarray, slates: np.ndarray) -> np.ndarray:
        """The model's scores of each slate's items (users × slate positions), one scoring pass per distinct user."""
        distinct, row = np.unique(users, return_inverse=True)
        out = np.empty(slates.shape, np.float64)
        step = max(1, 2**24 // max(1, self.model.n_items_))
        for lo in range(0, len(distinct), step):
            block = self.model.score(distinct[lo : lo + step])
            at = (row >= lo) & (row < lo + step)
            out[at] = block[(row[at] - lo)[:, None], slates[at]]
        return out

    def _features(self, users: np.ndarray, slates: np.ndarray) -> np.ndarray:
        z = (self._scores(users, slates) - self.mean_) / self.scale_
        k = slates.shape[1]
        positions = np.broadcast_to(np.eye(k), (len(users), k, k))
        return np.concatenate([positions, z[:, :, None]], axis=2).reshape(-1, k + 1)

    def fit(self, users: np.ndarray, slates: np.ndarray, rewards: np.ndarray) -> ClickModel:
        """Calibrate on logged slates (n × k item indices of the model's catalogue) and their rewards (n × k)."""
        users, slates = np.asarray(users, np.int64), np.asarray(slates, np.int64)
        clicks = (np.asarray(rewards) > 0).ravel()
        if clicks.all() or not clicks.any():
            raise DataError("a click model needs logged positions with and without clicks")
        raw = self._scores(users, slates)
        self.mean_, self.scale_ = float(raw.mean()), float(raw.std()) or 1.0
        self.k_ = slates.shape[1]
        self.regression_ = LogisticRegression(C=1.0 / self.reg, fit_intercept=False).fit(
            self._features(users, slates), clicks)
        return self

    def predict(self, users: np.ndarray, slates: np.ndarray) -> np.ndarray:
        """Expected clicks (users × positions) of the given slates."""
        slates = np.asarray(slates, np.int64)
        if slates.shape[1] != self.k_:
            raise DataError(f"the click model was fitted on slates of {self.k_} items, got {slates.shape[1]}")
        proba = self.regression_.predict_proba(self._features(np.asarray(users, np.int64), slates))[:, 1]
        return proba.reshape(slates.shape)
