"""Target policies replayed over a log: the probabilities each target gives every logged slate, in the context the
logging policy was in, and the estimates of every target by every estimator.

A simulator policy's context is the user and what the session has shown so far (policies never repeat an item in
a session). Replaying walks the log in time order, session by session: before each impression the target is asked
the probability of the logged slate (:meth:`~recforge.interactive.policies.Policy.slate_probabilities`), then it
is told what was shown and clicked, as it would have been online. Targets should be static (``learn=False``): a
learning target would learn from the logging policy's clicks, not from its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from recforge.core.slates import EpsilonGreedy, pseudo_inverse_weights
from recforge.data.impressions import ImpressionArrays, impression_arrays
from recforge.data.interactions import Interactions
from recforge.errors import DataError
from recforge.interactive.policies import Policy
from recforge.models.base import Recommender
from recforge.ope.estimators import ESTIMATORS, RewardModel, SlateProbabilities, estimate
from recforge.ope.reward import ClickModel

#: Estimators that need a reward model.
_MODEL_ESTIMATORS = ("dm", "dr", "switch")


def _rounds(users: np.ndarray) -> list[slice]:
    """Consecutive runs of impressions in which no user repeats (asked together, then updated together)."""
    out, start, seen = [], 0, set()
    for i, u in enumerate(users.tolist()):
        if u in seen:
            out.append(slice(start, i))
            start, seen = i, set()
        seen.add(u)
    out.append(slice(start, len(users)))
    return out


def target_probabilities(log: pd.DataFrame, visible: Interactions, target: Policy) -> SlateProbabilities:
    """The probabilities ``target`` (fitted on ``visible``, whose id maps the log uses) gives each logged slate, in
    log order, replaying every session (``session_id``; the whole log is one session without it)."""
    return replay(log, visible, target).probabilities


@dataclass(frozen=True)
class Replayed:
    """A policy replayed over a log, in log order: the probabilities it gives each logged slate, the slate its
    randomness is centred on in each context (a deterministic policy's own slate), and how many items it could
    show there (the catalogue minus the user's history and what the session already showed)."""

    probabilities: SlateProbabilities
    greedy: np.ndarray
    allowed: np.ndarray


def replay(log: pd.DataFrame, visible: Interactions, target: Policy, arrays: ImpressionArrays | None = None) -> Replayed:
    """Walk the log session by session (see the module) asking ``target`` about each logged context;
    ``arrays``: the log's :func:`~recforge.data.impressions.impression_arrays`, when the caller has them."""
    if getattr(target, "n_items_", None) != visible.n_items:
        raise DataError(f"policy {target.name!r} must be fitted on the log's visible data ({visible.n_items} items) "
                        "before it is replayed")
    arrays = impression_arrays(log, visible.user_map, visible.item_map) if arrays is None else arrays
    n, k = arrays.slates.shape
    if k != target.slate_size:
        raise DataError(f"the log's slates hold {k} items, the target policy shows {target.slate_size}")
    order = np.lexsort((log["timestamp"].to_numpy(dtype=np.float64),))
    sessions = log["session_id"].astype(str).to_numpy() if "session_id" in log else np.zeros(n, dtype=str)
    position, prefix = np.empty((n, k)), np.empty((n, k))
    greedy, allowed = np.empty((n, k), np.int64), np.empty(n, np.int64)
    clicked = np.where(arrays.rewards > 0, arrays.slates, -1).max(axis=1)  # the clicked item (one per slate) or -1
    for _, group in pd.DataFrame({"session": sessions[order], "row": order}).groupby("session", sort=False):
        rows = group["row"].to_numpy()
        target.start_episode()
        for part in _rounds(arrays.users[rows]):
            at = rows[part]
            users = arrays.users[at]
            draw, greedy[at], allowed[at] = target.replay_context(users, arrays.slates[at])
            position[at], prefix[at] = draw.position, draw.prefix
            target.update(users, arrays.slates[at], clicked[at])
    return Replayed(SlateProbabilities(position, prefix[:, -1], prefix), greedy, allowed)


def _pseudo_inverse(logger: Replayed | None, logger_policy: Policy | None, own: np.ndarray, slates: np.ndarray,
                    ) -> np.ndarray:
    """The pseudo-inverse weights of a deterministic target's slates ``own``, when the logger is ε-greedy."""
    sampler = None if logger_policy is None else logger_policy.sampler()
    if logger is None or not isinstance(sampler, EpsilonGreedy):
        raise DataError("pi needs the logging policy, ε-greedy (logger=ExploringPolicy(..., EpsilonGreedy(...)) or "
                        "random)")
    return pseudo_inverse_weights(own, slates, logger.greedy, logger.allowed, sampler.epsilon)


def evaluate_targets(
    log: pd.DataFrame,
    visible: Interactions,
    targets: Mapping[str, Policy],
    estimators: Sequence[str] = ("ips", "snips", "iips", "rips"),
    n_boot: int = 1000,
    seed: int = 0,
    reward_model: Recommender | None = None,
    logger: Policy | None = None,
) -> pd.DataFrame:
    """One row per (target, estimator): the estimated value (expected clicks per slate) and its 95% interval,
    from the log and the targets replayed over it (each already fitted on ``visible``; a learning target should be
    frozen, :class:`~recforge.interactive.policies.FrozenPolicy`). ``reward_model`` (a recforge model
    fitted on ``visible``, calibrated to the log by :class:`~recforge.ope.reward.ClickModel`) serves the direct
    method and its doubly robust variants, for deterministic targets; ``logger`` (the logging policy, fitted on
    ``visible``) serves the pseudo-inverse estimator ``pi``, for deterministic targets. Where the log cannot support an estimate
    (e.g. SNIPS when the target gives every logged slate probability 0) the value is NaN and ``note`` says why."""
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise DataError(f"unknown estimator(s) {', '.join(unknown)}; choose from {', '.join(ESTIMATORS)}")
    arrays = impression_arrays(log, visible.user_map, visible.item_map)
    logging = SlateProbabilities(arrays.position, arrays.slate, arrays.prefix)
    clicks = None
    if reward_model is not None and any(e in _MODEL_ESTIMATORS for e in estimators):
        clicks = ClickModel(reward_model).fit(arrays.users, arrays.slates, arrays.rewards)
    logged_q = None if clicks is None else clicks.predict(arrays.users, arrays.slates)
    logged = replay(log, visible, logger, arrays) if logger is not None and "pi" in estimators else None
    rows = []
    for name, policy in targets.items():
        replayed = replay(log, visible, policy, arrays)
        own = replayed.greedy if policy.deterministic else None
        target, model = replayed.probabilities, None
        if logged_q is not None and clicks is not None and own is not None:
            model = RewardModel(logged_q, clicks.predict(arrays.users, own).sum(axis=1))
        for estimator in estimators:
            row = {"target": name, "estimator": estimator, "impressions": len(arrays.users), "note": ""}
            try:
                if estimator in _MODEL_ESTIMATORS and model is None:
                    raise DataError("needs a reward model (--reward-model) and a deterministic target")
                if estimator == "pi":
                    if own is None:
                        raise DataError("pi needs a deterministic target")
                    target = replace(target, pseudo_inverse=_pseudo_inverse(logged, logger, own, arrays.slates))
                est = estimate(estimator, arrays.rewards, logging, target, model, n_boot=n_boot, seed=seed)
                row.update(value=est.value, ci_low=est.ci_low, ci_high=est.ci_high)
            except DataError as exc:  # this log cannot support this estimator for this target: say so in its row
                row.update(value=np.nan, ci_low=np.nan, ci_high=np.nan, note=str(exc))
            rows.append(row)
    return pd.DataFrame(rows, columns=["target", "estimator", "value", "ci_low", "ci_high", "impressions", "note"])
