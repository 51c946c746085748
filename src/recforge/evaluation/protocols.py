"""Named evaluation protocols and multi-model comparisons (what ``recforge compare`` runs)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from recforge import split as S
from recforge.data.interactions import Interactions
from recforge.errors import DataError, UnknownNameError
from recforge.evaluation.evaluator import EvaluationResult, evaluate
from recforge.evaluation.report import leaderboard
from recforge.models.base import Recommender
from recforge.models.registry import create_model, get_model_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """A named way to split data for a comparison; ``fit_on_valid`` refits on train + validation before testing."""

    name: str
    description: str
    make: Callable[..., S.Split]
    fit_on_valid: bool = True  # refit on train + validation before the final test


#: Protocols that read ready-made fold files instead of splitting.
FOLD_PROTOCOLS = ("folds", "ml100k-folds", "official-folds")

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
        Protocol(
            "cold-items",
            "10% of the items held out of training entirely; their events are test; only the cold items are ranked "
            "(random tie-break), cold_share@k = share of full-catalogue top-k slots given to cold items",
            lambda inter, seed=0: _cold_item_split(inter, seed),
            fit_on_valid=False,
        ),
        Protocol(
            "session",
            "temporal 80/10/10 split (timestamp quantiles) whose validation and test keep only users with training "
            "events: each user's later events are the targets of their earlier ones (notebook 002)",
            lambda inter, seed=0: S.warm_temporal_split(inter, 0.1, 0.1),
        ),
    ]
}


def _cold_item_split(inter: Interactions, seed: int) -> S.Split:
    from recforge.evaluation.cold_start import cold_item_split

    return cold_item_split(inter, fraction=0.1, seed=seed)


#: Protocols that score next-item samples instead of a train/test split (see recforge.evaluation.next_event).
SEQUENCE_PROTOCOLS: dict[str, str] = {
    "next-event": "temporal next-event: 5-core, cuts at the 80% / 90% timestamp quantiles, every test event a sample "
    "with all earlier events as history; HR/DCG/Coverage@5/10/20, seen items not excluded (notebook 003)",
    "sequence-mrr": "20% of users held out, their events cut into windows of 10; MRR of each window's last item "
    "given the others, nothing excluded (notebook 004)",
}


def sequence_protocol(name: str) -> str | None:
    """The canonical name when ``name`` is a next-item protocol (``next-event``, ``sequence-mrr``), else None."""
    key = name.strip().lower().replace("_", "-")
    aliases = {"temporal-next-event": "next-event", "nextevent": "next-event", "seq-mrr": "sequence-mrr",
               "mrr": "sequence-mrr"}
    key = aliases.get(key, key)
    return key if key in SEQUENCE_PROTOCOLS else None


def get_protocol(name: str) -> Protocol:
    """The protocol registered under ``name``; :class:`UnknownNameError` lists the valid names."""
    key = name.strip().lower().replace("_", "-")
    aliases = {"leave-one-out": "loo", "leave-last-one-out": "loo", "time": "temporal", "user": "users"}
    key = aliases.get(key, key)
    if key not in PROTOCOLS:
        known = ", ".join([*PROTOCOLS, *SEQUENCE_PROTOCOLS, FOLD_PROTOCOLS[0], "kfold[N]", "user-folds"])
        raise UnknownNameError(f"unknown protocol {name!r}; available protocols: {known}")
    return PROTOCOLS[key]


def make_splits(
    data: Interactions | str | Path, protocol: str = "loo", seed: int = 0, merge_valid: bool = True
) -> list[S.Split]:
    """The split(s) of a protocol. ``"folds"`` reads the official ML-100K folds u1..u5 from a folder (``data``
    must be its path); every other protocol splits one :class:`Interactions` (or a dataset name/path) once.

    With ``merge_valid`` the validation part joins train for protocols that refit on it before testing."""
    if protocol.strip().lower() in FOLD_PROTOCOLS:
        if isinstance(data, Interactions):
            raise DataError("the 'folds' protocol reads the official ML-100K fold files: pass the ml-100k folder")
        from recforge.data.datasets import load_movielens_folds

        return load_movielens_folds(data)
    key = protocol.strip().lower()
    if key in ("user-folds", "userfolds", "user-folds-last5"):  # notebook 001: LensKit partition_users + LastN(5)
        if not isinstance(data, Interactions):
            from recforge.data.datasets import load

            data = load(data)
        return list(S.user_folds_last_n(data, 5, 5, seed=seed))
    if key.startswith("kfold"):  # "kfold" (5 folds) or "kfold3", "kfold10", ...: seeded k-fold over rows
        digits = key[len("kfold"):].lstrip("-")
        if digits and not digits.isdigit():
            raise UnknownNameError(f"unknown protocol {protocol!r}; k-fold protocols look like kfold or kfold3")
        if not isinstance(data, Interactions):
            from recforge.data.datasets import load

            data = load(data)
        return list(S.kfold(data, int(digits) if digits else 5, seed=seed))
    proto = get_protocol(protocol)
    if not isinstance(data, Interactions):
        from recforge.data.datasets import load

        data = load(data)
    split = proto.make(data, seed=seed)
    if merge_valid and proto.fit_on_valid and split.valid is not None:
        split = S.Split(split.train_valid, split.test, None, split.history, split.name)
    return [split]


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

    return EvaluationResult(results[0].model, per_user, summary, pool("squared_errors"), pool("abs_errors"))


def evaluate_protocol(
    model: Recommender, splits: Sequence[S.Split], k: int | Sequence[int] = 10, name: str | None = None, **kwargs: Any
) -> EvaluationResult:
    """Fit ``model`` on every split's train part and evaluate on its test part; results merged over splits."""
    from recforge.evaluation.cold_start import evaluate_cold_items

    results = []
    for split in splits:
        model.fit(split.train)
        if split.name == "cold-items":
            results.append(evaluate_cold_items(model, split, k=k, name=name))
        else:
            results.append(evaluate(model, split.test, k=k, name=name, **kwargs))
    return merge_results(results)


