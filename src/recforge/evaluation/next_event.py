"""Next-item protocols: the temporal next-event protocol of notebook 003 and the sequence-MRR protocol of 004.

Temporal next-event: iterative 5-core, global cuts at timestamp quantiles (80% / 90%); every event of the scored
part is a sample whose history is all earlier events of that user (train, validation and earlier scored events);
HitRate, DCG and Coverage at 5/10/20 over the full catalogue with seen items *not* excluded.

Sequence MRR: a random share of the users is held out for test, and a share of the others for validation; each
held-out user's time-ordered events are cut from the end into windows of 10, and the task is each window's last
item given the window's earlier items (MRR over the full catalogue, nothing excluded). Models are fitted on the
remaining users (tuned on the validation users, then refitted on both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recforge.core import metrics as M
from recforge.core.ranking import rank_rows
from recforge.data import split as S
from recforge.data.filters import k_core
from recforge.data.interactions import Interactions, gather_ranges
from recforge.errors import DataError, EmptyDatasetError
from recforge.evaluation.evaluator import EvaluationResult
from recforge.models.base import Recommender

NEXT_EVENT_KS = (5, 10, 20)
#: The figures the next-event protocol reports (as in notebook 003's table).
NEXT_EVENT_METRICS = ("hr@5", "hr@10", "hr@20", "dcg@5", "dcg@10", "dcg@20", "coverage@5", "coverage@10",
                      "coverage@20")
#: Window length and held-out user share of the sequence-MRR protocol (notebook 004 / Spotlight defaults).
MRR_WINDOW = 10
MRR_TEST_USERS = 0.2


def next_event_split(inter: Interactions, valid: float = 0.1, test: float = 0.1, core: int = 5) -> S.Split:
    """Notebook 003's split: ``core``-core filter (0 = none), then global cuts at the ``1 - valid - test`` and
    ``1 - test`` timestamp quantiles. Its events are scored as next-event samples
    (:func:`recforge.data.split.next_event_samples`)."""
    data = (k_core(inter, core) if core else inter).compact()
    split = S.temporal_split(data, valid, test)
    return S.Split(split.train, split.test, split.valid, name="next-event")


@dataclass
class SequenceWindows:
    """Windows of consecutive events, flat: window ``w`` is ``items[offsets[w]:offsets[w+1]]`` (oldest first);
    the task is its last item given the others."""

    offsets: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


def sequence_mrr_split(
    inter: Interactions, test_users: float = MRR_TEST_USERS, valid_users: float = MRR_TEST_USERS, seed: int = 0
) -> S.Split:
    """Hold out a random ``test_users`` share of the users (``test``), then a ``valid_users`` share of the others
    (``valid``: what models tune on, scored the same way); ``train`` holds the rest. Held-out users' events are
    cut into windows by :func:`cut_windows` when scored."""
    users = np.flatnonzero(inter.user_counts() > 0)
    n_test = round(test_users * len(users))
    if not 0 < n_test < len(users):
        raise DataError(f"test_users={test_users} leaves no training or no test users")
    rng = np.random.default_rng(seed)
    part = np.zeros(inter.n_users, np.int8)  # 0 train, 1 valid, 2 test
    part[rng.choice(users, n_test, replace=False)] = 2
    rest = users[part[users] == 0]
    n_valid = round(valid_users * len(rest))
    if n_valid >= len(rest):
        raise DataError(f"valid_users={valid_users} leaves no training users")
    part[rng.choice(rest, n_valid, replace=False)] = 1
    of_row = part[inter.users]
    valid = inter.subset(of_row == 1) if n_valid else None
    return S.Split(inter.subset(of_row == 0), inter.subset(of_row == 2), valid, name="sequence-mrr")


def cut_windows(held: Interactions, window: int = MRR_WINDOW) -> SequenceWindows:
    """Each user's time-ordered events cut from the end into consecutive windows of ``window`` events (the
    earliest may be shorter; windows of fewer than 2 events are dropped), like Spotlight's ``to_sequence``."""
    if window < 2:
        raise DataError(f"window must be at least 2, got {window}")
    seq = held.sequences()
    per_user = -(-seq.lengths // window)
    owner = np.repeat(np.arange(seq.n_users), per_user)
    first = np.repeat(np.cumsum(per_user) - per_user, per_user)
    ends = seq.offsets[owner + 1] - (np.arange(len(owner)) - first) * window
    starts = np.maximum(seq.offsets[owner], ends - window)
    keep = ends - starts >= 2
    offsets, flat = gather_ranges(starts[keep], (ends - starts)[keep])
    return SequenceWindows(offsets, seq.items[flat].astype(np.int64))


def evaluate_windows(model: Recommender, windows: SequenceWindows, name: str | None = None) -> EvaluationResult:
    """MRR (full catalogue, nothing excluded, ties broken as everywhere) of each window's last item given the
    window's earlier items; also HR@10 and NDCG@10. One per-user row per window. The model must score
    histories."""
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
    per = pd.DataFrame(M.per_user_metrics(out.hits, out.n_rel, out.first_rank, [10]))[["mrr", "hr@10", "ndcg@10"]]
    summary = {c: float(per[c].mean()) for c in per.columns}
    summary["samples"] = float(n)
    per.insert(0, "user_id", np.arange(n))
    return EvaluationResult(name or model.name, per, summary)
