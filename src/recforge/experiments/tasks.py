"""Protocols and metrics of the notebook reproductions, in the shape ``recforge run`` needs.

The runner fits every trial on a split's train part (``select``: train; ``test``: train + validation) and scores
its test part (``select``: validation; ``test``: test). The next-item protocols score *samples* rather than a test
set, so here they are expressed as ordinary :class:`~recforge.split.Split` objects whose test events are turned
into samples at evaluation time:

- ``next-event`` (notebook 003): iterative 5-core, global cuts at the 80% / 90% timestamp quantiles; every event
  of the scored part is a sample whose history is all earlier events of its user (train, validation and earlier
  events of the scored part); seen items are not excluded.
- ``sequence-mrr`` (notebook 004): 20% of users held out; each held-out user's events are cut from the end into
  windows of 10; MRR of every window's last item given the window's earlier items.

Rating models also get per-user ``rating_ndcg`` (their test items ranked by predicted rating, graded by the
true ratings; notebook 001) and the per-user sums behind a user-level bootstrap CI of RMSE.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from recforge import split as S
from recforge.data.interactions import Interactions, gather_ranges
from recforge.errors import DataError
from recforge.evaluation.evaluator import EvaluationResult, evaluate_next_event
from recforge.evaluation.next_event import SequenceWindows, evaluate_sequence_mrr, sequence_windows
from recforge.models.base import RatingPredictor, Recommender

#: Next-item protocols the runner scores from samples (the names of ``SEQUENCE_PROTOCOLS``).
RUNNER_SEQUENCE_PROTOCOLS = ("next-event", "sequence-mrr")
#: Window length and held-out user share of the ``sequence-mrr`` protocol (notebook 004 / Spotlight defaults).
MRR_WINDOW = 10
MRR_TEST_USERS = 0.2


def sequence_splits(data: Interactions, protocol: str, seed: int = 0) -> list[S.Split]:
    """The single split of a next-item protocol (``next-event`` or ``sequence-mrr``) as a :class:`Split`."""
    if protocol == "next-event":
        from recforge.data.filters import k_core

        core = k_core(data, 5).compact()
        split = S.temporal_split(core, 0.1, 0.1)  # same cut points as temporal_next_event
        return [S.Split(split.train, split.test, split.valid, name="next-event")]
    if protocol == "sequence-mrr":
        windows = sequence_windows(data, test_users=MRR_TEST_USERS, window=MRR_WINDOW, seed=seed)
        trained = np.zeros(data.n_users, bool)
        trained[windows.train.users] = True
        return [S.Split(windows.train, data.subset(~trained[data.users]), name="sequence-mrr")]
    raise DataError(f"{protocol!r} is not a next-item protocol; use one of {list(RUNNER_SEQUENCE_PROTOCOLS)}")


def next_event_samples(train: Interactions, scored: Interactions) -> S.NextEventSamples:
    """Every event of ``scored`` as a sample whose history is all earlier events of its user in ``train`` and
    ``scored`` (time order; events without any earlier event are dropped, as in notebook 003)."""
    from recforge.evaluation.next_event import task_from_labels

    both = train.concat(scored)
    labels = np.r_[np.zeros(len(train), np.int8), np.full(len(scored), 2, np.int8)]
    return task_from_labels(both, labels).samples


def cut_windows(train: Interactions, held: Interactions, window: int = MRR_WINDOW) -> SequenceWindows:
    """Each user of ``held`` cut from the end of their time-ordered events into windows of ``window`` (the
    earliest may be shorter; windows of fewer than 2 events are dropped)."""
    seq = held.sequences()
    lengths = seq.lengths
    per_user = -(-lengths // window)
    owner = np.repeat(np.arange(seq.n_users), per_user)
    first = np.repeat(np.cumsum(per_user) - per_user, per_user)
    ends = seq.offsets[owner + 1] - (np.arange(len(owner)) - first) * window
    starts = np.maximum(seq.offsets[owner], ends - window)
    keep = ends - starts >= 2
    offsets, flat = gather_ranges(starts[keep], (ends - starts)[keep])
    return SequenceWindows(train, offsets, seq.items[flat].astype(np.int64))


def evaluate_sequence_trial(
    model: Recommender, train: Interactions, test: Interactions, protocol: str, k: int | Sequence[int]
) -> EvaluationResult:
    """Score a model fitted on ``train`` under a next-item protocol (``test`` = the events to predict)."""
    if protocol == "next-event":
        return evaluate_next_event(model, next_event_samples(train, test), k=k, exclude_seen=False)
    if protocol == "sequence-mrr":
        res = evaluate_sequence_mrr(model, cut_windows(train, test), fit=False)
        res.per_user.insert(0, "user_id", np.arange(len(res.per_user)))  # one row per window
        return res
    raise DataError(f"{protocol!r} is not a next-item protocol; use one of {list(RUNNER_SEQUENCE_PROTOCOLS)}")


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
