"""Shared machinery of latent-factor models: scoring by dot products, biases, persistence and growth.

A factor model sets ``user_factors_`` (n_users × k) and ``item_factors_`` (n_items × k), float32, and optionally
``user_bias_``, ``item_bias_`` (float32 vectors) and ``global_bias_`` (float). Scores are
``global + b_u + b_i + p_u · q_i``; rating models clamp predictions to the training rating range.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from recforge.data.interactions import Interactions
from recforge.errors import ArtifactError
from recforge.models.base import RatingPredictor, Recommender, ScoringVectors
from recforge.retrieval import similar_by_vectors

_OPTIONAL = ("user_bias", "item_bias")

#: The standard deviation of the ratings the rating models' defaults were tuned on (ML-100K ``u1.base``).
TUNED_SPREAD = 1.119


class FactorModel(Recommender):
    """Base class of models that score with ``user_factors_ @ item_factors_.T`` plus optional biases."""

    state_shapes: ClassVar[dict[str, tuple[Any, ...]]] = {
        "user_factors": ("users", "factors"), "item_factors": ("items", "factors"),
        "user_bias": ("users",), "item_bias": ("items",),
    }

    user_bias_: np.ndarray | None = None
    item_bias_: np.ndarray | None = None
    global_bias_: float = 0.0
    #: Standard deviation of the random factors given to users/items added by ``partial_fit``.
    init_std_new: float = 0.01

    def _score(self, users: np.ndarray) -> np.ndarray:
        scores = self.user_factors_[users] @ self.item_factors_.T
        if self.item_bias_ is not None:
            scores += self.item_bias_[None, :]
        if self.user_bias_ is not None:
            scores += self.user_bias_[users][:, None]
        if self.global_bias_:
            scores += np.float32(self.global_bias_)
        return scores

    def scoring_vectors(self) -> ScoringVectors:
        """The factors and biases :meth:`score` adds up."""
        self._check_fitted()
        return ScoringVectors(self.user_factors_, self.item_factors_, self.user_bias_, self.item_bias_,
                              float(self.global_bias_))

    def _similar_indices(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return similar_by_vectors(self.item_factors_, items, k)

    def retrieval_vectors(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """User factors against item factors, the item bias as one more dimension (the user's own bias and the
        global bias do not change a user's ranking)."""
        self._check_fitted()
        queries, items = self.user_factors_[users], self.item_factors_
        if self.item_bias_ is not None:
            queries = np.hstack([queries, np.ones((len(queries), 1), np.float32)])
            items = np.hstack([items, self.item_bias_[:, None]])
        return np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(items, np.float32)

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "user_factors": self.user_factors_,
            "item_factors": self.item_factors_,
            "global_bias": float(self.global_bias_),
        }
        for name in _OPTIONAL:
            value = getattr(self, f"{name}_", None)
            if value is not None:
                state[name] = value
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        self.user_factors_ = state["user_factors"]
        self.item_factors_ = state["item_factors"]
        self.global_bias_ = float(state.get("global_bias", 0.0))
        for name in _OPTIONAL:
            setattr(self, f"{name}_", state.get(name))

    def _grow(self, n_new_users: int, n_new_items: int) -> None:
        """New users/items get small random factors (so SGD can move them) and zero biases."""
        rng = np.random.default_rng([int(getattr(self, "seed", 0)), self.user_factors_.shape[0], self.item_factors_.shape[0]])
        k = self.user_factors_.shape[1]

        def grow(mat: np.ndarray, n: int) -> np.ndarray:
            extra = (rng.standard_normal((n, k)) * self.init_std_new).astype(np.float32)
            return np.ascontiguousarray(np.vstack([mat, extra]))

        if n_new_users:
            self.user_factors_ = grow(self.user_factors_, n_new_users)
            if self.user_bias_ is not None:
                self.user_bias_ = np.concatenate([self.user_bias_, np.zeros(n_new_users, np.float32)])
        if n_new_items:
            self.item_factors_ = grow(self.item_factors_, n_new_items)
            if self.item_bias_ is not None:
                self.item_bias_ = np.concatenate([self.item_bias_, np.zeros(n_new_items, np.float32)])


class FactorRatingModel(FactorModel, RatingPredictor):
    """A factor model that predicts ratings: ``global + b_u + b_i + p_u · q_i``, clamped to the rating range.

    ``rating_scale_`` (``s``) is the training ratings' standard deviation over :data:`TUNED_SPREAD`, the spread the
    defaults were tuned on: subclasses use it so that ``lr``, ``reg`` and ``init_std`` mean the same on any rating
    scale (−10…10 jokes, 1–10 books), and a model fitted on ``a·r + b`` predicts ``a·`` its predictions ``+ b``.
    """

    #: ``s``; 1 for artifacts saved before ratings were scaled.
    rating_scale_: float = 1.0

    def _fit_rating_range(self, interactions: Interactions) -> None:
        """The clamping range and ``s`` from the training ratings."""
        assert interactions.ratings is not None
        self.rating_min_ = float(interactions.ratings.min())
        self.rating_max_ = float(interactions.ratings.max())
        spread = float(interactions.ratings.astype(np.float64).std())
        self.rating_scale_ = spread / TUNED_SPREAD if spread > 1e-12 else 1.0

    def predict_indices(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Clamped predictions; an unknown user or item (index ``-1``) contributes no factor and no bias."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        ku, ki = users >= 0, items >= 0
        both = ku & ki
        pred = np.full(len(users), self.global_bias_, dtype=np.float64)
        pred[both] += np.einsum("ij,ij->i", self.user_factors_[users[both]], self.item_factors_[items[both]])
        if self.user_bias_ is not None:
            pred[ku] += self.user_bias_[users[ku]]
        if self.item_bias_ is not None:
            pred[ki] += self.item_bias_[items[ki]]
        return np.clip(pred, self.rating_min_, self.rating_max_).astype(np.float32)

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "rating_min": self.rating_min_, "rating_max": self.rating_max_,
                "rating_scale": float(self.rating_scale_)}

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.rating_min_ = float(state["rating_min"])
        self.rating_max_ = float(state["rating_max"])
        scale = float(state.get("rating_scale", 1.0))
        if not np.isfinite(scale) or scale <= 0:
            raise ArtifactError(f"rating_scale must be a positive number, got {scale}")
        self.rating_scale_ = scale
