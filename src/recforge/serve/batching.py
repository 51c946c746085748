"""Micro-batched scoring for ``GET /recommend``: the requests of one event-loop turn become one model call.

A request queues its user and awaits a future; the first request of a loop turn schedules a flush behind the
turn's other callbacks, so every request whose bytes arrived in the same turn is scored by one
``score(state, users, k, exclude_seen)`` call per (loaded model, ``exclude_seen``) group. No timer gathers requests:
an idle service answers at once, a busy one batches more. Scoring runs on the event loop itself: on a measured
2-core machine a scoring thread was slower, because every GIL hand-over between it and the loop cost up to a
switch interval.

Over capacity the service sheds load instead of queueing for seconds: a ticker measures how late the loop runs
(smoothed over a few ticks), and while it runs more than ``max_lag`` seconds behind, new requests are answered :class:`Overloaded` (HTTP 503)
without being scored, which costs a fraction of a scored answer and lets the loop catch up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: ``score(state, users, k, exclude_seen)`` → item indices and scores, one row of ``k`` per user.
ScoreFn = Callable[[Any, np.ndarray, int, bool], tuple[np.ndarray, np.ndarray]]
Result = tuple[np.ndarray, np.ndarray]
_TICK = 0.01  # seconds between two lag measurements
_RETRY = 0.001  # seconds before scoring a busy model's jobs again


class Overloaded(Exception):
    """The service runs behind: the request was not scored (answered 503 with ``Retry-After``)."""


class Busy(Exception):
    """Raised by a score function whose model is being updated: its jobs are tried again a moment later, so the
    event loop never waits for a lock."""


@dataclass
class _Job:
    state: Any
    user: int
    k: int
    exclude_seen: bool
    future: asyncio.Future[Result]


class ScoringQueue:
    """Single-user scoring requests, served in one batch per event-loop turn."""

    def __init__(self, score: ScoreFn, max_lag: float = 0.1) -> None:
        self.score, self.max_lag = score, max_lag
        self.lag = 0.0  # how late the loop ran at the last tick, in seconds
        self.shed = 0  # requests answered Overloaded
        self.holding = 0  # while positive (a hot swap is loading), requests queue instead of being shed
        self._grace_until = 0.0  # after a hold: no shedding until then
        self._jobs: list[_Job] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False

    def submit(self, state: Any, user: int, k: int, exclude_seen: bool) -> asyncio.Future[Result]:
        """Queue one user; the future gives ``(items, scores)`` (length ``k`` at most, ``-1`` padded). Raises
        :class:`Overloaded` at once while the loop runs too far behind. Call from the event loop."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new loop (tests): measure this one
            self._loop, self.lag = loop, 0.0
            loop.call_later(_TICK, self._tick, loop, loop.time() + _TICK)
        if self.lag > self.max_lag and not self.holding and loop.time() >= self._grace_until:
            self.shed += 1
            raise Overloaded(f"the service runs {self.lag * 1e3:.0f} ms behind")
        future: asyncio.Future[Result] = loop.create_future()
        self._jobs.append(_Job(state, user, k, exclude_seen, future))
        self._schedule(loop)
        return future

    def release(self, grace: float) -> None:
        """End a hold (``holding -= 1``). What queued meanwhile is a transient backlog, not an overload: requests
        are served late, not shed, for ``grace`` more seconds. (Ending the grace once the loop looked caught up
        was tried: the backlog still in the sockets then arrived and was shed.)"""
        self.holding -= 1
        if not self.holding and self._loop is not None:
            self.lag = 0.0
            self._grace_until = self._loop.time() + grace

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float = 0.0) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if delay:
                loop.call_later(delay, self._flush)
            else:
                loop.call_soon(self._flush)

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if loop is not self._loop:
            return  # a newer loop took over: let this ticker stop
        now = loop.time()
        # smoothed, so one long turn (a hot swap) does not shed what a sustained backlog would
        self.lag = 0.5 * self.lag + 0.5 * max(0.0, now - due)
        loop.call_later(_TICK, self._tick, loop, now + _TICK)

    def _flush(self) -> None:
        self._flush_scheduled = False
        jobs, self._jobs = [j for j in self._jobs if not j.future.done()], []
        for job, outcome in self._score(jobs):
            if isinstance(outcome, Busy):
                self._jobs.append(job)
                self._schedule(job.future.get_loop(), _RETRY)
            elif isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _score(self, jobs: list[_Job]) -> list[tuple[_Job, Result | BaseException]]:
        """One model call per (state, exclude_seen) group, at the group's largest ``k``."""
        groups: dict[tuple[int, bool], list[_Job]] = {}
        for job in jobs:
            groups.setdefault((id(job.state), job.exclude_seen), []).append(job)
        out: list[tuple[_Job, Result | BaseException]] = []
        for group in groups.values():
            users = np.fromiter((j.user for j in group), np.int64, len(group))
            try:
                items, scores = self.score(group[0].state, users, max(j.k for j in group), group[0].exclude_seen)
            except Exception as exc:  # noqa: BLE001 - answered per request (500); the next batch is scored anew
                out.extend((job, exc) for job in group)
                continue
            out.extend((job, (items[r, : job.k], scores[r, : job.k])) for r, job in enumerate(group))
        return out