def compare(
    data: Interactions | str | Path,
    models: Sequence[str | Recommender] | Mapping[str, Recommender],
    protocol: str = "loo",
    k: int | Sequence[int] = 10,
    seed: int = 0,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    metrics: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, EvaluationResult]]:
    """Fit and evaluate several models on the same split(s); return the leaderboard and every model's result.

    ``models`` are registry names, model objects, or a mapping label → model. ``params`` maps a model name to
    constructor arguments. Rating models are skipped (with a warning) on data without ratings.
    """
    seq_protocol = sequence_protocol(protocol)
    if seq_protocol is not None:
        if not isinstance(data, Interactions):
            from recforge.data.datasets import load

            data = load(data)
        splits: list[S.Split] = []
    else:
        splits = make_splits(data, protocol, seed)
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        named = {}
        for m in models:
            if isinstance(m, Recommender):
                named[m.name or type(m).__name__] = m
            else:
                kwargs = dict((params or {}).get(str(m), {}))
                if not progress and "progress" in get_model_class(str(m))._param_names():
                    kwargs.setdefault("progress", False)  # --quiet silences training bars too
                named[str(m)] = create_model(str(m), **kwargs)
    if not named:
        raise DataError("give at least one model to compare")
    if seq_protocol is not None:
        assert isinstance(data, Interactions)
        return _compare_sequence(data, named, seq_protocol, k, seed, metrics, progress)
    results: dict[str, EvaluationResult] = {}
    bar = tqdm(named.items(), desc=f"compare ({protocol})", unit="model", disable=not progress)
    for label, model in bar:
        bar.set_postfix_str(label)
        if model.predicts_ratings and splits[0].train.ratings is None:
            log.warning("skipping %s: it predicts ratings and the data has none", label)
            continue
        results[label] = evaluate_protocol(model, splits, k=k, name=label)
    ks = [k] if isinstance(k, int) else list(k)
    default_metrics = [f"ndcg@{ks[0]}", f"hr@{ks[0]}", f"recall@{ks[0]}", f"map@{ks[0]}", "mrr", f"coverage@{ks[0]}"]
    if splits[0].name == "cold-items":
        default_metrics.append(f"cold_share@{ks[0]}")
    if any(r.squared_errors is not None for r in results.values()):
        default_metrics.append("rmse")
    table = leaderboard(results, metrics=metrics or default_metrics, seed=seed)
    n_rows = sum(len(s.train) + len(s.test) for s in splits) // len(splits)
    table.attrs["title"] = f"{protocol} on {n_rows:,} interactions"
    return table, results


def _compare_sequence(
    data: Interactions,
    named: Mapping[str, Recommender],
    protocol: str,
    k: int | Sequence[int],
    seed: int,
    metrics: Sequence[str] | None,
    progress: bool,
) -> tuple[pd.DataFrame, dict[str, EvaluationResult]]:
    """``compare`` for the next-item protocols: one task, every model fitted and scored on it."""
    from recforge.errors import UnsupportedError
    from recforge.evaluation.next_event import (
        NEXT_EVENT_KS,
        evaluate_next_event_task,
        evaluate_sequence_mrr,
        sequence_windows,
        temporal_next_event,
    )

    results: dict[str, EvaluationResult] = {}
    if protocol == "next-event":
        task = temporal_next_event(data)
        ks = NEXT_EVENT_KS if isinstance(k, int) and k == 10 else k
        default = ["dcg@10", "hr@10", "dcg@5", "hr@5", "dcg@20", "hr@20", "coverage@10", "fit_seconds"]
        title = f"{protocol} on {len(task.data):,} interactions, {len(task.samples):,} test samples"
    else:
        windows = sequence_windows(data, seed=seed)
        default = ["mrr", "hr@10", "ndcg@10", "fit_seconds"]
        title = f"{protocol} on {len(windows):,} test windows"
    bar = tqdm(named.items(), desc=f"compare ({protocol})", unit="model", disable=not progress)
    for label, model in bar:
        bar.set_postfix_str(label)
        try:
            if protocol == "next-event":
                results[label] = evaluate_next_event_task(model, task, k=ks, name=label)
            else:
                results[label] = evaluate_sequence_mrr(model, windows, name=label)
        except UnsupportedError as exc:
            log.warning("skipping %s: %s", label, exc)
    if not results:
        raise DataError(f"no model could be evaluated with the {protocol} protocol")
    table = leaderboard(results, metrics=metrics or default, seed=seed)
    table.attrs["title"] = title
    return table, results
