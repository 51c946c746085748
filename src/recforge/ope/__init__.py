"""Off-policy evaluation: estimate what a target policy would earn from slates a logging policy showed
(:mod:`recforge.ope.estimators`), replaying target policies over a log (:mod:`recforge.ope.replay`)."""

from recforge.ope.estimators import ESTIMATORS, Estimate, RewardModel, SlateProbabilities, estimate
from recforge.ope.replay import evaluate_targets, target_probabilities

__all__ = ["ESTIMATORS", "Estimate", "RewardModel", "SlateProbabilities", "estimate", "evaluate_targets",
           "target_probabilities"]
