"""The protocol registry: every way recforge splits data and scores a fitted model, by name.

A :class:`Protocol` makes the split(s) of a dataset (validation parts kept: whether a model is tuned on them or
fitted on train + validation is the fitting pipeline's choice, :mod:`recforge.experiments`) and scores a fitted
model on a scored part given the part before it. ``recforge compare``, ``recforge evaluate``, ``recforge run`` and
the benchmark scripts all look protocols up here; none is defined anywhere else.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from recforge.data import split as S
from recforge.data.datasets import load, load_movielens_folds
from recforge.data.interactions import Interactions
from recforge.errors import DataError, UnknownNameError
from recforge.evaluation.cold_start import cold_item_split, evaluate_cold_items
from recforge.evaluation.evaluator import EvaluationResult, evaluate, evaluate_next_event
from recforge.evaluation.next_event import (
    NEXT_EVENT_KS,
    cut_windows,
    evaluate_windows,
    next_event_split,
    sequence_mrr_split,
)
from recforge.evaluation.rating import rating_user_metrics
from recforge.models.base import Recommender

log = logging.getLogger(__name__)

Scoring = Literal["top-n", "cold-items", "next-event", "sequence-mrr"]
Splitter = Callable[[Any, int], list[S.Split]]


@dataclass(frozen=True)
class Protocol:
    """A named protocol: how to split (``make(data, seed)``) and how to score (``scoring``).

    ``reads_files``: the protocol reads ready-made fold files (``data`` is their folder). ``ks``: the list lengths
    it reports by default. ``has_validation``: its splits have a validation part (what grids and early stopping
    are tuned on).
    """

    name: str
    description: str
    make: Splitter
    scoring: Scoring = "top-n"
    has_validation: bool = False
    reads_files: bool = False
    ks: tuple[int, ...] = (10,)
    aliases: tuple[str, ...] = field(default=())

    def splits(self, data: Interactions | str | Path, seed: int = 0) -> list[S.Split]:
        """The split(s) of ``data`` (an :class:`Interactions`, a dataset name or a path); validation parts kept."""
        if self.reads_files:
            if isinstance(data, Interactions):
                raise DataError(f"the {self.name!r} protocol reads the official ML-100K fold files: pass the "
                                "ml-100k folder, not loaded interactions")
            if str(data).lower() != "ml-100k" and not Path(data).exists():
                raise DataError(f"the {self.name!r} protocol reads the official ML-100K folds u1..u5, which "
                                f"{str(data)!r} does not have: give the ml-100k folder or zip as the dataset "
                                "(`recforge datasets fetch ml-100k` downloads it)")
            return self.make(data, seed)
        return self.make(data if isinstance(data, Interactions) else load(data), seed)

    def evaluate(
        self,
        model: Recommender,
        history: Interactions,
        scored: Interactions,
        k: int | Sequence[int] | None = None,
        exclude_seen: bool = True,
        name: str | None = None,
    ) -> EvaluationResult:
        """Score a fitted ``model`` on ``scored``; ``history`` is everything before it (what the model was fitted
        on, or that plus the validation part): the items excluded from each user's ranking, the history of
        next-event samples, the cold items' complement."""
        ks = self.ks if k is None else k
        if self.scoring == "cold-items":
            result = evaluate_cold_items(model, S.Split(history, scored, name="cold-items"), k=ks, name=name)
        elif self.scoring == "next-event":
            result = evaluate_next_event(model, S.next_event_samples(history, scored), k=ks, name=name)
        elif self.scoring == "sequence-mrr":
            result = evaluate_windows(model, cut_windows(scored), name=name)
        else:
            result = evaluate(model, scored, k=ks, exclude=history if exclude_seen else None,
                              exclude_seen=exclude_seen, name=name)
            extra = rating_user_metrics(model, scored)
            if extra is not None:  # rating models: rating-graded NDCG and the sums behind a user-level RMSE CI
                result.per_user = result.per_user.merge(extra, on="user_id", how="left")
                result.summary["rating_ndcg"] = float(extra["rating_ndcg"].mean())
        if hasattr(model, "fit_seconds_"):
            result.summary["fit_seconds"] = float(model.fit_seconds_)
        for attr in ("seconds_to_best_", "best_epoch_"):  # models that stopped early on validation
            if getattr(model, attr, None) is not None:
                result.summary[attr.rstrip("_")] = float(getattr(model, attr))
        return result

    def excludes_seen(self, exclude_seen: bool = True) -> bool:
        """Whether this protocol's rankings leave out each user's earlier items (the next-item protocols keep
        them: a user may consume an item again); models validate the same way while they train."""
        return exclude_seen and self.scoring in ("top-n", "cold-items")

    def default_metrics(self, ks: Sequence[int]) -> list[str]:
        """The leaderboard columns of this protocol for the list lengths ``ks`` (the first column ranks)."""
        k = 10 if 10 in ks else ks[0]
        if self.scoring == "next-event":
            out = [f"dcg@{k}", f"hr@{k}"] + [f"{m}@{x}" for x in ks if x != k for m in ("dcg", "hr")]
            return [*out, f"coverage@{k}", "fit_seconds"]
        if self.scoring == "sequence-mrr":
            return ["mrr", "hr@10", "ndcg@10", "fit_seconds"]
        out = [f"ndcg@{k}", f"hr@{k}", f"recall@{k}", f"map@{k}", "mrr", f"coverage@{k}"]
        return out + [f"cold_share@{k}"] if self.scoring == "cold-items" else out


