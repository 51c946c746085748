"""Recording what a policy showed in the simulator, with the slate probabilities, as a logged-impression table
(:mod:`recforge.data.impressions`) for off-policy evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recforge.core.slates import SlateDraw
from recforge.data.idmap import IdMap
from recforge.interactive.environment import SlateEnvironment
from recforge.interactive.policies import Policy


class ImpressionRecorder:
    """Collects rounds of (users, drawn slates, clicks) of one or more policies; :meth:`frame` gives the log.

    ``version`` is written to every row's ``policy_version``; timestamps count slates shown (the simulator's
    clock), request ids are ``<policy>/<episode>/<n>``, session ids ``<policy>/<episode>``.
    """

    def __init__(self, user_map: IdMap, item_map: IdMap, version: str = "") -> None:
        self.user_map, self.item_map, self.version = user_map, item_map, version
        self._parts: list[dict[str, np.ndarray | str | int]] = []
        self._steps = 0

    def __len__(self) -> int:
        return self._steps

    def add(self, policy: str, episode: int, users: np.ndarray, draw: SlateDraw, clicked: np.ndarray) -> None:
        """One round: ``draw`` shown to ``users``; ``clicked`` the clicked item index per user (-1: none)."""
        n = len(users)
        self._parts.append({"policy": policy, "episode": episode, "start": self._steps, "users": np.asarray(users),
                            "slates": draw.slates, "position": draw.position, "prefix": draw.prefix,
                            "reward": (draw.slates == np.asarray(clicked)[:, None]).astype(np.float64)})
        self._steps += n

    def frame(self) -> pd.DataFrame:
        """The recorded impressions in the logged-impression schema (empty when nothing was recorded)."""
        frames = []
        for part in self._parts:
            n, start = len(part["users"]), int(part["start"])  # type: ignore[arg-type]
            steps = np.arange(start, start + n)
            slates = self.item_map.to_ids(part["slates"])
            frames.append(pd.DataFrame({
                "request_id": [f"{part['policy']}/{part['episode']}/{t}" for t in steps],
                "timestamp": steps.astype(np.float64),
                "user_id": self.user_map.to_ids(part["users"]),
                "policy": part["policy"],
                "policy_version": self.version,
                "slate": list(slates),
                "position_propensity": list(part["position"]),
                "slate_propensity": np.asarray(part["prefix"])[:, -1],
                "prefix_propensity": list(part["prefix"]),
                "reward": list(part["reward"]),
                "session_id": f"{part['policy']}/{part['episode']}",
            }))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def log_episodes(logger: Policy, env: SlateEnvironment, episodes: int, recorder: ImpressionRecorder,
                 shadows: dict[str, Policy] | None = None, label: str = "logger") -> dict[str, np.ndarray]:
    """Play ``episodes`` of ``env`` with ``logger``, recording every slate; returns, for each (fitted, static)
    policy of ``shadows``, the exact expected clicks of the slate it would have shown in each logged context, in
    the order recorded (the simulator's choice model, before anyone acts): the truth an off-policy estimate of it
    from this log targets. Shadows are told what the logger showed, as a replay would tell them."""
    shadows = shadows or {}
    truth: dict[str, list[np.ndarray]] = {name: [] for name in shadows}
    for _ in range(episodes):
        env.reset()
        for policy in (logger, *shadows.values()):
            policy.start_episode()
        while env.has_next_state():
            users = env.get_states()
            for name, shadow in shadows.items():
                truth[name].append(1 - env.click_probabilities(users, shadow.act(users))[:, 0])
            draw = logger.act_draw(users)
            clicked, _ = env.get_responses(draw.slates)
            recorder.add(label, env.episode, users, draw, clicked)
            for policy in (logger, *shadows.values()):
                policy.update(users, draw.slates, clicked)
    return {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in truth.items()}
