"""Evaluate fitted models: full-catalogue top-N metrics with seen-item exclusion, and rating errors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recforge.core import metrics as M
from recforge.core.accelerator import device_for_rows
from recforge.core.params import check_k
from recforge.core.ranking import rank_rows
from recforge.data.interactions import Interactions, gather_ranges
from recforge.data.split import NextEventSamples
from recforge.errors import DataError, EmptyDatasetError
from recforge.models.base import RatingPredictor, Recommender

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """Metrics of one model on one test set.

    ``per_user`` holds one row per evaluated user (or sample) and one column per per-user metric;
    ``summary`` the means plus whole-model figures (coverage, rmse, mae, counts). ``squared_errors`` and
    ``abs_errors`` keep per-row rating errors for confidence intervals.
    """

    model: str
    per_user: pd.DataFrame
    summary: dict[str, float]
    squared_errors: np.ndarray | None = None
    abs_errors: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, metric: str) -> float:
        return self.summary[metric]


def check_ks(k: int | Sequence[int]) -> list[int]:
    """The sorted distinct list lengths of ``k`` (one or several positive integers)."""
    ks = [k] if isinstance(k, (int, np.integer)) else list(k)
    if not ks:
        raise DataError("give at least one k")
    return sorted({check_k(x) for x in ks})


def check_same_maps(model: Recommender, test: Interactions) -> None:
    """The test data must share the fitted model's id maps (indices are compared, not ids)."""
    if test.item_map is not model.item_map_ and test.item_map != model.item_map_:
        raise DataError("the test data and the model use different item id maps; split one Interactions object")
    if test.user_map is not model.user_map_ and test.user_map != model.user_map_:
        raise DataError("the test data and the model use different user id maps; split one Interactions object")


def evaluate(
    model: Recommender,
    test: Interactions,
    k: int | Sequence[int] = 10,
    exclude_seen: bool = True,
    exclude: Interactions | sp.csr_matrix | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    name: str | None = None,
) -> EvaluationResult:
    """Evaluate a fitted model against ``test`` (which must share the model's id maps).

    Every item of the catalogue is ranked for every user with test interactions; with ``exclude_seen`` the
    model's training items (or ``exclude``, when given) are removed first. Ties are broken by the smaller item
    index. Rating models also get RMSE and MAE over the test rows (when the test data has ratings).
    """
    ks = check_ks(k)
    model._check_fitted()
    if len(test) == 0:
        raise EmptyDatasetError("the test set is empty")
    check_same_maps(model, test)
    truth = test.csr("ones")
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    if exclude is not None:
        excl: sp.csr_matrix | None = exclude.csr("ones") if isinstance(exclude, Interactions) else exclude.tocsr()
    else:
        excl = model.seen_ if exclude_seen else None
    device = device_for_rows(len(users))  # a GPU scores (factor models) and ranks there; else numba on the CPU
    out = rank_rows(
        model.block_scorer(device), model.n_items_, users, truth[users], max(ks), None if excl is None else excl[users],
        batch_size, progress, device,
    )
    per_user = pd.DataFrame(M.per_user_metrics(out.hits, out.n_rel, out.first_rank, ks))
    per_user.insert(0, "user_id", model.user_map_.to_ids(users))
    summary = {c: float(per_user[c].mean()) for c in per_user.columns if c != "user_id"}
    for kk in ks:
        summary[f"coverage@{kk}"] = M.coverage(out.top_items, kk, model.n_items_)
    summary["users"] = float(len(users))
    result = EvaluationResult(name or model.name or type(model).__name__, per_user, summary)
    if isinstance(model, RatingPredictor) and test.ratings is not None:
        pred = model.predict_indices(test.users, test.items).astype(np.float64)
        err = pred - test.ratings.astype(np.float64)
        result.squared_errors = err**2
        result.abs_errors = np.abs(err)
        summary["rmse"] = float(np.sqrt(result.squared_errors.mean()))
        summary["mae"] = float(result.abs_errors.mean())
    if hasattr(model, "fit_seconds_"):
        summary["fit_seconds"] = float(model.fit_seconds_)
    return result


