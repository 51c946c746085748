"""Off-policy evaluation: estimate what a target policy would earn from slates a logging policy showed
(:mod:`recforge.ope.estimators`)."""

from recforge.ope.estimators import ESTIMATORS, Estimate, RewardModel, SlateProbabilities, estimate

__all__ = ["ESTIMATORS", "Estimate", "RewardModel", "SlateProbabilities", "estimate"]
