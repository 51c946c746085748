"""Named evaluation protocols and multi-model comparisons (what ``recforge compare`` runs)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from recforge.data.interactions import Interactions
from recforge.errors import DataError, UnknownNameError
from recforge.evaluation.evaluator import EvaluationResult, evaluate
from recforge.evaluation.report import leaderboard
from recforge.models.base import Recommender
from recforge.models.registry import create_model
from recforge import split as S

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """A named way to split data for a comparison; ``fit_on_valid`` refits on train + validation before testing."""

    name: str
    description: str
    make: Callable[..., S.Split]
    fit_on_valid: bool = True


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol(
            "loo",
            "leave-last-one-out: per user the last event is test, the one before validation (users with >= 3 events)",
            lambda inter, seed=0: S.leave_one_out(inter),
        ),
        Protocol("random", "random 80/20 holdout of interactions", lambda inter, seed=0: S.random_split(inter, 0.2, seed=seed)),
        Protocol(
            "temporal",
            "global temporal split at the 80% / 90% timestamp quantiles; test = events after the 90% cut",
            lambda inter, seed=0: S.temporal_split(inter, 0.1, 0.1),
        ),
        Protocol("last5", "per user the last 5 events are test (users with >= 6 events)", lambda inter, seed=0: S.last_n(inter, 5)),
        Protocol(
            "users",
            "20% of users held out; the first half of each one's history is known (in train), the rest test",
            lambda inter, seed=0: S.user_split(inter, 0.2, 0.5, seed=seed),
        ),
    ]
}


def get_protocol(name: str) -> Protocol:
    """The protocol registered under ``name``; :class:`UnknownNameError` lists the valid names."""
    key = name.strip().lower().replace("_", "-")
    aliases = {"leave-one-out": "loo", "leave-last-one-out": "loo", "time": "temporal", "user": "users"}
    key = aliases.get(key, key)
    if key not in PROTOCOLS:
        raise UnknownNameError(f"unknown protocol {name!r}; available protocols: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[key]


def compare(
    inter: Interactions,
    models: Sequence[str | Recommender] | Mapping[str, Recommender],
    protocol: str = "loo",
    k: int | Sequence[int] = 10,
    seed: int = 0,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    metrics: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, EvaluationResult]]:
    """Fit and evaluate several models on one split; return the leaderboard and every model's result.

    ``models`` are registry names, model objects, or a mapping label → model. ``params`` maps a model name to
    constructor arguments. Rating models are skipped (with a warning) on data without ratings.
    """
    proto = get_protocol(protocol)
    split = proto.make(inter, seed=seed)
    train = split.train_valid if proto.fit_on_valid else split.train
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        named = {}
        for m in models:
            if isinstance(m, Recommender):
                named[m.name or type(m).__name__] = m
            else:
                named[str(m)] = create_model(str(m), **dict((params or {}).get(str(m), {})))
    if not named:
        raise DataError("give at least one model to compare")
    results: dict[str, EvaluationResult] = {}
    bar = tqdm(named.items(), desc=f"compare ({proto.name})", unit="model", disable=not progress)
    for label, model in bar:
        bar.set_postfix_str(label)
        if model.predicts_ratings and train.ratings is None:
            log.warning("skipping %s: it predicts ratings and the data has none", label)
            continue
        model.fit(train)
        results[label] = evaluate(model, split.test, k=k, name=label)
    ks = [k] if isinstance(k, int) else list(k)
    default_metrics = [f"ndcg@{ks[0]}", f"hr@{ks[0]}", f"recall@{ks[0]}", f"map@{ks[0]}", "mrr", f"coverage@{ks[0]}"]
    if any(r.squared_errors is not None for r in results.values()):
        default_metrics.append("rmse")
    table = leaderboard(results, metrics=metrics or default_metrics, seed=seed)
    table.attrs["title"] = f"{proto.name} on {len(inter):,} interactions"
    return table, results