#: The metrics of the rating table (rating models on data with ratings).
RATING_METRICS = ("rmse", "mae", "rating_ndcg")


def _kfold(n_folds: int) -> Splitter:
    return lambda inter, seed: list(S.kfold(inter, n_folds, seed=seed))


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol("loo", "leave-last-one-out: per user the last event is test, the one before validation (users "
                 "with >= 3 events)", lambda inter, seed: [S.leave_one_out(inter)], has_validation=True,
                 aliases=("leave-one-out", "leave-last-one-out")),
        Protocol("random", "random 80/20 holdout of interactions",
                 lambda inter, seed: [S.random_split(inter, 0.2, seed=seed)]),
        Protocol("temporal", "global temporal split at the 80% / 90% timestamp quantiles; test = events after the "
                 "90% cut", lambda inter, seed: [S.temporal_split(inter, 0.1, 0.1)], has_validation=True,
                 aliases=("time",)),
        Protocol("last5", "per user the last 5 events are test (users with >= 6 events)",
                 lambda inter, seed: [S.last_n(inter, 5)]),
        Protocol("users", "20% of users held out; the first half of each one's history is known (in train), the rest "
                 "test", lambda inter, seed: [S.user_split(inter, 0.2, 0.5, seed=seed)], aliases=("user",)),
        Protocol("cold-items", "10% of the items held out of training entirely; their events are test; only the cold "
                 "items are ranked (random tie-break), cold_share@k = share of full-catalogue top-k slots given to "
                 "cold items", lambda inter, seed: [cold_item_split(inter, fraction=0.1, seed=seed)],
                 scoring="cold-items"),
        Protocol("session", "temporal 80/10/10 split (timestamp quantiles) whose validation and test keep only users "
                 "with training events: each user's later events are the targets of their earlier ones (notebook "
                 "002)", lambda inter, seed: [S.warm_temporal_split(inter, 0.1, 0.1)], has_validation=True),
        Protocol("folds", "the official ML-100K folds u1..u5 (read from the ml-100k folder; mean over folds)",
                 lambda path, seed: load_movielens_folds(path), reads_files=True,
                 aliases=("ml100k-folds", "official-folds")),
        Protocol("user-folds", "5 folds of users; each test user's last 5 events are test, the rest train "
                 "(notebook 001, LensKit partition_users + LastN(5))",
                 lambda inter, seed: list(S.user_folds_last_n(inter, 5, 5, seed=seed)),
                 aliases=("userfolds", "user-folds-last5")),
        Protocol("kfold", "seeded k-fold over interactions (kfold = 5 folds; kfold3, kfold10 ... for others)",
                 _kfold(5)),
        Protocol("next-event", "temporal next-event: 5-core, cuts at the 80% / 90% timestamp quantiles, every test "
                 "event a sample with all earlier events as history; HR/DCG/Coverage@5/10/20, seen items not "
                 "excluded (notebook 003)", lambda inter, seed: [next_event_split(inter)], scoring="next-event",
                 has_validation=True, ks=NEXT_EVENT_KS, aliases=("temporal-next-event", "nextevent")),
        Protocol("sequence-mrr", "20% of users held out for test (and 20% of the others for validation), their "
                 "events cut into windows of 10; MRR of each window's last item given the others, nothing excluded "
                 "(notebook 004)", lambda inter, seed: [sequence_mrr_split(inter, seed=seed)],
                 scoring="sequence-mrr", has_validation=True, aliases=("seq-mrr", "mrr")),
    ]
}
_ALIASES = {alias: p.name for p in PROTOCOLS.values() for alias in p.aliases}


def available_protocols() -> list[str]:
    """Registered protocol names (``kfold`` also takes a fold count: ``kfold3``)."""
    return list(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    """The protocol registered under ``name`` (or an alias; ``kfoldN`` for N folds); :class:`UnknownNameError`
    lists the valid names."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    folds = re.fullmatch(r"kfold-?(\d+)", key)
    if folds:
        n = int(folds.group(1))
        if n < 2:
            raise UnknownNameError(f"protocol {name!r}: k-fold needs at least 2 folds")
        base = PROTOCOLS["kfold"]
        return Protocol(f"kfold{n}", base.description, _kfold(n))
    if key not in PROTOCOLS:
        raise UnknownNameError(f"unknown protocol {name!r}; available protocols: {', '.join(available_protocols())}")
    return PROTOCOLS[key]


def merge_results(results: Sequence[EvaluationResult]) -> EvaluationResult:
    """Combine one model's results over several folds.

    Per-user rows and rating errors are pooled; per-user metrics are their pooled mean (consistent with the
    CIs and paired tests). Whole-model figures (rmse, mae, coverage, fit_seconds) are the mean over folds, so
    "mean RMSE over u1..u5" is what ``rmse`` holds.
    """
    if len(results) == 1:
        return results[0]
    per_user = pd.concat([r.per_user for r in results], ignore_index=True)
    keys = set.intersection(*(set(r.summary) for r in results))
    summary = {key: float(np.mean([r.summary[key] for r in results])) for key in keys}
    for col in per_user.columns.drop("user_id"):
        summary[col] = float(per_user[col].mean())  # pooled over users, consistent with CIs and paired tests
    if "users" in keys:
        summary["users"] = float(sum(r.summary["users"] for r in results))
    summary["folds"] = float(len(results))

    def pool(name: str) -> np.ndarray | None:
        parts = [getattr(r, name) for r in results]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    return EvaluationResult(results[0].model, per_user, summary, pool("squared_errors"), pool("abs_errors"),
                            info=dict(results[0].info))
