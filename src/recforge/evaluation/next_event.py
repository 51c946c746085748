"""Next-item protocols: the global temporal split with next-event samples (notebook 003), the same on splits
made elsewhere (train/valid/test files), and the sequence-MRR protocol of notebook 004.

Temporal next-event protocol: iterative k-core, cut at timestamp quantiles (80% / 90% by default); every test
event is a sample whose history is all earlier events of that user (train, validation and earlier test events);
metrics HitRate, DCG and Coverage at 5/10/20 over the full catalogue with seen items *not* excluded. Sequential
models are fitted on train with the validation events for early stopping; other models on train + validation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recforge import split as S
from recforge.data.filters import k_core
from recforge.data.interactions import Interactions, gather_ranges
from recforge.errors import DataError, EmptyDatasetError
from recforge.evaluation import metrics as M
from recforge.evaluation.evaluator import EvaluationResult, evaluate_next_event
from recforge.evaluation.ranking import rank_rows
from recforge.models.base import Recommender

log = logging.getLogger(__name__)

NEXT_EVENT_KS = (5, 10, 20)
#: The figures the next-event protocol reports (as in notebook 003's table), plus the fit time.
NEXT_EVENT_METRICS = ("hr@5", "hr@10", "hr@20", "dcg@5", "dcg@10", "dcg@20", "coverage@5", "coverage@10",
                      "coverage@20")


@dataclass
class NextEventTask:
    """A next-event evaluation: what to fit on (``train``, optional ``valid``) and the test samples."""

    data: Interactions
    train: Interactions
    valid: Interactions | None
    samples: S.NextEventSamples
    name: str = "next-event"

    @property
    def train_valid(self) -> Interactions:
        """Train plus validation events (what models without early stopping are fitted on)."""
        return self.train if self.valid is None or len(self.valid) == 0 else self.train.concat(self.valid)


def task_from_labels(data: Interactions, labels: np.ndarray, name: str = "next-event") -> NextEventTask:
    """A task from one :class:`Interactions` whose rows are labelled 0 (train), 1 (validation) or 2 (test).

    Every test row becomes a sample whose history is all earlier events of its user (by timestamp; rows with
    equal timestamps keep file order only through the item index, so give distinct times where order matters).
    Test events without any earlier event are dropped, as in notebook 003.
    """
    labels = np.asarray(labels)
    if len(labels) != len(data):
        raise DataError("one label per interaction is needed")
    if not (labels == 2).any():
        raise EmptyDatasetError("the next-event task has no test events")
    if not (labels == 0).any():
        raise EmptyDatasetError("the next-event task has no training events")
    seq = data.sequences()
    is_test = labels[seq.positions] == 2
    flat = np.flatnonzero(is_test)
    owner = np.repeat(np.arange(seq.n_users, dtype=np.int32), seq.lengths)[flat]
    pos = (flat - seq.offsets[owner]).astype(np.int64)
    keep = pos > 0
    samples = S.NextEventSamples(users=owner[keep], items=seq.items[flat[keep]], positions=pos[keep], sequences=seq)
    valid = data.subset(labels == 1) if (labels == 1).any() else None
    return NextEventTask(data, data.subset(labels == 0), valid, samples, name)


def temporal_next_event(
    inter: Interactions, valid: float = 0.1, test: float = 0.1, core: int = 5
) -> NextEventTask:
    """Notebook 003's protocol: ``core``-core filter (0 = none), global cuts at the ``1 - valid - test`` and
    ``1 - test`` timestamp quantiles, every test event a sample with its full earlier history."""
    data = k_core(inter, core) if core else inter
    data = data.compact()
    t_valid, t_test = S.temporal_cut_points(data, valid, test)
    ts = data.timestamps
    assert ts is not None
    labels = np.where(ts >= t_test, 2, np.where(ts >= t_valid, 1, 0))
    return task_from_labels(data, labels, "temporal next-event")


def fit_for_task(model: Recommender, task: NextEventTask) -> Recommender:
    """Fit as the protocol prescribes: early stopping on validation for models that use it, else train+valid."""
    if model.supports_validation:
        return model.fit(task.train, valid=task.valid)
    return model.fit(task.train_valid)


def evaluate_next_event_task(
    model: Recommender,
    task: NextEventTask,
    k: int | Sequence[int] = NEXT_EVENT_KS,
    fit: bool = True,
    progress: bool = False,
    name: str | None = None,
) -> EvaluationResult:
    """Fit (unless ``fit=False``) and score every test sample; the summary has hr/dcg/ndcg/coverage@k,
    ``mrr``, ``samples`` and ``fit_seconds``."""
    if fit:
        fit_for_task(model, task)
    result = evaluate_next_event(model, task.samples, k=k, exclude_seen=False, progress=progress, name=name)
    if hasattr(model, "fit_seconds_"):
        result.summary["fit_seconds"] = float(model.fit_seconds_)
    for attr in ("seconds_to_best_", "best_epoch_"):
        if getattr(model, attr, None) is not None:
            result.summary[attr.rstrip("_")] = float(getattr(model, attr))
    return result


# ---------------------------------------------------------------------------------------- sequence MRR
@dataclass
class SequenceWindows:
    """Notebook 004's protocol data: models fit on ``train`` (the training users' events); each test window is
    up to ``window`` consecutive events of a held-out user, and the task is its last item given the others."""

    train: Interactions
    offsets: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


def sequence_windows(
    inter: Interactions, test_users: float = 0.2, window: int = 10, seed: int = 0
) -> SequenceWindows:
    """Hold out a random ``test_users`` fraction of users and cut each one's time-ordered events from the end
    into consecutive windows of ``window`` events (the earliest may be shorter; those with fewer than 2 events
    are dropped), like Spotlight's ``user_based_train_test_split`` + ``to_sequence``."""
    if window < 2:
        raise DataError(f"window must be at least 2, got {window}")
    users = np.flatnonzero(inter.user_counts() > 0)
    n_test = round(test_users * len(users))
    if not 0 < n_test < len(users):
        raise DataError(f"test_users={test_users} leaves no training or no test users")
    held = np.zeros(inter.n_users, bool)
    held[np.random.default_rng(seed).choice(users, n_test, replace=False)] = True
    seq = inter.sequences()
    lengths = seq.lengths
    per_user = np.where(held, -(-lengths // window), 0)
    owner = np.repeat(np.arange(seq.n_users), per_user)
    first = np.repeat(np.cumsum(per_user) - per_user, per_user)
    ends = seq.offsets[owner + 1] - (np.arange(len(owner)) - first) * window
    starts = np.maximum(seq.offsets[owner], ends - window)
    keep = ends - starts >= 2
    starts, ends = starts[keep], ends[keep]
    offsets, flat = gather_ranges(starts, ends - starts)
    train = inter.subset(~held[inter.users])
    return SequenceWindows(train, offsets, seq.items[flat].astype(np.int64))


def evaluate_sequence_mrr(
    model: Recommender, windows: SequenceWindows, fit: bool = True, name: str | None = None
) -> EvaluationResult:
    """MRR (full catalogue, nothing excluded, ties counted against the target) of each window's last item given
    the window's earlier items; also HR@10 and NDCG@10. The model must score histories."""
    if fit:
        model.fit(windows.train)
    n = len(windows)
    if n == 0:
        raise EmptyDatasetError("there are no test windows")
    ends = windows.offsets[1:]
    targets = windows.items[ends - 1]
    lens = np.diff(windows.offsets) - 1  # every window's history: all but its last item

    def score(rows: np.ndarray) -> np.ndarray:
        offs, flat = gather_ranges(windows.offsets[rows], lens[rows])
        return model.score_histories((offs, windows.items[flat]))

    truth = sp.csr_matrix((np.ones(n, np.float32), targets, np.arange(n + 1)), shape=(n, model.n_items_))
    out = rank_rows(score, model.n_items_, np.arange(n), truth, 10, None)
    per = pd.DataFrame(M.per_user_metrics(out.hits, out.n_rel, out.first_rank, [10]))
    summary = {"mrr": float(per["mrr"].mean()), "hr@10": float(per["hr@10"].mean()),
               "ndcg@10": float(per["ndcg@10"].mean()), "samples": float(n)}
    if hasattr(model, "fit_seconds_"):
        summary["fit_seconds"] = float(model.fit_seconds_)
    return EvaluationResult(name or model.name, per, summary)
