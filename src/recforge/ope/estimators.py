"""Off-policy estimators of a target policy's value from logged slates, each with a bootstrap confidence interval.

A log holds, per impression ``i`` (context ``x_i``, the slate ``s_i = (a_i1 … a_ik)`` the logging policy ``μ``
showed, the rewards ``r_ij`` at each position):

- ``μ(a_ij at j | x_i)``: the logging policy's marginal probability of the shown item at its position;
- ``μ(s_i | x_i)``: of the whole slate; ``μ(a_i1 … a_ij | x_i)``: of its first ``j`` items (the prefix).

The target policy ``π`` gives the same three probabilities for the logged slates. The value estimated is the
expected summed reward of a slate, ``V(π) = E_x E_{s∼π(x)} Σ_j r_j`` (the click-through rate when at most one item
of a slate is clicked):

========== =============================================================== ======================================
estimator  per-impression term                                             unbiased when
========== =============================================================== ======================================
``ips``    ``π(s)/μ(s) · Σ_j r_j``                                         ``μ(s) > 0`` wherever ``π(s) > 0``
``snips``  the same, divided by the mean weight ``mean π(s)/μ(s)``         consistent (biased in small logs)
``iips``   ``Σ_j π(a_j at j)/μ(a_j at j) · r_j``                           a position's reward depends on its
                                                                           own item only (Li et al. 2018)
``rips``   ``Σ_j π(a_1…a_j)/μ(a_1…a_j) · r_j``                             a position's reward depends on the
                                                                           items above it only (cascade,
                                                                           McInerney et al. 2020)
``pi``     ``1_tᵀ Γ_μ⁺ 1_s · Σ_j r_j`` (``t``: the target's slate, ``Γ_μ``   the slate's reward is a sum of
           the logger's second moment of slate indicators; Swaminathan    per-(item, position) terms
           et al. 2017)
``dm``     ``q̂_π(x)``: a reward model's prediction for the target         the reward model is right
``dr``     ``q̂_π(x) + Σ_j w_j (r_j − q̂(x, a_j, j))``, ``w_j`` as iips    iips's condition or a right model
``switch`` dr, but positions with ``w_j > τ`` keep only the model's part  (biased; less variance, Wang 2017)
========== =============================================================== ======================================

Every estimate comes with a percentile bootstrap interval over impressions (pairs of numerator and weight for
``snips``). A log that cannot support an estimate — a missing or zero logging probability where the target puts
mass — is refused with a :class:`~recforge.errors.DataError` naming how many impressions are affected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from recforge.errors import DataError
from recforge.evaluation.stats import bootstrap_ci

#: Estimators by name, in the order they are listed.
ESTIMATORS = ("ips", "snips", "iips", "rips", "pi", "dm", "dr", "switch")


@dataclass(frozen=True)
class SlateProbabilities:
    """A policy's probabilities of logged slates: ``position`` (n × k) of each shown item at its position,
    ``slate`` (n) of the whole slate, ``prefix`` (n × k) of the first ``j + 1`` items; None where unknown. A
    target's ``pseudo_inverse`` (n) holds the pseudo-inverse estimator's weight of each impression
    (:func:`~recforge.core.slates.pseudo_inverse_weights`: it needs the logging policy, not only its
    probabilities)."""

    position: np.ndarray | None = None
    slate: np.ndarray | None = None
    prefix: np.ndarray | None = None
    pseudo_inverse: np.ndarray | None = None


@dataclass(frozen=True)
class RewardModel:
    """A direct method's predictions: ``logged`` (n × k) the expected reward of each logged item at its position,
    ``target`` (n) the expected summed reward of the target policy's slate in each context."""

    logged: np.ndarray
    target: np.ndarray


@dataclass(frozen=True)
class Estimate:
    """An estimator's value of a target policy with its confidence interval."""

    estimator: str
    value: float
    ci_low: float
    ci_high: float
    n: int


