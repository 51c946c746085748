"""Evaluation: batched full ranking, the protocol registry, confidence intervals and leaderboards."""

from recforge.evaluation.evaluator import (
    EvaluationResult,
    evaluate,
    evaluate_next_event,
    evaluate_scores,
    factorized_top_k,
)
from recforge.evaluation.protocols import (
    PROTOCOLS,
    Protocol,
    available_protocols,
    get_protocol,
    merge_results,
)
from recforge.evaluation.report import leaderboard, print_leaderboard, save_leaderboard, to_markdown
from recforge.evaluation.stats import bootstrap_ci, paired_test

__all__ = [
    "PROTOCOLS",
    "EvaluationResult",
    "Protocol",
    "available_protocols",
    "bootstrap_ci",
    "evaluate",
    "evaluate_next_event",
    "evaluate_scores",
    "factorized_top_k",
    "get_protocol",
    "leaderboard",
    "merge_results",
    "paired_test",
    "print_leaderboard",
    "save_leaderboard",
    "to_markdown",
]
