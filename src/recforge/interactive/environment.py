"""The slate-recommendation environment: active users, slates in, clicks or "no click" out, users leave.

API close to notebook 000's competition environment::

    while env.has_next_state():
        user = env.get_state()                  # the active user (dataset user index)
        clicked, stays = env.get_response(slate)  # slate: slate_size distinct item indices
    env.get_score()                             # per-user score of the episode (click-through rate)
    env.reset()                                 # next episode (same users, fresh state, next seed)

and a batched form for vectorised policies: ``get_states()`` returns every user of the current round (each active
user once, in a seeded random order) and ``get_responses(slates)`` answers all of them at once. Both forms draw
from the same seeded generator, so an episode is repeatable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from recforge.data.interactions import Interactions
from recforge.errors import DataError
from recforge.interactive.users import TruePreferences, UserBehaviour

log = logging.getLogger(__name__)


class SlateEnvironment:
    """Users of ``users`` (dataset user indices) answering slates under ``behaviour``.

    ``history``: the visible interactions (the same id maps as the truth); their items count as consumed (showing
    one costs ``consumed_penalty``). ``seed``: episode ``e`` draws from ``seed + e``.
    """

    def __init__(
        self,
        truth: TruePreferences,
        users: np.ndarray,
        history: Interactions,
        behaviour: UserBehaviour | None = None,
        seed: int = 0,
    ) -> None:
        self.truth = truth
        self.behaviour = (behaviour or UserBehaviour()).check()
        self.users = np.asarray(users, dtype=np.int64)
        if len(self.users) == 0:
            raise DataError("an environment needs at least one user")
        if history.n_items != truth.n_items:
            raise DataError(f"history has {history.n_items} items, the true preferences {truth.n_items}")
        if self.behaviour.slate_size > truth.n_items:
            raise DataError(f"slate_size {self.behaviour.slate_size} exceeds the catalogue ({truth.n_items} items)")
        self.n_items = truth.n_items
        self.history = history
        self.seed = seed
        self.episode = -1
        self._slot = {int(u): i for i, u in enumerate(self.users)}
        seen = history.csr("ones")
        self._base_consumed = {
            int(u) * self.n_items + int(i) for u in self.users for i in seen.indices[seen.indptr[u] : seen.indptr[u + 1]]
        }
        self.reset()

    # ------------------------------------------------------------------ episodes
    def reset(self) -> None:
        """Start the next episode: every user active, nothing shown or clicked yet."""
        self.episode += 1
        self.rng = np.random.default_rng(self.seed + self.episode)
        n = len(self.users)
        self.steps = np.zeros(n, np.int64)
        self.clicks = np.zeros(n, np.int64)
        self.misses = np.zeros(n, np.int64)
        self.active = np.ones(n, bool)
        self.clicked_items: list[list[int]] = [[] for _ in range(n)]
        self._shown: dict[int, int] = {}
        self._consumed = set(self._base_consumed)
        self._round = np.zeros(0, np.int64)
        self._cursor = 0
        self.total_steps = 0
        self.step_clicks: list[int] = []  # 1/0 per step in order: the click-through curve

    def has_next_state(self) -> bool:
        """Whether some user is still active."""
        return self._cursor < len(self._round) or bool(self.active.any())

    def _next_round(self) -> None:
        slots = np.flatnonzero(self.active)
        self._round = self.users[self.rng.permutation(slots)]
        self._cursor = 0

    def get_state(self) -> int:
        """The next active user (dataset user index)."""
        if self._cursor >= len(self._round):
            self._next_round()
            if not len(self._round):
                raise DataError("no active user left; check has_next_state() first")
        return int(self._round[self._cursor])

    def get_response(self, slate: object) -> tuple[int, bool]:
        """Show ``slate`` to the current user; returns (clicked item index or -1, whether the user stays)."""
        user = self.get_state()
        clicked, stays = self._respond(np.array([user]), np.atleast_2d(np.asarray(slate)))
        self._cursor += 1
        return int(clicked[0]), bool(stays[0])

    def get_states(self) -> np.ndarray:
        """Every user of the current round not yet served (a new round when it is done): answer them with
        :meth:`get_responses`."""
        if self._cursor >= len(self._round):
            self._next_round()
        return self._round[self._cursor :].copy()

    def get_responses(self, slates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Answer every user returned by :meth:`get_states` (row ``r`` of ``slates`` for user ``r``)."""
        users = self._round[self._cursor :]
        slates = np.asarray(slates)
        if slates.ndim != 2 or len(slates) != len(users):
            raise DataError(f"get_responses expects one slate per pending user: {len(users)} rows, got shape {slates.shape}")
        out = self._respond(users, slates)
        self._cursor = len(self._round)
        return out

    # ------------------------------------------------------------------ the choice model
    def _check_slates(self, slates: np.ndarray) -> np.ndarray:
        size = self.behaviour.slate_size
        if slates.shape[1] != size:
            raise DataError(f"a slate must hold exactly {size} items, got {slates.shape[1]}")
        if slates.dtype.kind not in "iu":
            if slates.dtype.kind == "f" and np.all(np.isfinite(slates)) and np.all(slates == np.round(slates)):
                slates = slates.astype(np.int64)
            else:
                raise DataError(f"slate items must be integer item indices, got dtype {slates.dtype}")
        if slates.min() < 0 or slates.max() >= self.n_items:
            raise DataError(f"slate items must be item indices in [0, {self.n_items}); got an unknown item")
        ordered = np.sort(slates, axis=1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise DataError("a slate must not repeat an item")
        return slates.astype(np.int64)

    def click_probabilities(self, users: np.ndarray, slates: np.ndarray) -> np.ndarray:
        """``(n, 1 + slate_size)`` choice probabilities in the current state: column 0 is "no click", column
        ``1 + p`` the item at position ``p`` (the multinomial logit of :mod:`recforge.interactive.users`)."""
        b = self.behaviour
        users = np.asarray(users, dtype=np.int64)
        slates = self._check_slates(np.atleast_2d(np.asarray(slates)))
        n, size = slates.shape
        keys = users[:, None] * self.n_items + slates
        shown = np.array([self._shown.get(int(k), 0) for k in keys.ravel()], np.float64).reshape(n, size)
        consumed = np.array([int(k) in self._consumed for k in keys.ravel()], bool).reshape(n, size)
        util = (b.beta * self.truth.z(users, slates) - b.position_decay * np.log1p(np.arange(size))[None, :]
                - b.shown_penalty * shown - b.consumed_penalty * consumed)
        logits = np.concatenate([np.full((n, 1), b.no_click), util], axis=1)
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        return prob / prob.sum(axis=1, keepdims=True)

    def _respond(self, users: np.ndarray, slates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = self.behaviour
        slates = self._check_slates(slates)
        n, size = slates.shape
        keys = users[:, None] * self.n_items + slates
        prob = self.click_probabilities(users, slates)
        choice = (prob.cumsum(axis=1) < self.rng.random((n, 1))).sum(axis=1)  # 0 = no click
        choice = np.minimum(choice, size)
        hit = choice > 0
        clicked = np.where(hit, slates[np.arange(n), np.maximum(choice - 1, 0)], -1)
        for k in keys.ravel():
            self._shown[int(k)] = self._shown.get(int(k), 0) + 1
        slots = np.array([self._slot[int(u)] for u in users], np.int64)
        self.steps[slots] += 1
        self.clicks[slots] += hit
        self.misses[slots] = np.where(hit, 0, self.misses[slots] + 1)
        for slot, user, item in zip(slots[hit], users[hit], clicked[hit]):
            self.clicked_items[slot].append(int(item))
            self._consumed.add(int(user) * self.n_items + int(item))
        leaves = (self.misses[slots] >= b.patience) | (self.steps[slots] >= b.horizon)
        if b.leave_after_click > 0:
            leaves |= hit & (self.rng.random(n) < b.leave_after_click)
        self.active[slots[leaves]] = False
        self.total_steps += n
        self.step_clicks.extend(hit.astype(int).tolist())
        return clicked, ~leaves

    # ------------------------------------------------------------------ scores
    def get_score(self) -> np.ndarray:
        """Per-user score of the episode, in the order of ``users``: click-through rate (clicks / slates seen)."""
        return np.divide(self.clicks, self.steps, out=np.zeros(len(self.users)), where=self.steps > 0)

    def clicked_history(self, user: int) -> list[int]:
        """Items ``user`` clicked in this episode, in order."""
        return list(self.clicked_items[self._slot[int(user)]])


@dataclass
class Environments:
    """A training and a testing environment over disjoint users, and what the agent may see before playing."""

    train: SlateEnvironment
    test: SlateEnvironment
    visible: Interactions
    truth: TruePreferences


def make_environments(
    data: Interactions,
    n_train_users: int | None = None,
    n_test_users: int | None = None,
    visible_fraction: float = 0.5,
    min_events: int = 20,
    behaviour: UserBehaviour | None = None,
    truth_model: str = "als",
    popularity: float = 0.3,
    intent: float = 0.7,
    seed: int = 0,
) -> Environments:
    """Training and testing environments from a real dataset.

    The true preferences come from ``truth_model`` fitted on *all* events. Users with at least ``min_events``
    events are split at random into training and testing users (default: a third and two thirds of them, like the
    notebook's 1,000 / 2,000); each of them shows the agent only the first ``visible_fraction`` of their events
    (by time); other users show everything. ``visible`` is what a policy may be fitted on. ``popularity`` and
    ``intent`` shape the hidden preferences (:class:`TruePreferences`): the defaults keep 30% of the shared
    popularity direction and give 70% of each user's taste to a current intent the data does not show.
    """
    if not 0 < visible_fraction <= 1:
        raise DataError(f"visible_fraction must lie in (0, 1], got {visible_fraction!r}")
    counts = data.user_counts()
    eligible = np.flatnonzero(counts >= min_events)
    if len(eligible) < 2:
        raise DataError(f"need at least two users with {min_events}+ events to build environments; lower min_events")
    rng = np.random.default_rng(seed)
    order = rng.permutation(eligible)
    n_train = len(order) // 3 if n_train_users is None else int(n_train_users)
    n_test = len(order) - n_train if n_test_users is None else int(n_test_users)
    if n_train < 1 or n_test < 1 or n_train + n_test > len(order):
        raise DataError(f"{len(order)} eligible users cannot give {n_train} training and {n_test} testing users")
    train_users, test_users = np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_test])
    seqs = data.sequences()
    lengths = np.diff(seqs.offsets)
    position = np.empty(len(data), np.int64)
    position[seqs.positions] = np.arange(len(data)) - np.repeat(seqs.offsets[:-1], lengths)
    in_env = np.zeros(data.n_users, bool)
    in_env[train_users] = in_env[test_users] = True
    keep = np.ceil(visible_fraction * counts).astype(np.int64)
    hidden = in_env[data.users] & (position >= keep[data.users])
    visible = data.subset(~hidden)
    truth = TruePreferences.from_data(data, truth_model, seed=seed, popularity=popularity, intent=intent)
    log.info("environments: %d training and %d testing users; %d of %d events visible",
             n_train, n_test, len(visible), len(data))
    return Environments(
        SlateEnvironment(truth, train_users, visible, behaviour, seed=seed),
        SlateEnvironment(truth, test_users, visible, behaviour, seed=seed + 10_000),
        visible,
        truth,
    )
