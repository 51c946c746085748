"""Short import path for the splitters: ``from recforge import split``.

The implementation lives in :mod:`recforge.data.split`.
"""

from recforge.data.split import (
    NextEventSamples,
    Split,
    holdout_one,
    kfold,
    last_n,
    leave_one_out,
    next_event_samples,
    random_split,
    temporal_cut_points,
    temporal_split,
    user_folds_last_n,
    user_split,
    warm_temporal_split,
)

__all__ = [
    "NextEventSamples",
    "Split",
    "holdout_one",
    "kfold",
    "last_n",
    "leave_one_out",
    "next_event_samples",
    "random_split",
    "temporal_cut_points",
    "temporal_split",
    "user_folds_last_n",
    "user_split",
    "warm_temporal_split",
]
