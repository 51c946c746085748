"""Off-policy estimates as the log grows: a table of every (target, estimator, log size) and its plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from recforge.data.interactions import Interactions
from recforge.data.io import save_figure
from recforge.errors import DataError
from recforge.interactive.policies import Policy
from recforge.models.base import Recommender
from recforge.ope.replay import evaluate_targets

#: Log sizes reported by default (those up to the log's length, and the whole log).
LOG_SIZES = (1_000, 10_000, 100_000)


def log_sizes(n: int, sizes: Sequence[int] = LOG_SIZES) -> list[int]:
    """The sizes below ``n`` and ``n`` itself, increasing."""
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
        raise DataError(f"log sizes must be positive integers, got {list(sizes)}")
    return sorted({int(s) for s in sizes if s < n} | {n})


def estimates_by_log_size(
    log: pd.DataFrame,
    visible: Interactions,
    targets: Mapping[str, Policy],
    estimators: Sequence[str],
    sizes: Sequence[int] = LOG_SIZES,
    n_boot: int = 1000,
    seed: int = 0,
    reward_model: Recommender | None = None,
    logger: Policy | None = None,
) -> pd.DataFrame:
    """:func:`~recforge.ope.replay.evaluate_targets` on the first ``size`` impressions (by time) of the log, for
    every size of :func:`log_sizes`; ``targets`` (and the ``logger``, for ``pi``) are fitted (replaying restarts
    them at every session)."""
    ordered = log.sort_values("timestamp", kind="stable").reset_index(drop=True)
    parts = []
    for size in log_sizes(len(ordered), sizes):
        parts.append(evaluate_targets(ordered.iloc[:size], visible, targets, estimators, n_boot=n_boot, seed=seed,
                                      reward_model=reward_model, logger=logger))
    return pd.concat(parts, ignore_index=True)


def plot_estimates(table: pd.DataFrame, path: str | Path) -> Path:
    """One panel per target: each estimator's estimate and 95% interval against the log size (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(table["target"]))
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 3.6), squeeze=False, sharey=True)
    for ax, target in zip(axes[0], targets):
        rows = table[table["target"] == target]
        for estimator, group in rows.groupby("estimator", sort=False):
            ax.errorbar(group["impressions"], group["value"], capsize=3, marker="o", label=estimator,
                        yerr=[group["value"] - group["ci_low"], group["ci_high"] - group["value"]])
        ax.set_xscale("log")
        ax.set_title(target)
        ax.set_xlabel("logged impressions")
    axes[0][0].set_ylabel("estimated clicks per slate")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
