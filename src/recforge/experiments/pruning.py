"""Pruning a search's neural trials wherever they run: in this process, in a pool worker or on a Ray actor.

A pruned search runs one trial at a time, so when a trial starts every earlier trial of its study has finished and
the pruner's decisions for it depend on nothing that can still change. A :class:`PruningProbe` therefore carries
a private copy of the Optuna trial (and of its study) to wherever the trial trains: the trainer calls it after
every epoch's validation, it reports the score to the copy and stops the fit when the pruner says so, taking the
same decisions the driver's study would. The driver then replays the probe's ``curve`` into its own study.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

log = logging.getLogger(__name__)


class TrialPruned(Exception):
    """Raised inside a fit when the pruner stops the trial (the trial's result is then marked ``pruned``)."""


class PruningProbe:
    """The training callback of one pruned trial: ``metric`` (``valid_ndcg@10``, say) of every epoch goes to a copy
    of the Optuna ``trial`` taken now, and :class:`TrialPruned` ends the fit when that copy's pruner says so.
    ``curve``: the scores reported, one per epoch. A model that validates on another metric is pruned on the first
    ``valid_`` score it reports, with one warning naming both."""

    def __init__(self, trial: Any, metric: str, model: str) -> None:
        self._trial = copy.deepcopy(trial)  # the study as it is now: later trials of the search cannot change it
        self.metric = metric
        self.model = model
        self.curve: list[float] = []

    def __call__(self, row: dict[str, Any]) -> None:
        """Take one epoch's row of training figures; raise :class:`TrialPruned` to stop the fit."""
        value = row.get(self.metric)
        if value is None:
            key, value = next(((k, v) for k, v in row.items() if k.startswith("valid_")), (None, None))
            if key is not None and not self.curve:
                log.warning("%s reports no %s while training; pruning follows %s instead", self.model, self.metric,
                            key)
        if value is None:
            return
        self.curve.append(float(value))
        self._trial.report(float(value), len(self.curve))
        if self._trial.should_prune():
            raise TrialPruned(f"validation {self.metric} {value:.4f} after {len(self.curve)} epochs")
