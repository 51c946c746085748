"""Off-policy evaluation and learning: estimate what a target policy would earn from slates a logging policy showed
(:mod:`recforge.ope.estimators`), replaying target policies over a log (:mod:`recforge.ope.replay`), and learn a
better policy from the log (:mod:`recforge.ope.learning`)."""

from recforge.ope.estimators import ESTIMATORS, Estimate, RewardModel, SlateProbabilities, estimate
from recforge.ope.learning import learn_from_log, weighted_clicks
from recforge.ope.replay import evaluate_targets, target_probabilities

__all__ = ["ESTIMATORS", "Estimate", "RewardModel", "SlateProbabilities", "estimate", "evaluate_targets",
           "learn_from_log", "target_probabilities", "weighted_clicks"]
