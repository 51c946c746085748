"""The GET /recommend hot path: query shortcut, micro-batching, load shedding, and answers equal to the route's."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from recforge.data import Interactions
from recforge.models import create_model
from recforge.serve import create_app
from recforge.serve.batching import Busy, Overloaded, ScoringQueue
from recforge.serve.fastpath import key_matches, recommend_query


@pytest.fixture(scope="module")
def artifact(planted: Interactions, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batching") / "ease"
    create_model("ease", reg=50.0).fit(planted).save(path)
    return path


# ------------------------------------------------------------------------------------------------- query shortcut
@pytest.mark.parametrize(("query", "expected"), [
    (b"user=7", ("7", 10, True)),
    (b"user=7&k=25&exclude_seen=false", ("7", 25, False)),
    (b"k=1000&user=a%20b&exclude_seen=1", ("a b", 1000, True)),
    (b"user=7&utm=x", ("7", 10, True)),  # parameters the route ignores are ignored here too
])
def test_plain_queries_take_the_shortcut(query: bytes, expected: tuple) -> None:
    assert recommend_query(query, 1000) == expected


@pytest.mark.parametrize("query", [
    b"", b"k=5", b"user=", b"user=" + b"x" * 201, b"user=1&user=2", b"user=1&k=0", b"user=1&k=1001",
    b"user=1&k=010", b"user=1&k=+5", b"user=1&k=1_0", b"user=1&k=", b"user=1&exclude_seen=maybe",
    b"user=1&exclude_seen=TRUE",
])
def test_anything_unusual_is_left_to_the_route(query: bytes) -> None:
    assert recommend_query(query, 1000) is None


def test_keys_compare_as_bytes() -> None:
    assert key_matches("clé".encode(), ["clé".encode()])
    assert not key_matches(None, [b"k"]) and not key_matches(b"", [b"k"]) and not key_matches(b"k2", [b"k"])


def test_shortcut_and_route_give_the_same_answers(artifact: Path, tmp_path: Path) -> None:
    client = TestClient(create_app(artifact, feedback_dir=tmp_path / "fb", apply_seconds=0))
    for user in ("0", "5", "17"):
        fast = client.get(f"/recommend?user={user}&k=7")
        routed = client.get(f"/recommend?user={user}&k=3&k=7")  # a repeated parameter: the route decides (last)
        assert fast.status_code == routed.status_code == 200
        assert fast.json() == routed.json()
        assert len(fast.json()["items"]) == 7
    for query in ("user=999999", "user=1_0", "user=abc", "user=1&k=0"):  # errors are the route's, not a 500
        fast = client.get(f"/recommend?{query}")
        routed = client.get(f"/recommend?{query}&k=5&k={query.split('k=')[1] if 'k=' in query else 5}")
        assert fast.status_code == routed.status_code and fast.status_code in (404, 422)
        assert set(fast.json()) == {"detail"}


def test_keys_guard_the_shortcut_too(artifact: Path, tmp_path: Path) -> None:
    client = TestClient(create_app(artifact, feedback_dir=tmp_path / "fb", api_key="w", read_key="r"))
    assert client.get("/recommend?user=1").status_code == 401
    assert client.get("/recommend?user=1", headers={"X-API-Key": "nope"}).status_code == 401
    assert client.get("/recommend?user=1", headers={"X-API-Key": "r"}).status_code == 200
    assert client.get("/recommend?user=1&exclude_seen=false", headers={"X-API-Key": "r"}).status_code == 403


def test_overloaded_service_answers_503_at_once(artifact: Path, tmp_path: Path) -> None:
    app = create_app(artifact, feedback_dir=tmp_path / "fb", overload_seconds=0.05)
    with TestClient(app) as client:  # one event loop for every request
        assert client.get("/recommend?user=1").status_code == 200  # starts the lag ticker on that loop
        scorer = app.state.service.scorer
        scorer.max_lag = -1.0  # whatever the lag measured, it is too much
        for url in ("/recommend?user=1", "/recommend?user=1&k=3&k=3"):  # shortcut and route
            r = client.get(url)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and "behind" in r.json()["detail"]
        assert scorer.shed == 2
        scorer.max_lag = 10.0
        assert client.get("/recommend?user=1").status_code == 200


# ------------------------------------------------------------------------------------------------- the queue itself
def _fake_scores(calls: list[np.ndarray]):  # type: ignore[no-untyped-def]
    def score(state, users: np.ndarray, k: int, exclude_seen: bool):  # type: ignore[no-untyped-def]
        calls.append(users.copy())
        items = np.tile(np.arange(k, dtype=np.int32), (len(users), 1)) + users[:, None].astype(np.int32)
        return items, items.astype(np.float32)
    return score


def test_requests_of_one_loop_turn_are_scored_in_one_call() -> None:
    calls: list[np.ndarray] = []
    queue = ScoringQueue(_fake_scores(calls))

    async def main() -> list:
        return await asyncio.gather(*(queue.submit("state", u, k, True) for u, k in ((3, 2), (5, 4), (9, 1))))

    results = asyncio.run(main())
    assert [c.tolist() for c in calls] == [[3, 5, 9]]  # one call, at the largest k
    assert [r[0].tolist() for r in results] == [[3, 4], [5, 6, 7, 8], [9]]


def test_groups_by_model_and_exclusion() -> None:
    calls: list[np.ndarray] = []
    queue = ScoringQueue(_fake_scores(calls))

    async def main() -> None:
        await asyncio.gather(queue.submit("a", 1, 1, True), queue.submit("b", 2, 1, True),
                             queue.submit("a", 3, 1, False), queue.submit("a", 4, 1, True))

    asyncio.run(main())
    assert sorted(c.tolist() for c in calls) == [[1, 4], [2], [3]]


def test_a_busy_model_is_retried_and_errors_reach_their_requests() -> None:
    attempts = {"n": 0}

    def score(state, users, k, exclude_seen):  # type: ignore[no-untyped-def]
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise Busy
        if state == "broken":
            raise ValueError("boom")
        return np.zeros((len(users), k), np.int32), np.zeros((len(users), k), np.float32)

    queue = ScoringQueue(score)

    async def main() -> tuple:
        ok = queue.submit("fine", 1, 2, True)
        items, _ = await ok
        with pytest.raises(ValueError, match="boom"):
            await queue.submit("broken", 1, 2, True)
        return items

    assert asyncio.run(main()).shape == (2,)
    assert attempts["n"] == 4  # two busy tries, then one call per batch


def test_shedding_raises_overloaded_without_scoring() -> None:
    calls: list[np.ndarray] = []
    queue = ScoringQueue(_fake_scores(calls), max_lag=0.05)

    async def main() -> None:
        await queue.submit("s", 1, 1, True)
        queue.max_lag = -1.0  # any measured lag is too much
        with pytest.raises(Overloaded):
            queue.submit("s", 2, 1, True)

    asyncio.run(main())
    assert len(calls) == 1 and queue.shed == 1


async def _stall(seconds: float) -> None:
    """Block the event loop, then let its overdue lag ticker run once."""
    time.sleep(seconds)  # noqa: ASYNC251 - the stall is the point
    for _ in range(2):  # the overdue timer becomes ready in the next loop iteration, behind this task
        await asyncio.sleep(0)


def test_after_a_hold_the_backlog_is_served_late_for_the_grace_then_shed_again() -> None:
    calls: list[np.ndarray] = []
    queue = ScoringQueue(_fake_scores(calls), max_lag=0.05)

    async def main() -> None:
        await queue.submit("s", 1, 1, True)
        queue.holding += 1  # a hot swap loads
        await _stall(0.2)  # the loop is blocked: far behind when the ticker next runs
        assert queue.lag > queue.max_lag
        queue.submit("s", 2, 1, True)  # queued while holding, not shed
        queue.release(grace=0.5)
        await _stall(0.2)  # the backlog: the loop runs behind again right after the swap
        assert queue.lag > queue.max_lag
        queue.submit("s", 3, 1, True)  # within the grace: still served
        await asyncio.sleep(0.35)
        await _stall(0.2)
        with pytest.raises(Overloaded):  # after the grace a backlog is an overload again
            queue.submit("s", 4, 1, True)

    asyncio.run(main())
    assert queue.shed == 1 and queue.holding == 0
