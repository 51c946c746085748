"""Evaluation: metrics, batched full ranking, protocols, confidence intervals and leaderboards."""

from recforge.evaluation.evaluator import (
    EvaluationResult,
    evaluate,
    evaluate_next_event,
    evaluate_scores,
    factorized_top_k,
)
from recforge.evaluation.report import leaderboard, print_leaderboard, save_leaderboard, to_markdown
from recforge.evaluation.stats import bootstrap_ci, paired_test

__all__ = [
    "EvaluationResult",
    "bootstrap_ci",
    "evaluate",
    "evaluate_next_event",
    "evaluate_scores",
    "factorized_top_k",
    "leaderboard",
    "paired_test",
    "print_leaderboard",
    "save_leaderboard",
    "to_markdown",
]
