"""Hybrids of collaborative and content models: slate mixing (notebook 000) and score blending tuned on validation.

Both reach items that never appeared in training (cold-start items) through their content member: an item with
side data has a content vector from the start, whatever its interaction count.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any, ClassVar

import numba as nb
import numpy as np

from recforge.core.params import Boolean, Choice, Constraint, Integer, ListOf, Real, Text, parameter_error
from recforge.core.topk import batch_rows, is_unscored
from recforge.core.validation import RankingValidator
from recforge.data.interactions import Interactions
from recforge.data.split import leave_one_out
from recforge.errors import DataError
from recforge.models.base import Recommender
from recforge.models.members import (
    MEMBER_PARAMS,
    EnsembleUpdates,
    build_member,
    members_state,
    restore_members,
)
from recforge.models.registry import get_model_class, register

log = logging.getLogger(__name__)

_UNRANKABLE_Z = -1e3  # far below any z-score a catalogue can produce


class _Ensemble(EnsembleUpdates, Recommender):
    """Shared plumbing of the hybrids: members built from names + params, shared maps, persistence, updates."""

    params: dict[str, dict[str, Any]] | None
    members_: list[Recommender]

    def _build(self, names: list[str], params: dict[str, dict[str, Any]] | None = None,
               stage: str | None = None) -> list[Recommender]:
        """Unfitted members ``names`` with ``params`` (default: the ensemble's ``params``) by member name, for the
        fit ``stage`` (see :func:`~recforge.models.members.build_member`)."""
        owner = f"{type(self).__name__}.params"
        params = self.params or {} if params is None else params
        unused = set(params) - set(names)
        if unused:
            raise parameter_error(self, "params", f"names models that are not members ({names})", sorted(unused))
        for name in names:
            if isinstance(self, get_model_class(name)):
                raise parameter_error(self, "models", "cannot contain the ensemble itself", name)
        return [build_member(name, params.get(name), self, owner, stage=stage) for name in names]

    def _state(self) -> dict[str, Any]:
        return members_state(self.members_)

    def _load_state(self, state: dict[str, Any]) -> None:
        self.members_ = restore_members(self, state)


@nb.njit(cache=True, parallel=True)
def _merge_orders(order_a: np.ndarray, len_a: np.ndarray, order_b: np.ndarray, len_b: np.ndarray,
                  quota_a: int, slate: int) -> np.ndarray:
    """Positions of every item in the mixed list of each row.

    Position ``p`` of a row is taken from list A when ``p % slate < quota_a``, else from list B: the next item of
    that list not yet placed (its first ``len`` entries are its rankable items). When one list runs out the other
    fills; items neither list ranks come last, by index.
    """
    n_rows, n = order_a.shape
    out = np.empty((n_rows, n), np.int64)
    for r in nb.prange(n_rows):
        placed = np.zeros(n, np.bool_)
        ia = 0
        ib = 0
        p = 0
        while True:
            while ia < len_a[r] and placed[order_a[r, ia]]:
                ia += 1
            while ib < len_b[r] and placed[order_b[r, ib]]:
                ib += 1
            has_a = ia < len_a[r]
            has_b = ib < len_b[r]
            if not has_a and not has_b:
                break
            take_a = has_a and (p % slate < quota_a or not has_b)
            item = order_a[r, ia] if take_a else order_b[r, ib]
            placed[item] = True
            out[r, item] = p
            p += 1
        for item in range(n):
            if not placed[item]:
                out[r, item] = p
                p += 1
    return out


def _order(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's items best first (ties by smaller index) and how many are rankable (finite)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order, np.isfinite(scores).sum(axis=1)


@register("slatemix")
class SlateMix(_Ensemble):
    """Notebook 000's slate: the top items of a collaborative model plus content neighbours, de-duplicated.

    Every slate of ``slate_size`` positions takes ``slate_size - n_content`` items from the collaborative model
    and ``n_content`` from the content model, each the next item of its ranking not already placed (when one
    ranking runs out the other fills); longer lists repeat the pattern, so top-10 with
    ``n_content=3`` (notebook 000's slate) is 2 + 3 + 2 + 3. The content ranking
    is by similarity to the user's most recent item (``anchor="last"``, as the notebook anchors on a clicked item)
    or to the whole recency-weighted history (``anchor="profile"``). Items the user has already seen never take a
    position before unseen ones (they rank last), which is what keeps the quotas exact after seen-item exclusion.

    ``collaborative`` / ``content``: registry names of the members; ``params``: their hyper-parameters by name.
    Scores are ``n_items - position`` in the mixed list. Defaults: EASE with one content item per slate of five
    — on the ML-100K leave-one-out validation event 1/5 scored NDCG@10 0.064, 2/5 0.056 and the notebook's 3/5
    0.048 (EASE alone 0.068): mixing buys exposure for content and cold items, not accuracy; for accuracy use
    :class:`ScoreBlend`.
    """

    param_constraints: ClassVar[dict[str, Constraint]] = {
        "collaborative": Text(),
        "content": Text(),
        "params": MEMBER_PARAMS,
        "slate_size": Integer(1),
        "n_content": Integer(0),
        "anchor": Choice("last", "profile"),
        "seed": Integer(0),
        "progress": Boolean(),
        "num_threads": Integer(0),
    }

    def __init__(
        self,
        collaborative: str = "ease",
        content: str = "content",
        params: dict[str, dict[str, Any]] | None = None,
        slate_size: int = 5,
        n_content: int = 1,
        anchor: str = "last",
        seed: int = 0,
        progress: bool = True,
        num_threads: int = 0,
    ) -> None:
        self.collaborative = collaborative
        self.content = content
        self.params = params
        self.slate_size = slate_size
        self.n_content = n_content
        self.anchor = anchor
        self.seed = seed
        self.progress = progress
        self.num_threads = num_threads

    def _fit(self, interactions: Interactions) -> None:
        if self.n_content > self.slate_size:
            raise parameter_error(self, "n_content", f"cannot exceed slate_size ({self.slate_size})", self.n_content)
        self.members_ = [m.fit(interactions) for m in self._build([self.collaborative, self.content])]
        if not hasattr(self.members_[1], "last_items_"):
            raise DataError(f"SlateMix.content must be a content model (item vectors and each user's last item), "
                            f"got {self.content!r}")

    def _content_scores(self, users: np.ndarray) -> np.ndarray:
        content = self.members_[1]
        if self.anchor == "profile":
            return content.score(users)
        last = content.last_items_[users]
        vectors = content.item_vectors_
        scores = np.where(last[:, None] >= 0, vectors[np.maximum(last, 0)] @ vectors.T, 0.0).astype(np.float32)
        return scores

    def _score(self, users: np.ndarray) -> np.ndarray:
        out = np.empty((len(users), self.n_items_), np.float32)
        step = batch_rows(self.n_items_, 16 * 2**20)
        for lo in range(0, len(users), step):
            block = users[lo : lo + step]
            seen = self.seen_[block].toarray() > 0
            cf, content = self.members_[0].score(block), self._content_scores(block)
            cf[seen] = -np.inf
            content[seen] = -np.inf
            positions = _merge_orders(*_order(cf), *_order(content), self.slate_size - self.n_content, self.slate_size)
            out[lo : lo + step] = self.n_items_ - positions
        return out


def _zscore_rows(scores: np.ndarray) -> np.ndarray:
    """Each row centred and scaled to unit variance, so members share one scale.

    Entries a member marks as unrankable (non-finite, or ``UNSCORED``: items it knows nothing about) are left out
    of the statistics and placed far below every regular entry.
    """
    scores = np.asarray(scores, dtype=np.float32)
    odd = is_unscored(scores)
    if odd.any():
        regular = np.where(odd, np.nan, scores).astype(np.float64)
        with np.errstate(all="ignore"):
            mean = np.nan_to_num(np.nanmean(regular, axis=1, keepdims=True))
            std = np.nan_to_num(np.nanstd(regular, axis=1, keepdims=True))
        z = np.divide(np.where(odd, 0.0, scores - mean), std, out=np.zeros(scores.shape), where=std > 0)
        z[odd] = _UNRANKABLE_Z
        return z.astype(np.float32)
    mean = scores.mean(axis=1, keepdims=True, dtype=np.float64)
    std = scores.std(axis=1, keepdims=True, dtype=np.float64)
    return np.divide(scores - mean, std, out=np.zeros(scores.shape), where=std > 0).astype(np.float32)


def simplex_grid(n: int, step: float) -> np.ndarray:
    """All weight vectors of ``n`` non-negative multiples of ``step`` summing to one."""
    parts = round(1.0 / step)
    rows = [c for c in itertools.product(range(parts + 1), repeat=n) if sum(c) == parts]
    return np.asarray(rows, dtype=np.float64) / parts


@register("scoreblend")
class ScoreBlend(_Ensemble):
    """A weighted sum of any models' per-user standardised scores, weights tuned on validation (NDCG@10).

    ``models``: registry names (default EASE + content); ``params``: their hyper-parameters by name;
    ``weights``: fixed weights (one per model) — when ``None`` they are searched on a simplex grid of
    ``weight_step``: with ``fit(train, valid=...)`` on the given validation events (members fitted on ``train``,
    the fitted model keeps them), otherwise on each user's last event held out from the data (members fitted on
    the rest), after which the members are refitted on all of it. Members that validate while they train
    (neural models) get the same validation events for early stopping, and what they chose (their epochs) is
    used when they are refitted. At most ``max_valid_users`` validation users (a seeded sample) are scored, by
    the same ranking kernel as the test metrics. Each member's score row is z-scored before mixing. Any
    registered model can be a member, rating models included (they rank by predicted rating).

    ``tuned_params_`` holds the chosen ``weights`` and the members' tuned ``params``: a ScoreBlend built with
    them and fitted without validation reproduces this one on more data.
    """

    supports_validation = True
    param_constraints: ClassVar[dict[str, Constraint]] = {
        "models": ListOf(Text(), min_len=1, optional=True),
        "params": MEMBER_PARAMS,
        "weights": ListOf(Real(0), min_len=1, optional=True),
        "weight_step": Real(0, 1.0, strict=True),
        "max_valid_users": Integer(1),
        "seed": Integer(0),
        "progress": Boolean(),
        "num_threads": Integer(0),
    }

    def __init__(
        self,
        models: list[str] | None = None,
        params: dict[str, dict[str, Any]] | None = None,
        weights: list[float] | None = None,
        weight_step: float = 0.1,
        max_valid_users: int = 2000,
        seed: int = 0,
        progress: bool = True,
        num_threads: int = 0,
    ) -> None:
        self.models = models
        self.params = params
        self.weights = weights
        self.weight_step = weight_step
        self.max_valid_users = max_valid_users
        self.seed = seed
        self.progress = progress
        self.num_threads = num_threads

    def _names(self) -> list[str]:
        return ["ease", "content"] if self.models is None else list(self.models)

    def _fit(self, interactions: Interactions, valid: Interactions | None = None) -> None:
        names = self._names()
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64)
            if w.shape != (len(names),) or w.sum() <= 0:
                raise parameter_error(self, "weights", f"must be {len(names)} non-negative numbers, not all 0",
                                      self.weights)
            self.weights_ = w / w.sum()
            self.valid_scores_: dict[str, float] = {}
            self.members_ = [m.fit(interactions) for m in self._build(names)]
            return
        if valid is not None and len(valid):
            tune_train, tune_valid = interactions, valid
        else:
            held = leave_one_out(interactions, valid=False, min_events=3)
            if len(held.test) == 0:
                raise DataError("ScoreBlend found no user with 3+ events to tune its weights on; pass weights=")
            tune_train, tune_valid = held.train, held.test
        self.members_ = [m.fit(tune_train, tune_valid) for m in self._build(names, stage="tune")]
        self._tune(tune_train, tune_valid)
        member_params = {name: {**(self.params or {}).get(name, {}), **m.tuned_params_}
                         for name, m in zip(names, self.members_)}
        member_params = {name: p for name, p in member_params.items() if p}
        self.tuned_params_ = {"weights": [float(w) for w in self.weights_], "params": member_params or None}
        if tune_train is not interactions:
            log.info("ScoreBlend: refitting %d members on all the data", len(names))
            self.members_ = [m.fit(interactions) for m in self._build(names, member_params, stage="refit")]

    def _tune(self, train: Interactions, valid: Interactions) -> None:
        validator = RankingValidator(valid.csr("ones"), train.csr("ones"), k=10, max_rows=self.max_valid_users,
                                     seed=self.seed)
        z = [_zscore_rows(m.score(validator.rows)) for m in self.members_]
        grid = simplex_grid(len(z), self.weight_step)
        results = []
        for w in grid:
            mixed = sum(np.float32(wi) * zi for wi, zi in zip(w, z) if wi)
            results.append(validator.of_scores(mixed)["ndcg@10"])
        best = int(np.argmax(results))  # first best: the grid lists heavier weights on later members last
        self.weights_ = grid[best]
        names = [m.name for m in self.members_]
        self.valid_scores_ = {name: float(results[int(np.flatnonzero(grid[:, i] == 1)[0])]) for i, name in enumerate(names)}
        self.valid_scores_["blend"] = float(results[best])
        log.info("ScoreBlend weights %s; validation NDCG@10 %s", dict(zip(names, self.weights_.round(3))),
                 {k: round(v, 4) for k, v in self.valid_scores_.items()})

    def _score(self, users: np.ndarray) -> np.ndarray:
        out = np.zeros((len(users), self.n_items_), np.float32)
        for w, member in zip(self.weights_, self.members_):
            if w:
                out += np.float32(w) * _zscore_rows(member.score(users))
        return out

    def _state(self) -> dict[str, Any]:
        return {"weights": np.asarray(self.weights_, np.float64), "valid_scores": json.dumps(self.valid_scores_),
                **super()._state()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.weights_ = np.asarray(state["weights"], dtype=np.float64)
        self.valid_scores_ = json.loads(state.get("valid_scores", "{}"))
        super()._load_state(state)

