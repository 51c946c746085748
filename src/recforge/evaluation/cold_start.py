"""Cold-start items: hold a set of items out of training entirely and measure how well models recommend them.

``cold_item_split`` removes every event of a random share of the items from training; their events by users
who keep some training history become the test set. ``evaluate_cold_items`` then ranks, for each test user,
only the cold items (the question "which of the new items suits this user?", where a collaborative model knows
nothing and must tie or guess), and also reports how many cold items reach the full-catalogue top-k lists
(``cold_share@k``: a model can rank cold items well among themselves yet never show one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from recforge.core import metrics as M
from recforge.core.ranking import rank_rows
from recforge.data import split as S
from recforge.data.interactions import Interactions
from recforge.errors import DataError
from recforge.evaluation.evaluator import EvaluationResult, check_ks, check_same_maps
from recforge.models.base import Recommender


def cold_item_split(
    inter: Interactions, fraction: float = 0.1, min_item_events: int = 1, seed: int = 0
) -> S.Split:
    """Hold out ``fraction`` of the items (drawn uniformly among items with ``min_item_events`` or more events).

    ``train``: every event on the other items. ``test``: the held-out items' events by users who have at least
    one training event. The held-out items stay in the id maps (with their side data) but never occur in train.
    The split's ``name`` is ``"cold-items"``; the held-out item indices are ``cold_items(split)``.
    """
    if len(inter) == 0:
        raise DataError("cannot split an empty dataset")
    if isinstance(fraction, bool) or not 0 < fraction < 1:
        raise DataError(f"fraction must lie in (0, 1), got {fraction!r}")
    counts = inter.item_counts()
    eligible = np.flatnonzero(counts >= min_item_events)
    n_cold = round(fraction * len(eligible))
    if n_cold < 1 or n_cold >= len(eligible):
        raise DataError(f"fraction {fraction} of {len(eligible)} eligible items leaves no cold or no warm item")
    rng = np.random.default_rng(seed)
    cold = np.zeros(inter.n_items, bool)
    cold[rng.choice(eligible, n_cold, replace=False)] = True
    is_cold = cold[inter.items]
    train = inter.subset(~is_cold)
    has_history = np.zeros(inter.n_users, bool)
    has_history[train.users] = True
    test = inter.subset(is_cold & has_history[inter.users])
    if len(test) == 0:
        raise DataError("no held-out event belongs to a user with training history; use a larger fraction")
    return S.Split(train, test, name="cold-items")


def cold_items(split: S.Split) -> np.ndarray:
    """Indices of the items a cold-item split held out (items of test that never occur in train)."""
    in_train = np.zeros(split.train.n_items, bool)
    in_train[split.train.items] = True
    return np.setdiff1d(np.unique(split.test.items), np.flatnonzero(in_train)).astype(np.int64)


def random_tiebreak(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scores with the same order, except that tied entries of a row come in random order.

    Each row becomes ``-dense_rank + u`` with ``u`` uniform in [0, 0.5): distinct scores keep their order (their
    dense ranks differ by at least one), equal ones are shuffled. Non-finite scores stay last.
    """
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    new_value = np.ones(ranked.shape, bool)
    new_value[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    dense = np.cumsum(new_value, axis=1).astype(np.float64)
    keyed = -dense + 0.5 * rng.random(dense.shape)
    keyed[~np.isfinite(ranked)] = -np.inf
    out = np.empty_like(keyed)
    np.put_along_axis(out, order, keyed, axis=1)
    return out.astype(np.float32)


def evaluate_cold_items(
    model: Recommender,
    split: S.Split,
    k: int | Sequence[int] = 10,
    name: str | None = None,
    seed: int = 0,
) -> EvaluationResult:
    """Rank only the cold items for every test user (metrics as usual, e.g. ``ndcg@10``), plus ``cold_share@k``:
    the share of the full-catalogue top-``k`` positions (seen items excluded) that go to cold items.

    Ties among cold items are broken at random for every user (seeded), not by item index: a model that knows
    nothing about cold items scores them all alike, and index order often follows release date and popularity
    (MovieLens), which would hand such a model a free, meaningless advantage; one shared random order would make
    its score a lottery on which ten items that order puts first. Per-user draws give it chance level.
    """
    ks = check_ks(k)
    model._check_fitted()
    check_same_maps(model, split.test)
    candidates = cold_items(split)
    if not len(candidates):
        raise DataError("the split has no cold item (every test item occurs in train)")
    truth = split.test.csr("ones")
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    rng = np.random.default_rng(seed)
    out = rank_rows(lambda rows: random_tiebreak(model.score(rows)[:, candidates], rng), len(candidates), users,
                    truth[users][:, candidates], max(ks), None)
    per_user = pd.DataFrame(M.per_user_metrics(out.hits, out.n_rel, out.first_rank, ks))
    per_user.insert(0, "user_id", model.user_map_.to_ids(users))
    summary = {c: float(per_user[c].mean()) for c in per_user.columns if c != "user_id"}
    top, _ = model.recommend_indices(users, max(ks), model.seen_)
    is_cold = np.zeros(model.n_items_, bool)
    is_cold[candidates] = True
    for kk in ks:
        summary[f"coverage@{kk}"] = M.coverage(out.top_items, kk, len(candidates))
        block = top[:, :kk]
        summary[f"cold_share@{kk}"] = float(is_cold[block[block >= 0]].mean()) if block.size else 0.0
    summary["users"] = float(len(users))
    summary["cold_items"] = float(len(candidates))
    if hasattr(model, "fit_seconds_"):
        summary["fit_seconds"] = float(model.fit_seconds_)
    return EvaluationResult(name or model.name or type(model).__name__, per_user, summary)