def evaluate_next_event(
    model: Recommender,
    samples: NextEventSamples,
    k: int | Sequence[int] = 10,
    exclude_seen: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
    name: str | None = None,
) -> EvaluationResult:
    """Next-event protocol: each sample is one row whose single relevant item is the next event.

    Models with ``uses_history`` (sequential models) score each sample from its own history — every earlier
    event of the user, whichever part of the split it is in; other models score the sample's user as fitted.
    Seen items are not excluded by default, as in the temporal protocol; with ``exclude_seen`` the sample's
    earlier items are excluded.
    """
    ks = check_ks(k)
    model._check_fitted()
    if len(samples) == 0:
        raise EmptyDatasetError("there are no next-event samples to evaluate")
    n = len(samples)
    n_items = model.n_items_
    truth = sp.csr_matrix(
        (np.ones(n, np.float32), samples.items, np.arange(n + 1)), shape=(n, n_items)
    )
    excl = None
    if exclude_seen:
        seq = samples.sequences
        starts = seq.offsets[samples.users]
        lengths = samples.positions
        indptr, flat = gather_ranges(starts, lengths)
        excl = sp.csr_matrix((np.ones(len(flat), np.float32), seq.items[flat], indptr), shape=(n, n_items))
        excl.sum_duplicates()
    if model.uses_history:
        score_fn = _history_scorer(model, samples)
        out = rank_rows(score_fn, n_items, np.arange(n), truth, max(ks), excl, batch_size, progress)
    else:
        out = rank_rows(model.score, n_items, samples.users, truth, max(ks), excl, batch_size, progress)
    per_user = pd.DataFrame(M.per_user_metrics(out.hits, out.n_rel, out.first_rank, ks))
    per_user.insert(0, "user_id", model.user_map_.to_ids(samples.users))
    summary = {c: float(per_user[c].mean()) for c in per_user.columns if c != "user_id"}
    for kk in ks:
        summary[f"coverage@{kk}"] = M.coverage(out.top_items, kk, n_items)
    summary["samples"] = float(n)
    return EvaluationResult(name or model.name, per_user, summary)


def _history_scorer(model: Recommender, samples: NextEventSamples) -> Callable[[np.ndarray], np.ndarray]:
    """Scores of sample rows from their histories (the latest ``model.max_len`` events when the model has one)."""
    seq = samples.sequences
    window = int(getattr(model, "max_len", 0) or 0)

    def score(rows: np.ndarray) -> np.ndarray:
        first = seq.offsets[samples.users[rows]]
        ends = first + samples.positions[rows]
        starts = np.maximum(first, ends - window) if window else first
        offsets, flat = gather_ranges(starts, ends - starts)
        return model.score_histories((offsets, seq.items[flat]))

    return score


def evaluate_scores(
    scores: np.ndarray,
    test: sp.csr_matrix,
    k: int | Sequence[int] = 10,
    exclude: sp.csr_matrix | None = None,
) -> dict[str, float]:
    """Metrics straight from a dense users × items score matrix (no model needed): mean of every per-user metric
    over users with test items, plus coverage."""
    ks = check_ks(k)
    scores = np.asarray(scores, dtype=np.float32)
    test = test.tocsr()
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    out = rank_rows(lambda rows: scores[rows], scores.shape[1], users, test[users], max(ks), None if exclude is None else exclude.tocsr()[users])
    res = {name: float(v.mean()) for name, v in M.per_user_metrics(out.hits, out.n_rel, out.first_rank, ks).items()}
    for kk in ks:
        res[f"coverage@{kk}"] = M.coverage(out.top_items, kk, scores.shape[1])
    return res


def factorized_top_k(
    model: Recommender,
    test: Interactions,
    ks: Sequence[int] = (1, 5, 10, 50, 100),
    exclude_seen: bool = False,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Top-k accuracy per test *event*, like TensorFlow Recommenders' ``FactorizedTopK``: the share of test
    events whose item is among the model's top ``k`` of the whole catalogue for that user (nothing excluded by
    default, as in TFRS). Keys ``top{k}_accuracy``. Unlike ``hr@k`` (per user: any hit), a user with five test
    events counts five times."""
    ks = check_ks(list(ks))
    model._check_fitted()
    if len(test) == 0:
        raise EmptyDatasetError("the test set is empty")
    check_same_maps(model, test)
    counts = test.csr("ones")  # repeated (user, item) events are summed: they count as often as they occur
    users = np.flatnonzero(np.diff(counts.indptr) > 0)
    kmax = max(ks)
    top, _ = model.recommend_indices(users, kmax, model.seen_ if exclude_seen else None, batch_size)
    row_of_user = np.full(counts.shape[0], -1, np.int64)
    row_of_user[users] = np.arange(len(users))
    event_rows = row_of_user[np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))]
    position = np.full(counts.nnz, kmax, np.int64)
    step = max(1, 2**24 // max(1, kmax))
    for lo in range(0, counts.nnz, step):
        match = top[event_rows[lo : lo + step]] == counts.indices[lo : lo + step, None]
        found = match.any(axis=1)
        position[lo : lo + step][found] = match.argmax(axis=1)[found]
    weights = counts.data.astype(np.float64)
    return {f"top{k}_accuracy": float(weights[position < k].sum() / weights.sum()) for k in ks}
