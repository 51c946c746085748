"""Learning a policy from a log: a recforge model refitted on the logged clicks, each weighted by its inverse
propensity, whose top items become a static slate policy.

A log over-represents what the logging policy liked to show: an ε-greedy ALS shows its own top items four times in
five, so their clicks are many, while a click on an item shown by exploration is rare though it says as much about
the user. Weighting each logged click by ``1 / μ(item at its position)`` — the inverse of the probability the logging
policy showed that item there — makes every (user, item, position) count as if each had been shown equally often:
the inverse-propensity-scored matrix factorisation of Schnabel et al. (2016, "Recommendations as treatments"),
here with any recforge model that takes event weights. The visible history keeps weight 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from recforge.data.impressions import impression_arrays
from recforge.data.interactions import Interactions
from recforge.errors import DataError
from recforge.interactive.policies import GreedyPolicy
from recforge.models.registry import create_model, get_model_class


def weighted_clicks(log: pd.DataFrame, visible: Interactions, clip: float | None = None) -> Interactions:
    """``visible`` (weight 1 per event) plus every click of ``log`` as an event of weight
    ``min(1 / μ(item at its position), clip)`` (no clipping when ``clip`` is None), on ``visible``'s id maps."""
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float, np.number))
                             or not (np.isfinite(clip) and clip >= 1)):
        raise DataError(f"clip must be a number ≥ 1 (or None for no clipping), got {clip!r}")
    arrays = impression_arrays(log, visible.user_map, visible.item_map)
    hit = arrays.rewards > 0
    if not hit.any():
        raise DataError("the log holds no click to learn from")
    weight = 1.0 / arrays.position[hit]
    if clip is not None:
        weight = np.minimum(weight, clip)
    users = np.broadcast_to(arrays.users[:, None], hit.shape)[hit]
    base = np.ones(len(visible), np.float32) if visible.weights is None else visible.weights
    return Interactions(
        np.concatenate([visible.users, users]),
        np.concatenate([visible.items, arrays.slates[hit]]),
        visible.user_map,
        visible.item_map,
        weights=np.concatenate([base, weight]).astype(np.float32),
        item_data=visible.item_data,
        user_data=visible.user_data,
    )


def learn_from_log(
    log: pd.DataFrame,
    visible: Interactions,
    model: str = "als",
    params: dict[str, Any] | None = None,
    clip: float | None = None,
    slate_size: int | None = None,
    seed: int = 0,
) -> GreedyPolicy:
    """A static greedy policy over ``model`` (a recforge model name; ``params`` its settings) fitted on
    :func:`weighted_clicks` of the log, ready to act in the simulator whose visible data is ``visible``."""
    settings = dict(params or {})
    names = get_model_class(model)._param_names()
    if "progress" in names:
        settings.setdefault("progress", False)
    if "seed" in names:
        settings.setdefault("seed", seed)
    fitted = create_model(model, **settings).fit(weighted_clicks(log, visible, clip))
    k = len(log["slate"].iloc[0]) if slate_size is None else slate_size
    return GreedyPolicy(model=fitted, learn=False, slate_size=k, seed=seed).fit(visible)
