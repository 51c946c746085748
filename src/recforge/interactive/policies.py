"""Slate policies for the interactive environment, vectorised over the users of a round.

Every policy is fitted on the visible interactions, then asked for one slate per user of a round (``act``) and
told what happened (``update``). Policies never show a user an item of their visible history or one already shown
in the episode. ``learns`` says whether ``update`` changes what the policy will do; ``snapshot``/``restore`` keep
and bring back its state (the harness restores the starting weights before every test episode).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recforge.core.slates import (
    EpsilonGreedy,
    Greedy,
    PositionSwaps,
    SlateDraw,
    SlateSampler,
    mixture_probabilities,
)
from recforge.core.topk import mask_and_topk
from recforge.core.vectors import normalize_rows
from recforge.data.interactions import Interactions
from recforge.errors import DataError, UnknownNameError, UnsupportedError
from recforge.features.items import genre_matrix
from recforge.models.base import Recommender
from recforge.models.registry import create_model, get_model_class

log = logging.getLogger(__name__)


class Policy:
    """Base class: exclusions (history + shown this episode), top-k from a score block, snapshots."""

    name: ClassVar[str] = ""
    learns: ClassVar[bool] = False
    #: Whether the probability of every slate the policy shows is known (it is deterministic, or its randomness is
    #: a :class:`~recforge.core.slates.SlateSampler`): what off-policy evaluation needs of a logging policy.
    known_probabilities: ClassVar[bool] = True
    #: Whether a user's scores never change after ``fit`` (no learning, no randomness): ``act`` then ranks each
    #: user's items once and picks the best not yet shown, instead of scoring the catalogue at every step.
    static_scores: ClassVar[bool] = False
    #: Candidates kept per user by static policies: enough for a session of ``_CANDIDATES / slate_size`` slates;
    #: a user who has been shown more is ranked again from the scores.
    _CANDIDATES: ClassVar[int] = 256

    def __init__(self, slate_size: int = 5, seed: int = 0) -> None:
        self.slate_size = slate_size
        self.seed = seed

    # ------------------------------------------------------------------ lifecycle
    def fit(self, visible: Interactions) -> Policy:
        """Prepare from the visible interactions (same id maps as the environment); returns ``self``."""
        self.visible_ = visible
        self.n_items_ = visible.n_items
        self.history_ = visible.csr("ones")
        self.rng_ = np.random.default_rng(self.seed)
        self.candidates_: dict[int, list[int]] = {}
        self._fit(visible)
        self.start_episode()
        return self

    def _fit(self, visible: Interactions) -> None:
        """Model-specific preparation."""

    def start_episode(self) -> None:
        """Forget what was shown in the previous episode (learned state stays)."""
        self.shown_: dict[int, list[int]] = {}
        self.clicked_: dict[int, list[int]] = {}

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the policy's state."""
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in ("visible_", "history_")})

    def restore(self, state: dict[str, Any]) -> None:
        """Bring back a state taken by :meth:`snapshot`."""
        self.__dict__.update(copy.deepcopy(state))

    # ------------------------------------------------------------------ acting
    def act(self, users: np.ndarray) -> np.ndarray:
        """One slate (``slate_size`` distinct item indices) per user."""
        users = np.asarray(users, dtype=np.int64)
        if self.static_scores:
            return self._static_top(users)
        scores = np.ascontiguousarray(self.scores(users), dtype=np.float32)
        return self._top(users, scores)

    def _static_top(self, users: np.ndarray) -> np.ndarray:
        """:meth:`_top` of a static policy from each user's ranked candidates (the same slates: candidates are in
        the top-k order, history excluded, and the best ones not shown this episode are taken)."""
        missing = np.array([u for u in dict.fromkeys(users.tolist()) if u not in self.candidates_], dtype=np.int64)
        if len(missing):
            history = self.history_[missing]
            top, _ = mask_and_topk(np.ascontiguousarray(self.scores(missing), dtype=np.float32), self._CANDIDATES,
                                   history.indptr, history.indices)
            for u, row in zip(missing.tolist(), top):
                self.candidates_[u] = row[row >= 0].tolist()
        out = np.empty((len(users), self.slate_size), np.int64)
        fallback = []
        k = self.slate_size
        for r, u in enumerate(users.tolist()):
            shown = set(self.shown_.get(u, ()))
            picks = []
            for item in self.candidates_[u]:  # best first: stop at the k-th not shown
                if item not in shown:
                    picks.append(item)
                    if len(picks) == k:
                        break
            if len(picks) == k:
                out[r] = picks
            else:  # a long session used up the candidates: rank the whole catalogue for this user
                fallback.append(r)
        if fallback:
            rows = np.array(fallback)
            out[rows] = self._top(users[rows], np.ascontiguousarray(self.scores(users[rows]), dtype=np.float32))
        return out

    def scores(self, users: np.ndarray) -> np.ndarray:
        """Dense scores (users × items); higher is shown first."""
        raise NotImplementedError

    # ------------------------------------------------------------------ probabilities (off-policy evaluation)
    def sampler(self) -> SlateSampler:
        """How the shown slate is drawn around :meth:`greedy_slates` (deterministic policies: it is that slate)."""
        return Greedy(self.slate_size)

    def greedy_slates(self, users: np.ndarray) -> np.ndarray:
        """The slates the policy's randomness is centred on (a deterministic policy's own choice)."""
        return self.act(users)

    def act_draw(self, users: np.ndarray) -> SlateDraw:
        """:meth:`act` with the probabilities of the slates shown (position, prefix, whole slate)."""
        users = np.asarray(users, dtype=np.int64)
        self._check_known()
        excl = self._exclusions(users)
        return self.sampler().draw(self.greedy_slates(users), self.rng_, self.n_items_, excl.indptr, excl.indices)

    def slate_probabilities(self, users: np.ndarray, slates: np.ndarray) -> SlateDraw:
        """The probabilities this policy, in its current state, gives to ``slates`` (one per user): what an
        off-policy estimate of it needs for each logged slate."""
        return self.replay_context(users, slates)[0]

    def replay_context(self, users: np.ndarray, slates: np.ndarray) -> tuple[SlateDraw, np.ndarray, np.ndarray]:
        """:meth:`slate_probabilities`, the slates its randomness is centred on (:meth:`greedy_slates`) and how many
        items each user may be shown, from one pass over the exclusions: what a replay asks in every logged
        context."""
        users = np.asarray(users, dtype=np.int64)
        self._check_known()
        excl = self._exclusions(users)
        greedy = self.greedy_slates(users)
        draw = self.sampler().probabilities_of(greedy, slates, self.n_items_, excl.indptr, excl.indices)
        return draw, greedy, self.n_items_ - np.diff(excl.indptr)

    @property
    def deterministic(self) -> bool:
        """Whether the policy shows one known slate per context: what can be explored around, mixed, frozen or
        scored by a direct method."""
        return self.known_probabilities and isinstance(self.sampler(), Greedy)

    def _check_known(self) -> None:
        if not self.known_probabilities:
            raise UnsupportedError(f"policy {self.name!r} draws slates with probabilities it does not know; wrap it "
                                   "in an exploring policy (ExploringPolicy, recforge simulate --explore) to log it")

    def _exclusions(self, users: np.ndarray) -> sp.csr_matrix:
        rows, cols = [], []
        for r, u in enumerate(users):
            shown = self.shown_.get(int(u))
            if shown:
                rows.extend([r] * len(shown))
                cols.extend(shown)
        shown = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(users), self.n_items_))
        out = (shown + self.history_[users]).tocsr()
        out.sort_indices()
        return out

    def _top(self, users: np.ndarray, scores: np.ndarray) -> np.ndarray:
        excl = self._exclusions(users)
        top, _ = mask_and_topk(scores, self.slate_size, excl.indptr, excl.indices)
        missing = top < 0
        if missing.any():  # a user who has seen nearly everything: fill with any unseen-in-slate items
            for r in np.flatnonzero(missing.any(axis=1)):
                pool = np.setdiff1d(np.arange(self.n_items_), top[r][top[r] >= 0])
                top[r][top[r] < 0] = self.rng_.choice(pool, int((top[r] < 0).sum()), replace=False)
        return top.astype(np.int64)

    # ------------------------------------------------------------------ feedback
    def update(self, users: np.ndarray, slates: np.ndarray, clicked: np.ndarray) -> None:
        """Record what was shown and clicked; learning policies also learn from it."""
        self.record(users, slates, clicked)
        if self.learns:
            self._learn(np.asarray(users), np.asarray(slates), np.asarray(clicked))

    def record(self, users: np.ndarray, slates: np.ndarray, clicked: np.ndarray) -> None:
        """Note what this episode showed and what was clicked (never shown again; a sequential policy's history),
        without learning."""
        for u, slate, c in zip(users, slates, clicked):
            self.shown_.setdefault(int(u), []).extend(int(i) for i in slate)
            if c >= 0:
                self.clicked_.setdefault(int(u), []).append(int(c))

    def _learn(self, users: np.ndarray, slates: np.ndarray, clicked: np.ndarray) -> None:
        """Learn from one round of feedback (learning policies)."""


POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available by its ``name``."""
    POLICIES[cls.name] = cls
    return cls


def policy_class(name: str, params: Iterable[str] = ()) -> type[Policy]:
    """The policy class registered as ``name``, checked to take every parameter in ``params``; unknown names and
    parameters raise a clear error (before any work starts, when called up front)."""
    key = name.strip().lower()
    if key not in POLICIES:
        raise UnknownNameError(f"unknown policy {name!r}; available policies: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[key]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [p for p in params if p not in valid]
    if unknown:
        raise DataError(f"policy {key!r} has no parameter(s) {unknown}; valid parameters: {valid}")
    return cls


def create_policy(name: str, **params: Any) -> Policy:
    """A policy by name (see :data:`POLICIES`); unknown names and parameters raise a clear error."""
    return policy_class(name, params)(**params)


@register_policy
class RandomPolicy(Policy):
    """Uniformly random unseen items."""

    name = "random"

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.rng_.random((len(users), self.n_items_), dtype=np.float32)

    def sampler(self) -> SlateSampler:
        return EpsilonGreedy(self.slate_size, 1.0)  # every ordered slate of allowed items equally likely


@register_policy
class PopularPolicy(Policy):
    """The most popular items of the visible history (static)."""

    name = "pop"
    static_scores = True

    def _fit(self, visible: Interactions) -> None:
        self.popularity_ = np.bincount(visible.items, minlength=visible.n_items).astype(np.float32)

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.popularity_, (len(users), self.n_items_)).copy()


class _ModelPolicy(Policy):
    """A recforge model fitted on the visible history; with ``learn`` it folds every round's clicks in. ``model``
    is a registered name, or a model already fitted on data with the visible data's id maps (used as it is)."""

    def __init__(self, model: str | Recommender = "als", params: dict[str, Any] | None = None, learn: bool = True,
                 click_weight: float = 1.0, slate_size: int = 5, seed: int = 0) -> None:
        super().__init__(slate_size, seed)
        self.model = model
        self.params = params
        self.learn = learn
        self.click_weight = click_weight

    @property
    def learns(self) -> bool:  # type: ignore[override]
        return bool(self.learn)

    @property
    def static_scores(self) -> bool:  # type: ignore[override]
        return not self.learn

    def _fit(self, visible: Interactions) -> None:
        if isinstance(self.model, Recommender):
            fitted = getattr(self.model, "item_map_", None)
            if fitted is None or fitted != visible.item_map or self.model.user_map_ != visible.user_map:
                raise DataError(f"policy {self.name!r}: the given model must be fitted on data with the visible "
                                "data's user and item id maps")
            self.model_: Recommender = self.model
        else:
            params = dict(self.params or {})
            if "progress" in get_model_class(self.model)._param_names():
                params.setdefault("progress", False)
            self.model_ = create_model(self.model, **params).fit(visible)
        if self.learn and not self.model_.supports_partial_fit:
            raise DataError(f"policy {self.name!r} with learn=True needs a model with partial_fit; {self.model!r} has none")

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.model_.score(users)

    def _learn(self, users: np.ndarray, slates: np.ndarray, clicked: np.ndarray) -> None:
        hit = clicked >= 0
        if not hit.any():
            return
        m = self.model_
        events = pd.DataFrame({"user_id": m.user_map_.to_ids(users[hit]), "item_id": m.item_map_.to_ids(clicked[hit]),
                               "weight": np.float32(self.click_weight)})
        m.partial_fit(events)


