"""Simulated users built from real data: hidden true preferences and a choice model with a no-click option.

A strong model fitted on *all* of a dataset's events (by default implicit ALS) gives every user a hidden taste
vector; the agent only sees part of each user's history, so there is something to learn online. A shown slate is
answered by a multinomial logit over its items plus an outside "no click" option:

``P(click item at position p) ∝ exp(beta·z(u, i) − position_decay·ln(1 + p) − shown_penalty·n_shown(u, i)
− consumed_penalty·[u already has i])`` and ``P(no click) ∝ exp(no_click)``,

where ``z(u, i)`` is the true preference standardised over the catalogue for that user (mean 0, sd 1, computed in
closed form from the factors, never a dense user × item matrix). Users leave after ``patience`` slates in a row
without a click, after a click with probability ``leave_after_click``, or after ``horizon`` slates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from recforge.data.interactions import Interactions
from recforge.errors import DataError
from recforge.features import genre_matrix
from recforge.models import create_model


@dataclass
class UserBehaviour:
    """How simulated users choose and leave (every element of the choice model; see the module docstring).

    Defaults were set on ml-latest-small (with ``make_environments``' defaults: popularity 0.3, intent 0.7) so
    that policies are far apart: random about 2% click-through, most-popular 21%, a static ALS fitted on the
    visible history 33%, and an oracle that knows the hidden preferences 43% (``benchmarks/bench_interactive.py``).
    """

    slate_size: int = 5
    horizon: int = 30
    patience: int = 3
    beta: float = 2.0
    no_click: float = 6.0
    position_decay: float = 0.5
    shown_penalty: float = 1.0
    consumed_penalty: float = 4.0
    leave_after_click: float = 0.0

    def check(self) -> UserBehaviour:
        """Raise :class:`DataError` naming the first invalid setting."""
        for name in ("slate_size", "horizon", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DataError(f"UserBehaviour.{name} must be a positive integer, got {value!r}")
        for name in ("beta", "position_decay", "shown_penalty", "consumed_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise DataError(f"UserBehaviour.{name} must be a non-negative number, got {value!r}")
        if not isinstance(self.no_click, (int, float)) or not np.isfinite(self.no_click):
            raise DataError(f"UserBehaviour.no_click must be a finite number, got {self.no_click!r}")
        if not 0 <= self.leave_after_click <= 1:
            raise DataError(f"UserBehaviour.leave_after_click must lie in [0, 1], got {self.leave_after_click!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return asdict(self)


class TruePreferences:
    """Hidden tastes as factors, standardised per user over the whole catalogue.

    ``z(u, i) = (1 − intent) · z_data(u, i) + intent · z_intent(u, i)``: ``z_data`` comes from the model fitted on
    the data (``user_factors · item_factors``, with only ``popularity`` of the average user direction — mostly
    popularity — kept), ``z_intent`` from a random per-user "current intent": ``intent_topics`` dimensions of the
    unit-norm ``intent_features`` (e.g. two genres, or by default two axes of the item factors) with random
    weights — a taste the data does not show but clicks reveal, so that policies that learn online have
    something to learn. Both parts are standardised in closed form (mean and sd over the catalogue from the
    factors' mean and covariance); nothing user × item is ever stored.
    """

    def __init__(
        self,
        user_factors: np.ndarray,
        item_factors: np.ndarray,
        popularity: float = 1.0,
        intent: float = 0.0,
        seed: int = 0,
        intent_features: np.ndarray | None = None,
        intent_topics: int = 2,
    ) -> None:
        if not 0 <= popularity <= 1 or not 0 <= intent <= 1:
            raise DataError(f"popularity and intent must lie in [0, 1], got {popularity!r} and {intent!r}")
        users = np.asarray(user_factors, dtype=np.float64)
        items = np.ascontiguousarray(item_factors, dtype=np.float64)
        # The mean user vector is the direction everybody shares (mostly popularity); keep only a share of it.
        self.user_factors = np.ascontiguousarray(users - (1.0 - popularity) * users.mean(axis=0))
        self.item_factors = items
        feats = items if intent_features is None else np.asarray(intent_features, dtype=np.float64)
        if feats.shape[0] != items.shape[0]:
            raise DataError(f"intent_features has {feats.shape[0]} rows for {items.shape[0]} items")
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        self.item_directions = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)
        self.intent = float(intent)
        # Each user's intent: a few of the feature dimensions (e.g. two genres) with random weights.
        rng = np.random.default_rng(seed)
        n_users, n_dims = users.shape[0], feats.shape[1]
        topics = min(max(1, intent_topics), n_dims)
        self.intent_vectors = np.zeros((n_users, n_dims))
        picks = np.argsort(rng.random((n_users, n_dims)), axis=1)[:, :topics]
        np.put_along_axis(self.intent_vectors, picks, rng.dirichlet(np.ones(topics), n_users), axis=1)
        self.mean, self.sd = self._moments(self.user_factors, self.item_factors)
        self.intent_mean, self.intent_sd = self._moments(self.intent_vectors, self.item_directions)

    @staticmethod
    def _moments(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-user mean and sd of ``users @ items.T`` over the items, from the items' mean and covariance."""
        mean_item = items.mean(axis=0)
        cov = np.cov(items, rowvar=False, bias=True).reshape(len(mean_item), len(mean_item))
        var = np.einsum("uf,fg,ug->u", users, cov, users)
        return users @ mean_item, np.sqrt(np.maximum(var, 1e-12))

    @classmethod
    def from_data(
        cls, data: Interactions, model: str = "als", seed: int = 0, popularity: float = 1.0, intent: float = 0.0,
        intent_features: str | None = "genres", **params: Any,
    ) -> TruePreferences:
        """Fit a factor model (default ALS with 64 factors) on all of ``data`` and keep its factors.

        ``intent_features``: a ``|``-separated item column (default ``genres``) whose labels users' intents are
        made of, when the data has it; otherwise the item factors' axes."""
        defaults = {"als": {"n_factors": 64, "progress": False}}.get(model, {})
        est = create_model(model, **{**defaults, "seed": seed, **params}).fit(data)
        if not hasattr(est, "user_factors_"):
            raise DataError(f"true preferences need a factor model (als, bpr, funksvd, ...), got {model!r}")
        feats = None
        if intent_features and data.item_data is not None and intent_features in data.item_data.columns:
            mat, _ = genre_matrix(data.item_data, intent_features)
            feats = mat.toarray() if mat.shape[1] else None
        return cls(est.user_factors_, est.item_factors_, popularity, intent, seed, feats)

    @property
    def n_items(self) -> int:
        """Catalogue size."""
        return len(self.item_factors)

    def z(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Standardised true preference of ``users[r]`` for every item of row ``items[r]`` (2-d)."""
        users = np.asarray(users)
        raw = np.einsum("rf,rsf->rs", self.user_factors[users], self.item_factors[items])
        out = (raw - self.mean[users, None]) / self.sd[users, None]
        if self.intent:
            raw = np.einsum("rf,rsf->rs", self.intent_vectors[users], self.item_directions[items])
            out = (1 - self.intent) * out + self.intent * (raw - self.intent_mean[users, None]) / self.intent_sd[users, None]
        return out

    def z_all(self, users: np.ndarray) -> np.ndarray:
        """Standardised true preferences of ``users`` for the whole catalogue (dense; for oracles and tests)."""
        users = np.asarray(users)
        out = (self.user_factors[users] @ self.item_factors.T - self.mean[users, None]) / self.sd[users, None]
        if self.intent:
            raw = self.intent_vectors[users] @ self.item_directions.T
            out = (1 - self.intent) * out + self.intent * (raw - self.intent_mean[users, None]) / self.intent_sd[users, None]
        return out
