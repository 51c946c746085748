"""Refit a served model on its original data plus the feedback the service logged, for a hot swap.

The new artifact records where in the log its training data ends (``feedback_offsets``), so a service that loads
it (``POST /admin/reload``, SIGHUP, or a restart) replays only the events that came after.
"""

from __future__ import annotations

import logging
import os

import pandas as pd

from recforge.data.interactions import Interactions
from recforge.errors import DataError
from recforge.models.base import Recommender
from recforge.serve.events import Limits, event_problem
from recforge.serve.feedback import FeedbackLog

log = logging.getLogger(__name__)


def refit_with_feedback(artifact: str | os.PathLike[str], data: Interactions,
                        feedback_dir: str | os.PathLike[str]) -> Recommender:
    """A new model of the artifact's kind and parameters, fitted on ``data`` plus every valid event of the
    feedback log (an event without a rating gets the mean rating of ``data`` when ``data`` has ratings)."""
    served = Recommender.load(artifact)
    reader = FeedbackLog(feedback_dir, validate=lambda e: event_problem(e, served, Limits()))
    events, offsets = reader.read_since({})
    frame = data.to_frame()
    if events:
        extra = pd.DataFrame({"user_id": [e["user"] for e in events], "item_id": [e["item"] for e in events]})
        for column, key in (("rating", "rating"), ("timestamp", "timestamp")):
            if column in frame.columns:
                fill = float(frame[column].mean()) if column == "rating" else int(frame[column].max())
                extra[column] = [e.get(key, fill) for e in events]
        if (frame["user_id"].dtype.kind in "iu") != (extra["user_id"].dtype.kind in "iu"):
            raise DataError("the feedback log's ids and the data's ids are of different kinds (integers vs strings)")
        frame = pd.concat([frame, extra], ignore_index=True)
    log.info("refitting %s on %d rows of data and %d feedback events", served.name, len(data), len(events))
    model = type(served)(**served.get_params())
    # side data is indexed by id, which is how from_frame aligns it again to the grown id maps
    model.fit(Interactions.from_frame(frame, item_data=data.item_data, user_data=data.user_data))
    model.feedback_offsets_ = offsets
    return model