@register_policy
class GreedyPolicy(_ModelPolicy):
    """The top items of any recforge model; ``learn=True`` updates it incrementally with every click
    (``partial_fit``: ALS folds the user back in), ``learn=False`` keeps it static."""

    name = "greedy"


@register_policy
class EpsilonGreedyPolicy(_ModelPolicy):
    """Greedy, except that each slot shows a random unseen item with probability ``epsilon`` (exploration)."""

    name = "egreedy"
    known_probabilities = False  # each slot explores on its own; ExploringPolicy gives slates known probabilities

    def __init__(self, model: str = "als", params: dict[str, Any] | None = None, learn: bool = True,
                 click_weight: float = 1.0, epsilon: float = 0.1, slate_size: int = 5, seed: int = 0) -> None:
        super().__init__(model, params, learn, click_weight, slate_size, seed)
        self.epsilon = epsilon

    def act(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        slates = super().act(users)
        explore = self.rng_.random(slates.shape) < self.epsilon
        if explore.any():
            noise = self.rng_.random((len(users), self.n_items_), dtype=np.float32)
            excl = self._exclusions(users)
            rand, _ = mask_and_topk(noise, 2 * self.slate_size, excl.indptr, excl.indices)
            for r in np.flatnonzero(explore.any(axis=1)):
                fresh = [i for i in rand[r] if i >= 0 and i not in slates[r]]
                for pos in np.flatnonzero(explore[r]):
                    if fresh:
                        slates[r, pos] = fresh.pop()
        return slates


@register_policy
class NotebookHybridPolicy(_ModelPolicy):
    """Notebook 000's agent: the top ``n_collaborative`` items of a factor model plus the content neighbours of a
    random item the user clicked (visible history included), de-duplicated and filled from the model's top 10."""

    name = "hybrid"
    known_probabilities = False  # random anchors and fills

    def __init__(self, model: str = "als", params: dict[str, Any] | None = None, learn: bool = True,
                 click_weight: float = 1.0, n_collaborative: int = 2, content: dict[str, Any] | None = None,
                 slate_size: int = 5, seed: int = 0) -> None:
        super().__init__(model, params, learn, click_weight, slate_size, seed)
        self.n_collaborative = n_collaborative
        self.content = content

    def _fit(self, visible: Interactions) -> None:
        super()._fit(visible)
        self.content_ = create_model("content", **(self.content or {})).fit(visible)

    def act(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        cf_scores = np.ascontiguousarray(self.model_.score(users), dtype=np.float32)
        excl = self._exclusions(users)
        cf_top, _ = mask_and_topk(cf_scores, 10 + self.slate_size, excl.indptr, excl.indices)
        neighbors = self.content_.neighbors_
        out = np.empty((len(users), self.slate_size), np.int64)
        for r, u in enumerate(users):
            banned = set(excl.indices[excl.indptr[r] : excl.indptr[r + 1]].tolist())
            slate = [int(i) for i in cf_top[r, : self.n_collaborative]]
            clicked = self.clicked_.get(int(u), []) + self.history_[u].indices.tolist()
            if clicked:
                anchor = clicked[self.rng_.integers(len(clicked))]
                for i in neighbors[anchor]:
                    if len(slate) >= self.slate_size:
                        break
                    if i >= 0 and int(i) not in banned and int(i) not in slate:
                        slate.append(int(i))
            fill = [int(i) for i in cf_top[r] if i >= 0 and int(i) not in slate]
            while len(slate) < self.slate_size and fill:
                slate.append(fill.pop(self.rng_.integers(min(10, len(fill)))))
            if len(slate) < self.slate_size:  # nearly everything seen: any other items
                pool = np.setdiff1d(np.arange(self.n_items_), slate)
                slate += self.rng_.choice(pool, self.slate_size - len(slate), replace=False).tolist()
            out[r] = slate
        return out


class _LinearBandit(Policy):
    """Bayesian linear reward model per user over item vectors: the item factors of a model fitted on the visible
    history, plus the item's normalised ``genre_column`` labels × ``genre_scale`` when the data has them. Prior
    mean = the user's factor vector (genre weights 0), precision ``prior`` · I; every shown item is an
    observation (reward 1 if clicked, else 0), a click weighing ``click_weight`` misses.

    Defaults (prior 3; LinUCB alpha 0.1; Thompson noise 0.05; genre scale 1) were picked on the ml-latest-small
    environment (two test episodes); without genre features the bandits only matched the static greedy policy
    (0.40 vs 0.37 click-through), with them they reach 0.59. ML-100K is the unseen check
    (``benchmarks/bench_interactive.py``)."""

    learns = True

    def __init__(self, model: str = "als", params: dict[str, Any] | None = None, prior: float = 3.0,
                 click_weight: float = 1.0, candidates: int = 200, genre_column: str | None = "genres",
                 genre_scale: float = 1.0, slate_size: int = 5, seed: int = 0) -> None:
        super().__init__(slate_size, seed)
        self.model = model
        self.params = params
        self.prior = prior
        self.click_weight = click_weight
        self.candidates = candidates
        self.genre_column = genre_column
        self.genre_scale = genre_scale

    def _fit(self, visible: Interactions) -> None:
        params = {"progress": False, **(self.params or {})}
        est = create_model(self.model, **params).fit(visible)
        if not hasattr(est, "item_factors_"):
            raise DataError(f"policy {self.name!r} needs a factor model for item vectors, got {self.model!r}")
        factors = np.asarray(est.item_factors_, dtype=np.float64)
        prior_mean = np.asarray(est.user_factors_, dtype=np.float64)
        data = visible.item_data
        if self.genre_column and data is not None and self.genre_column in data.columns:
            # Genre features (prior weight 0) let a user's clicks reveal tastes the factors do not hold.
            genres = self.genre_scale * normalize_rows(genre_matrix(data, self.genre_column)[0].toarray())
            factors = np.hstack([factors, genres])
            prior_mean = np.hstack([prior_mean, np.zeros((len(prior_mean), genres.shape[1]))])
        self.items_ = np.ascontiguousarray(factors, dtype=np.float32)
        d = self.items_.shape[1]
        # The posterior covariance A⁻¹ itself is kept and updated by Sherman–Morrison (O(d²) per observation),
        # so acting never inverts a matrix.
        self.cov_ = np.broadcast_to(np.eye(d, dtype=np.float32) / self.prior, (visible.n_users, d, d)).copy()
        self.b_ = (self.prior * prior_mean).astype(np.float32)

    def _posterior(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cov = self.cov_[users]
        return np.matmul(cov, self.b_[users][:, :, None])[:, :, 0], cov

    def _learn(self, users: np.ndarray, slates: np.ndarray, clicked: np.ndarray) -> None:
        # Users are distinct within a round, so fancy-indexed updates do not collide.
        reward = (slates == clicked[:, None]).astype(np.float32)
        weight = np.where(reward > 0, self.click_weight, 1.0).astype(np.float32)
        cov = self.cov_[users]
        for slot in range(slates.shape[1]):
            x = self.items_[slates[:, slot]]  # (n, d)
            cx = np.matmul(cov, x[:, :, None])[:, :, 0]
            denom = 1.0 + weight[:, slot] * np.einsum("nd,nd->n", x, cx)
            cov -= (weight[:, slot] / denom)[:, None, None] * cx[:, :, None] * cx[:, None, :]
        self.cov_[users] = cov
        self.b_[users] += np.einsum("ns,nsd->nd", weight * reward, self.items_[slates])


@register_policy
class LinUCBPolicy(_LinearBandit):
    """LinUCB: posterior mean plus ``alpha`` times the posterior sd of each item's reward (optimism), computed on
    the ``candidates`` items with the best mean (the bonus for the whole catalogue would cost d² per item)."""

    name = "linucb"

    def __init__(self, model: str = "als", params: dict[str, Any] | None = None, alpha: float = 0.1,
                 prior: float = 3.0, click_weight: float = 1.0, candidates: int = 200,
                 genre_column: str | None = "genres", genre_scale: float = 1.0, slate_size: int = 5,
                 seed: int = 0) -> None:
        super().__init__(model, params, prior, click_weight, candidates, genre_column, genre_scale, slate_size, seed)
        self.alpha = alpha

    def scores(self, users: np.ndarray) -> np.ndarray:
        theta, cov = self._posterior(users)
        mean = (theta @ self.items_.T).astype(np.float32)
        excl = self._exclusions(users)
        cand, _ = mask_and_topk(mean.copy(), min(self.candidates, self.n_items_), excl.indptr, excl.indices)
        x = self.items_[np.maximum(cand, 0)]  # (n, C, d)
        bonus = np.sqrt(np.maximum(((x @ cov) * x).sum(axis=2), 0.0))  # batched BLAS, not einsum
        out = np.full_like(mean, -np.inf)
        rows = np.arange(len(users))[:, None]
        out[rows, np.maximum(cand, 0)] = np.where(cand >= 0, mean[rows, np.maximum(cand, 0)] + self.alpha * bonus, -np.inf)
        return out


@register_policy
class ThompsonPolicy(_LinearBandit):
    """Thompson sampling: rank by one draw of each user's reward vector from its posterior (scale ``noise``)."""

    name = "thompson"
    known_probabilities = False  # a posterior draw per slate

    def __init__(self, model: str = "als", params: dict[str, Any] | None = None, noise: float = 0.05,
                 prior: float = 3.0, click_weight: float = 1.0, genre_column: str | None = "genres",
                 genre_scale: float = 1.0, slate_size: int = 5, seed: int = 0) -> None:
        super().__init__(model, params, prior, click_weight, 0, genre_column, genre_scale, slate_size, seed)
        self.noise = noise

    def scores(self, users: np.ndarray) -> np.ndarray:
        theta, cov = self._posterior(users)
        chol = np.linalg.cholesky(cov + 1e-9 * np.eye(cov.shape[-1]))
        draw = theta + self.noise * np.einsum("nij,nj->ni", chol, self.rng_.standard_normal(theta.shape))
        return (draw @ self.items_.T).astype(np.float32)


@register_policy
class SequentialPolicy(Policy):
    """A sequential model (SASRec, GRU4Rec, ...) scoring each user's growing history: the visible events plus
    this episode's clicks. Its weights stay fixed; what it learns online is the history it conditions on."""

    name = "sequential"
    learns = True

    def __init__(self, model: str = "sasrec", params: dict[str, Any] | None = None, slate_size: int = 5,
                 seed: int = 0) -> None:
        super().__init__(slate_size, seed)
        self.model = model
        self.params = params

    def _fit(self, visible: Interactions) -> None:
        params = {"progress": False, "seed": self.seed, **(self.params or {})}
        self.model_: Recommender = create_model(self.model, **params).fit(visible)
        seqs = visible.sequences()
        self.base_history_ = [seqs.items[seqs.offsets[u] : seqs.offsets[u + 1]] for u in range(visible.n_users)]

    def scores(self, users: np.ndarray) -> np.ndarray:
        hist = [np.concatenate([self.base_history_[u], np.asarray(self.clicked_.get(int(u), []), np.int64)])
                for u in users]
        return self.model_.score_histories(hist)


@register_policy
class OraclePolicy(Policy):
    """Knows the hidden preferences (an upper reference, not a real policy): the items of highest true utility."""

    name = "oracle"
    static_scores = True

    def __init__(self, truth: Any = None, slate_size: int = 5, seed: int = 0) -> None:
        super().__init__(slate_size, seed)
        self.truth = truth

    def _fit(self, visible: Interactions) -> None:
        if self.truth is None:
            raise DataError("the oracle policy needs the environments' true preferences: truth=envs.truth")

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.truth.z_all(users)



class ExploringPolicy(Policy):
    """Any policy made stochastic with known probabilities: its own slate, rearranged or replaced by ``sampler``
    (:class:`~recforge.core.slates.EpsilonGreedy`, :class:`~recforge.core.slates.PositionSwaps`), so every
    logged slate carries the probabilities off-policy evaluation needs. Fitting, feedback and learning are the
    wrapped policy's (it sees the slates actually shown)."""

    def __init__(self, policy: Policy, sampler: SlateSampler) -> None:
        if sampler.k != policy.slate_size:
            raise DataError(f"the sampler draws slates of {sampler.k} items, the policy shows {policy.slate_size}")
        if not policy.deterministic:
            raise UnsupportedError(f"policy {policy.name!r} is not deterministic; explore around a deterministic "
                                   "policy (greedy, greedy-static, pop, linucb, sequential, oracle)")
        super().__init__(policy.slate_size, policy.seed)
        self.policy = policy
        self._sampler = sampler

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.policy.name}+{explore_spec(self._sampler)}"

    @property
    def learns(self) -> bool:  # type: ignore[override]
        return self.policy.learns

    def _fit(self, visible: Interactions) -> None:
        self.policy.fit(visible)

    def start_episode(self) -> None:
        super().start_episode()
        if hasattr(self, "policy"):
            self.policy.start_episode()

    def snapshot(self) -> dict[str, Any]:
        return {"policy": self.policy.snapshot(), "rng_": copy.deepcopy(self.rng_)}

    def restore(self, state: dict[str, Any]) -> None:
        self.policy.restore(state["policy"])
        self.rng_ = copy.deepcopy(state["rng_"])

    def sampler(self) -> SlateSampler:
        return self._sampler

    def greedy_slates(self, users: np.ndarray) -> np.ndarray:
        return self.policy.act(users)

    def _exclusions(self, users: np.ndarray) -> sp.csr_matrix:
        return self.policy._exclusions(users)

    def act(self, users: np.ndarray) -> np.ndarray:
        return self.act_draw(users).slates

    def update(self, users: np.ndarray, slates: np.ndarray, clicked: np.ndarray) -> None:
        self.policy.update(users, slates, clicked)


class FrozenPolicy(Policy):
    """A learning policy stopped in its current state (LinUCB after its training episodes): each user's items are
    ranked once, by the wrapped policy's scores as they stand (its posterior, weights or model, the visible history
    only), and every slate takes the best not yet shown this episode — a static target that off-policy evaluation
    can replay over a log. Fitting fits the wrapped policy only if it is not fitted on the same data. A frozen
    sequential policy no longer conditions on this episode's clicks either."""

    learns = False
    static_scores = True

    def __init__(self, policy: Policy) -> None:
        if not policy.deterministic:
            raise UnsupportedError(f"policy {policy.name!r} is not deterministic; only a deterministic policy can be "
                                   "frozen into a static target")
        super().__init__(policy.slate_size, policy.seed)
        self.policy = policy

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.policy.name}-frozen"

    def _fit(self, visible: Interactions) -> None:
        if getattr(self.policy, "visible_", None) is not visible:
            self.policy.fit(visible)
        self.policy.start_episode()  # its scores: the state it was frozen in, nothing shown

    def snapshot(self) -> dict[str, Any]:
        return {"policy": self.policy.snapshot(), "candidates_": copy.deepcopy(self.candidates_)}

    def restore(self, state: dict[str, Any]) -> None:
        self.policy.restore(state["policy"])
        self.candidates_ = copy.deepcopy(state["candidates_"])

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.policy.scores(users)


class MixturePolicy(Policy):
    """To each user of a round, the slate of one of ``policies`` drawn with probabilities ``weights`` — as an A/B
    test runs several policies at once. A log of it supports every component as a target (each of its slates has
    probability at least the component's weight), which uniform exploration over a large catalogue cannot. The
    components must be deterministic; all are fitted on the visible data and told every round's feedback."""

    def __init__(self, policies: Sequence[Policy], weights: Sequence[float]) -> None:
        policies = list(policies)
        w = np.asarray(weights, dtype=np.float64)
        if not policies or w.shape != (len(policies),):
            raise DataError(f"a mixture needs one weight per policy: {len(policies)} policies, weights {list(weights)}")
        if not np.isfinite(w).all() or (w < 0).any() or not np.isclose(w.sum(), 1.0):
            raise DataError(f"mixture weights must be non-negative and sum to 1, got {list(weights)}")
        for policy in policies:
            if not policy.deterministic:
                raise UnsupportedError(f"policy {policy.name!r} is not deterministic; a mixture needs deterministic "
                                       "components (greedy, greedy-static, pop, linucb, sequential, oracle)")
        if len({p.slate_size for p in policies}) > 1:
            raise DataError("every policy of a mixture must show slates of the same size")
        super().__init__(policies[0].slate_size, policies[0].seed)
        self.policies, self.weights = policies, w / w.sum()

    @property
    def name(self) -> str:  # type: ignore[override]
        return "mix(" + ",".join(f"{p.name}={w:g}" for p, w in zip(self.policies, self.weights)) + ")"

    @property
    def learns(self) -> bool:  # type: ignore[override]
        return any(p.learns for p in self.policies)

    def _fit(self, visible: Interactions) -> None:
        for policy in self.policies:
            policy.fit(visible)

    def start_episode(self) -> None:
        super().start_episode()
        for policy in getattr(self, "policies", ()):
            policy.start_episode()

    def snapshot(self) -> dict[str, Any]:
        return {"policies": [p.snapshot() for p in self.policies], "rng_": copy.deepcopy(self.rng_)}

    def restore(self, state: dict[str, Any]) -> None:
        for policy, part in zip(self.policies, state["policies"]):
            policy.restore(part)
        self.rng_ = copy.deepcopy(state["rng_"])

    def _options(self, users: np.ndarray) -> np.ndarray:
        return np.stack([p.act(users) for p in self.policies], axis=1)  # users × components × slate

    def act_draw(self, users: np.ndarray) -> SlateDraw:
        options = self._options(np.asarray(users, dtype=np.int64))
        pick = self.rng_.choice(len(self.weights), size=len(options), p=self.weights)
        return mixture_probabilities(options, self.weights, options[np.arange(len(options)), pick])

    def replay_context(self, users: np.ndarray, slates: np.ndarray) -> tuple[SlateDraw, np.ndarray, np.ndarray]:
        """As for any policy; the centre slates are the first component's."""
        users = np.asarray(users, dtype=np.int64)
        options = self._options(users)
        slates = np.asarray(slates, dtype=np.int64)
        if slates.shape != options[:, 0].shape:
            raise DataError(f"slates must have shape {options[:, 0].shape}, got {slates.shape}")
        allowed = self.n_items_ - np.diff(self._exclusions(users).indptr)
        return mixture_probabilities(options, self.weights, slates), options[:, 0], allowed

    def act(self, users: np.ndarray) -> np.ndarray:
        return self.act_draw(users).slates

    def update(self, users: np.ndarray, slates: np.ndarray, clicked: np.ndarray) -> None:
        for policy in self.policies:
            policy.update(users, slates, clicked)


def parse_explore(spec: str, slate_size: int) -> SlateSampler | None:
    """``"none"``, ``"epsilon:E"`` (:class:`~recforge.core.slates.EpsilonGreedy`) or ``"swap:S"``
    (:class:`~recforge.core.slates.PositionSwaps`) as a sampler (None for ``"none"``)."""
    kind, _, value = str(spec).strip().lower().partition(":")
    if kind == "none" and not value:
        return None
    if kind not in ("epsilon", "swap"):
        raise DataError(f"exploration must be 'none', 'epsilon:E' or 'swap:S' (e.g. epsilon:0.2), got {spec!r}")
    try:
        rate = float(value)
    except ValueError:
        raise DataError(f"exploration {spec!r}: {kind} needs a rate, as in {kind}:0.2") from None
    return EpsilonGreedy(slate_size, rate) if kind == "epsilon" else PositionSwaps(slate_size, rate)


def explore_spec(sampler: SlateSampler) -> str:
    """The ``parse_explore`` spelling of a sampler."""
    if isinstance(sampler, EpsilonGreedy):
        return f"epsilon:{sampler.epsilon:g}"
    if isinstance(sampler, PositionSwaps):
        return f"swap:{sampler.swap:g}"
    return "none"