def _matrix(values: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray:
    if values is None:
        raise DataError(f"{what} are missing from the log; this estimator needs them")
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != shape:
        raise DataError(f"{what} must have shape {shape}, got {arr.shape}")
    missing = np.isnan(arr).reshape(len(arr), -1).any(axis=1)
    if missing.any():
        raise DataError(f"{what} are missing (NaN) for {int(missing.sum())} impressions")
    return arr


def _weights(target: np.ndarray, logging: np.ndarray, what: str) -> np.ndarray:
    """``target / logging``, refusing logging probabilities outside (0, 1] and target ones outside [0, 1]."""
    if ((logging < 0) | (logging > 1)).any():
        raise DataError(f"logging {what} probabilities must lie in (0, 1]")
    zero = logging == 0
    if zero.any():
        unsupported = zero & (target > 0)
        if unsupported.any():
            rows = int(unsupported.reshape(len(unsupported), -1).any(axis=1).sum())
            raise DataError(f"the log cannot support this target: {rows} impressions have a logging {what} "
                            "probability of 0 where the target's is positive")
        raise DataError(f"logging {what} probabilities must lie in (0, 1]: a logged slate cannot have probability 0")
    if ((target < 0) | (target > 1)).any():
        raise DataError(f"target {what} probabilities must lie in [0, 1]")
    return target / logging


class _Inputs:
    """The arrays one estimate needs, checked once."""

    def __init__(self, rewards: np.ndarray, logging: SlateProbabilities, target: SlateProbabilities,
                 model: RewardModel | None) -> None:
        r = np.asarray(rewards, dtype=np.float64)
        if r.ndim != 2 or r.shape[0] == 0:
            raise DataError(f"rewards must be an (impressions × slate size) array with at least one row, got {r.shape}")
        if not np.isfinite(r).all():
            raise DataError("rewards must be finite numbers")
        self.rewards, self.logging, self.target, self.model = r, logging, target, model
        self.n, self.k = r.shape

    def weights(self, kind: str) -> np.ndarray:
        shape = (self.n,) if kind == "slate" else (self.n, self.k)
        mu = _matrix(getattr(self.logging, kind), shape, f"logging {kind} probabilities")
        pi = _matrix(getattr(self.target, kind), shape, f"target {kind} probabilities")
        return _weights(pi, mu, kind)

    def reward_model(self) -> RewardModel:
        if self.model is None:
            raise DataError("this estimator needs a reward model (the direct method's predictions)")
        return RewardModel(_matrix(self.model.logged, (self.n, self.k), "reward model predictions of logged items"),
                           _matrix(self.model.target, (self.n,), "reward model predictions of the target"))


def _ips(x: _Inputs, **_: float) -> np.ndarray:
    return x.weights("slate") * x.rewards.sum(axis=1)


def _iips(x: _Inputs, **_: float) -> np.ndarray:
    return (x.weights("position") * x.rewards).sum(axis=1)


def _rips(x: _Inputs, **_: float) -> np.ndarray:
    return (x.weights("prefix") * x.rewards).sum(axis=1)


def _pi(x: _Inputs, **_: float) -> np.ndarray:
    w = _matrix(x.target.pseudo_inverse, (x.n,), "pseudo-inverse weights")
    if not np.isfinite(w).all():
        raise DataError("pseudo-inverse weights must be finite numbers")
    return w * x.rewards.sum(axis=1)


def _dm(x: _Inputs, **_: float) -> np.ndarray:
    return x.reward_model().target


def _dr(x: _Inputs, tau: float = np.inf, **_: float) -> np.ndarray:
    model = x.reward_model()
    w = x.weights("position")
    w = np.where(w <= tau, w, 0.0)  # switch: where a weight exceeds tau only the model speaks
    return model.target + (w * (x.rewards - model.logged)).sum(axis=1)


_TERMS: dict[str, Callable[..., np.ndarray]] = {
    "ips": _ips, "iips": _iips, "rips": _rips, "pi": _pi, "dm": _dm, "dr": _dr, "switch": _dr,
}


def estimate(
    estimator: str,
    rewards: np.ndarray,
    logging: SlateProbabilities,
    target: SlateProbabilities,
    model: RewardModel | None = None,
    *,
    tau: float = 10.0,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The value of ``target`` estimated from the log by ``estimator`` (one of :data:`ESTIMATORS`), with a
    percentile bootstrap interval over impressions. ``rewards``: n × k rewards of the logged slates; ``tau``: the
    switch estimator's weight threshold."""
    name = str(estimator).strip().lower()
    if name not in ESTIMATORS:
        raise DataError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    if not tau > 0:
        raise DataError(f"tau must be positive, got {tau!r}")
    x = _Inputs(rewards, logging, target, model)
    if name == "snips":
        w = x.weights("slate")
        if not w.sum() > 0:
            raise DataError("snips: the target gives probability 0 to every logged slate; no estimate")
        num = w * x.rewards.sum(axis=1)
        low, high = bootstrap_ci(num, n_boot=n_boot, confidence=confidence, seed=seed, denominators=w)
        return Estimate(name, float(num.sum() / w.sum()), low, high, x.n)
    terms = _TERMS[name](x, tau=tau if name == "switch" else np.inf)
    low, high = bootstrap_ci(terms, n_boot=n_boot, confidence=confidence, seed=seed)
    return Estimate(name, float(terms.mean()), low, high, x.n)
