"""Impressions of an exploring service: what ``GET /recommend`` showed, with the probabilities off-policy evaluation
needs, durable before the answer leaves, and joined with the feedback that names its request.

With ``explore`` set (``recforge serve --explore epsilon:0.1``), each ``GET /recommend`` answer is the model's
top-k with probability ``1 − ε``, else ``k`` items drawn uniformly from those the user may be shown
(:class:`~recforge.core.slates.EpsilonGreedy`), and carries a ``request_id``. Its impression — request id, user,
slate, the probability of each item at its position, of each prefix and of the whole slate, the policy and the
artifact serving — goes to ``<feedback dir>/impressions`` through the same fsync'd, checksummed, segment-per-writer
log as feedback (:class:`~recforge.serve.feedback.FeedbackLog`). Feedback events that carry the ``request_id``
(``POST /feedback``) are the impression's clicks: :func:`impression_frame` joins both logs into the
logged-impression table of :mod:`recforge.data.impressions`, which ``recforge ope`` reads.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recforge.core.slates import EpsilonGreedy, SlateDraw
from recforge.data.impressions import check_impressions
from recforge.errors import DataError
from recforge.serve.events import REQUEST_ID
from recforge.serve.feedback import FeedbackLog, GroupCommitter

log = logging.getLogger(__name__)

_FIELDS = {"request_id", "timestamp", "user", "policy", "policy_version", "slate", "position_propensity",
           "prefix_propensity", "slate_propensity"}


def parse_explore(spec: str | None) -> float | None:
    """``"none"`` (or None) → None; ``"epsilon:E"`` with ``E`` in (0, 1] → ``E``; anything else a one-line error."""
    text = "none" if spec is None else str(spec).strip().lower()
    if text == "none":
        return None
    kind, _, value = text.partition(":")
    try:
        epsilon = float(value) if kind == "epsilon" else float("nan")
    except ValueError:
        epsilon = float("nan")
    if not 0 < epsilon <= 1:
        raise DataError(f"explore must be 'none' or 'epsilon:E' with E in (0, 1] (e.g. epsilon:0.1), got {spec!r}")
    return epsilon


def impressions_dir(feedback_dir: str | os.PathLike[str]) -> Path:
    """Where a service with this feedback folder logs its impressions."""
    return Path(feedback_dir) / "impressions"


class Explorer:
    """Draws exploring slates and makes each impression durable (see the module)."""

    def __init__(self, epsilon: float, feedback_dir: str | os.PathLike[str]) -> None:
        self.epsilon = epsilon
        self.log = FeedbackLog(impressions_dir(feedback_dir))
        self.writer = GroupCommitter(self.log)
        self.rng = np.random.default_rng(secrets.randbits(64))

    def draw(self, greedy: np.ndarray, n_items: int, excluded: np.ndarray) -> SlateDraw:
        """One slate around ``greedy`` (k item indices), never showing ``excluded`` (sorted distinct indices)."""
        k = len(greedy)
        ptr = np.array([0, len(excluded)], np.int64)
        return EpsilonGreedy(k, self.epsilon).draw(greedy[None, :], self.rng, n_items, ptr, excluded.astype(np.int64))

    def record(self, user: Any, items: list[Any], draw: SlateDraw, policy: str, version: str) -> Any:
        """Write the impression (a future that resolves once it is on disk) and return it with its request id."""
        request_id = secrets.token_hex(16)
        row = {"request_id": request_id, "timestamp": time.time(), "user": user, "policy": policy,
               "policy_version": version, "slate": items,
               "position_propensity": draw.position[0].tolist(), "prefix_propensity": draw.prefix[0].tolist(),
               "slate_propensity": float(draw.slate[0])}
        return request_id, self.writer.submit([row])

    def close(self) -> None:
        """Stop the writer and close the log."""
        self.writer.close()


def _impression_problem(row: dict[str, Any]) -> str | None:
    """Why a replayed impression record is unusable, or None (the table's own checks follow in
    :func:`~recforge.data.impressions.check_impressions`)."""
    if set(row) != _FIELDS:
        return f"impression fields differ from {sorted(_FIELDS)}"
    if not isinstance(row["request_id"], str) or not REQUEST_ID.fullmatch(row["request_id"]):
        return "bad request id"
    if not isinstance(row["slate"], list) or not row["slate"]:
        return "bad slate"
    return None


def impression_frame(feedback_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The service's impressions joined with the feedback events that carry their request id, in the
    logged-impression schema: ``reward[j]`` is 1 where an event names the item at position ``j``. Damaged or
    unusable records are skipped with a warning; a feedback event naming an unknown request is ignored."""
    folder = impressions_dir(feedback_dir)
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist: the service logs impressions only with --explore")
    rows = list(FeedbackLog(folder, validate=_impression_problem).replay())
    if not rows:
        raise DataError(f"{folder} holds no impression")
    clicks: dict[str, set[str]] = {}
    for event in FeedbackLog(feedback_dir).replay():
        request = event.get("request_id")
        if isinstance(request, str):
            clicks.setdefault(request, set()).add(str(event.get("item")))
    frame = pd.DataFrame(rows).rename(columns={"user": "user_id"})
    frame = frame.drop_duplicates("request_id", keep="first")
    frame["reward"] = [[1.0 if str(item) in clicks.get(r, ()) else 0.0 for item in slate]
                       for r, slate in zip(frame["request_id"], frame["slate"])]
    unmatched = set(clicks) - set(frame["request_id"])
    if unmatched:
        log.warning("%d feedback request ids match no logged impression; ignored", len(unmatched))
    frame = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    frame["session_id"] = frame["request_id"]
    return check_impressions(frame)
