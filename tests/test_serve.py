"""The HTTP service: through the ASGI test client, one real uvicorn process, and kill -9 durability."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from recforge.cli import app
from recforge.core.slates import EpsilonGreedy
from recforge.data import Interactions
from recforge.data.impressions import read_impressions
from recforge.errors import DataError
from recforge.models import create_model
from recforge.serve import FeedbackLog, create_app
from recforge.serve.feedback import decode_line, encode_record
from recforge.serve.impressions import impression_frame


@pytest.fixture(scope="module")
def artifact(planted: Interactions, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "ease"
    create_model("ease", reg=50.0).fit(planted).save(path)
    return path


@pytest.fixture()
def client(artifact: Path, tmp_path: Path) -> TestClient:
    # reads with the read key by default; writes need the write key
    return TestClient(create_app(artifact, feedback_dir=tmp_path / "fb", api_key="s3cret", read_key="r3ad",
                                 max_body_bytes=4096, apply_seconds=0), headers={"X-API-Key": "r3ad"})


# ---------------------------------------------------------------------------------------------------- feedback log
def test_records_round_trip_and_damage_is_detected() -> None:
    line = encode_record({"user": 1, "item": "a"})
    assert decode_line(line) == {"item": "a", "user": 1}
    assert decode_line(line[:-1]) is None  # no newline: half-written
    assert decode_line(line.replace(b'"a"', b'"b"')) is None  # checksum mismatch
    assert decode_line(b"garbage\n") is None


def test_log_replays_skipping_a_half_written_last_record(tmp_path: Path, caplog) -> None:
    log = FeedbackLog(tmp_path)
    assert log.append([{"user": 1, "item": 2}, {"user": 1, "item": 3}]) == 2
    log.close()
    segment = log.segments()[0]
    with open(segment, "ab") as fh:
        fh.write(encode_record({"user": 9, "item": 9})[:12])  # a crash in the middle of a write
    with caplog.at_level(logging.WARNING):
        events = list(FeedbackLog(tmp_path).replay())
    assert events == [{"user": 1, "item": 2}, {"user": 1, "item": 3}]
    assert "half-written" in caplog.text


def test_other_writers_records_are_read_incrementally(tmp_path: Path) -> None:
    reader, writer = FeedbackLog(tmp_path), FeedbackLog(tmp_path)
    assert list(reader.replay()) == []
    writer.append([{"user": 1, "item": 1}])
    assert reader.read_new() == [{"user": 1, "item": 1}]
    assert reader.read_new() == []
    writer.append([{"user": 2, "item": 2}])
    assert reader.read_new() == [{"user": 2, "item": 2}]
    assert writer.read_new() == []  # a writer does not re-read its own records


# ---------------------------------------------------------------------------------------------------- endpoints
def test_recommend_similar_and_health(client: TestClient, planted: Interactions) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "ease" and health["items"] == planted.n_items
    user = int(planted.user_map.ids[3])
    recs = client.get("/recommend", params={"user": user, "k": 5}).json()
    items = [r["item_id"] for r in recs["items"]]
    assert len(items) == 5 and [r["rank"] for r in recs["items"]] == [1, 2, 3, 4, 5] and "title" in recs["items"][0]
    seen = set(planted.to_frame().query("user_id == @user")["item_id"])
    assert not seen & set(items)
    session = client.post("/recommend", json={"items": items[:2], "k": 3}).json()["items"]
    assert len(session) == 3 and not {r["item_id"] for r in session} & set(items[:2])
    sim = client.get(f"/similar/{items[0]}", params={"k": 4}).json()["items"]
    assert len(sim) == 4 and items[0] not in [r["item_id"] for r in sim]
    assert client.get("/docs").status_code == 200 and "/feedback" in client.get("/openapi.json").text


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "message"),
    [
        ("get", "/recommend", {"params": {"user": 999999}}, 404, "unknown user"),
        ("get", "/recommend", {"params": {"user": 1, "k": 0}}, 422, "k: Input should be greater"),
        ("get", "/recommend", {"params": {"user": 1, "k": 1001}}, 422, "k: Input should be less"),
        ("get", "/recommend", {"params": {"user": "abc"}}, 422, "integers"),
        ("get", "/recommend", {}, 422, "user: Field required"),
        ("get", "/similar/424242", {}, 404, "unknown item"),
        ("post", "/recommend", {"json": {"items": [1], "k": 5, "bogus": 1}}, 422, "bogus"),
        ("post", "/feedback", {"json": {"events": []}, "headers": {"X-API-Key": "s3cret"}}, 422, "events"),
        ("post", "/feedback", {"json": {"events": [{"user": 1, "item": 1}]}}, 401, "X-API-Key"),
        ("post", "/feedback", {"json": {"events": [{"user": 1, "item": 1}]}, "headers": {"X-API-Key": "wrong"}}, 401, "X-API-Key"),
        ("post", "/recommend", {"content": b"[" + b"1," * 4000 + b"1]", "headers": {"content-type": "application/json"}}, 413, "larger"),
    ],
)
def test_bad_requests_get_clear_4xx(client: TestClient, method: str, url: str, kwargs: dict, status: int, message: str) -> None:
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_unexpected_errors_are_500_without_a_trace(client: TestClient, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(client.app.state.service.model, "score", boom)
    response = TestClient(client.app, raise_server_exceptions=False, headers={"X-API-Key": "r3ad"}).get(
        "/recommend", params={"user": 1})
    assert response.status_code == 500 and response.json() == {"detail": "internal error"}
    assert "secret" not in response.text


def test_feedback_is_logged_and_applied_at_once(client: TestClient, planted: Interactions, tmp_path: Path) -> None:
    key = {"X-API-Key": "s3cret"}
    user = int(planted.user_map.ids[3])
    top = client.get("/recommend", params={"user": user, "k": 3}).json()["items"][0]["item_id"]
    ack = client.post("/feedback", json={"events": [{"user": user, "item": top, "rating": 5}]}, headers=key).json()
    assert ack == {"accepted": 1, "applied": 1, "excluded": 0, "kept": 0, "outcomes": ["applied"], "total": 1}
    after = [r["item_id"] for r in client.get("/recommend", params={"user": user, "k": 3}).json()["items"]]
    assert top not in after  # seen at once
    # a brand-new user becomes known through feedback (EASE folds it in)
    items = [int(i) for i in planted.item_map.ids[:5]]
    client.post("/feedback", json={"events": [{"user": 777777, "item": i} for i in items]}, headers=key)
    recs = client.get("/recommend", params={"user": 777777, "k": 5}).json()["items"]
    assert len(recs) == 5 and not {r["item_id"] for r in recs} & set(items)
    logged = list(FeedbackLog(tmp_path / "fb").replay())
    assert len(logged) == 6 and logged[0]["item"] == top and "timestamp" in logged[0]
    metrics = client.get("/metrics").text
    assert 'recforge_requests_total{endpoint="feedback",status="200"} 2.0' in metrics
    assert "recforge_request_seconds_bucket" in metrics


def test_background_application_excludes_at_once_and_learns_soon(artifact: Path, planted: Interactions,
                                                                 tmp_path: Path) -> None:
    client = TestClient(create_app(artifact, feedback_dir=tmp_path / "fb", apply_seconds=0.05))
    user = int(planted.user_map.ids[3])
    top = client.get("/recommend", params={"user": user, "k": 3}).json()["items"][0]["item_id"]
    items = [int(i) for i in planted.item_map.ids[:5]]
    events = [{"user": user, "item": top}] + [{"user": 888888, "item": i} for i in items]
    assert client.post("/feedback", json={"events": events}).json()["accepted"] == 6
    assert top not in [r["item_id"] for r in client.get("/recommend", params={"user": user, "k": 3}).json()["items"]]
    deadline = time.monotonic() + 5  # the new user appears once the micro-batch is applied
    while client.get("/recommend", params={"user": 888888}).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.get("/recommend", params={"user": 888888, "k": 3}).status_code == 200
    assert client.get("/health").json()["feedback_events"] == 6


def test_models_without_partial_fit_still_exclude_feedback(planted: Interactions, tmp_path: Path) -> None:
    path = tmp_path / "tt"
    create_model("twotower", epochs=1, num_threads=1, progress=False).fit(planted).save(path)
    client = TestClient(create_app(path, feedback_dir=tmp_path / "fb"))
    user = int(planted.user_map.ids[0])
    top = client.get("/recommend", params={"user": user, "k": 1}).json()["items"][0]["item_id"]
    events = [{"user": user, "item": top}, {"user": 555555, "item": top}]  # a user the model cannot learn online
    ack = client.post("/feedback", json={"events": events}).json()
    assert ack["outcomes"] == ["excluded", "kept"] and ack["kept"] == 1
    assert top not in [r["item_id"] for r in client.get("/recommend", params={"user": user, "k": 5}).json()["items"]]
    # and after a restart, from the log alone
    again = TestClient(create_app(path, feedback_dir=tmp_path / "fb"))
    assert again.get("/health").json()["feedback_events"] == 2
    assert top not in [r["item_id"] for r in again.get("/recommend", params={"user": user, "k": 5}).json()["items"]]


# ---------------------------------------------------------------------------------------------------- real process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(artifact: Path, port: int, feedback: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RECFORGE_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recforge", "serve", str(artifact), "--port", str(port), "--feedback-dir", str(feedback),
         *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "server exited")
    proc.kill()
    raise AssertionError("server did not start")


def test_acknowledged_feedback_survives_kill_9(artifact: Path, planted: Interactions, tmp_path: Path) -> None:
    port, feedback = _free_port(), tmp_path / "fb"
    proc = _start(artifact, port, feedback)
    base = f"http://127.0.0.1:{port}"
    acked = 0
    user = int(planted.user_map.ids[7])
    items = [int(i) for i in planted.item_map.ids[np.arange(40)]]
    try:
        for batch in range(8):
            events = [{"user": user, "item": items[5 * batch + j]} for j in range(5)]
            r = httpx.post(f"{base}/feedback", json={"events": events}, headers={"X-API-Key": "k"}, timeout=10)
            assert r.status_code == 200
            acked += r.json()["accepted"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    segment = max(feedback.glob("feedback-*.log"))
    with open(segment, "ab") as fh:  # what a crash in the middle of the next write leaves behind
        fh.write(encode_record({"user": user, "item": 123})[:15])
    proc = _start(artifact, port, feedback)
    try:
        health = httpx.get(f"{base}/health", timeout=5).json()
        assert health["feedback_events"] == acked == 40
        recs = httpx.get(f"{base}/recommend", params={"user": user, "k": 50}, headers={"X-API-Key": "k"},
                         timeout=5).json()["items"]
        assert not {r["item_id"] for r in recs} & set(items)  # every acknowledged event is applied again
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_metrics_of_several_workers_are_merged(artifact: Path, planted: Interactions, tmp_path: Path) -> None:
    port = _free_port()
    proc = _start(artifact, port, tmp_path / "fb", "--workers", "2")
    base, key = f"http://127.0.0.1:{port}", {"X-API-Key": "k"}
    try:
        user = int(planted.user_map.ids[0])
        for _ in range(30):  # new connections: the kernel spreads them over both workers
            assert httpx.get(f"{base}/recommend", params={"user": user}, headers=key, timeout=10).status_code == 200
        for _ in range(4):  # whichever worker answers, it reports both workers' requests
            text = httpx.get(f"{base}/metrics", headers=key, timeout=10).text
            assert 'recforge_requests_total{endpoint="recommend",status="200"} 30.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


# ---------------------------------------------------------------------------------------------------- exploring
def test_an_exploring_service_logs_impressions_that_feedback_joins(artifact: Path, planted: Interactions,
                                                                   tmp_path: Path) -> None:
    """With ``explore="epsilon:0.5"`` every answer carries a request id and is logged (durably) with the
    probabilities of :class:`EpsilonGreedy`; feedback naming the request id is the impression's click at the
    clicked item's position; the exported table is a valid log that ``recforge ope`` reads."""
    folder = tmp_path / "fb"
    service = TestClient(create_app(artifact, feedback_dir=folder, api_key="w", apply_seconds=0, explore="epsilon:0.5"),
                         headers={"X-API-Key": "w"})
    plain = TestClient(create_app(artifact, feedback_dir=tmp_path / "plain", apply_seconds=0))
    users = [int(u) for u in planted.user_map.ids[:40]]
    answers = [service.get("/recommend", params={"user": u, "k": 5}).json() for u in users]
    top = [[r["item_id"] for r in plain.get("/recommend", params={"user": u, "k": 5}).json()["items"]] for u in users]
    assert all(len(a["request_id"]) == 32 and len(a["items"]) == 5 for a in answers)
    shown = [[r["item_id"] for r in a["items"]] for a in answers]
    assert 0 < sum(s == t for s, t in zip(shown, top)) < len(users)  # some greedy, some explored
    for a, s, t in zip(answers, shown, top):
        assert all((r["score"] is None) == (i not in t) for r, i in zip(a["items"], s))
    # feedback: a click on the third item of the first answer, and an event naming no impression
    first = answers[0]
    clicked = first["items"][2]["item_id"]
    ok = service.post("/feedback", json={"events": [{"user": users[0], "item": clicked, "request_id": first["request_id"]},
                                                    {"user": users[1], "item": shown[1][0], "request_id": "0" * 32}]})
    assert ok.status_code == 200, ok.text
    bad = service.post("/feedback", json={"events": [{"user": users[0], "item": clicked, "request_id": "XYZ"}]})
    assert bad.status_code == 422 and "request_id" in bad.text
    frame = impression_frame(folder)
    assert len(frame) == len(users) and set(frame["request_id"]) == {a["request_id"] for a in answers}
    row = frame.set_index("request_id").loc[first["request_id"]]
    assert list(row["reward"]) == [0.0, 0.0, 1.0, 0.0, 0.0] and row["user_id"] == users[0]
    assert sum(map(sum, frame["reward"])) == 1  # the event with an unknown request id joins nothing
    # the logged probabilities are the sampler's for the logged slate around the model's top-k
    m = create_model("ease", reg=50.0).fit(planted)
    for r in frame.itertuples():
        u = m.user_map_.find(r.user_id)
        greedy = m.item_map_.to_index(np.asarray(top[users.index(r.user_id)]))
        slate = m.item_map_.to_index(np.asarray(r.slate))
        seen = m.seen_.indices[m.seen_.indptr[u] : m.seen_.indptr[u + 1]].astype(np.int64)
        expected = EpsilonGreedy(5, 0.5).probabilities_of(greedy[None], slate[None], m.n_items_,
                                                          np.array([0, len(seen)]), np.sort(seen))
        np.testing.assert_allclose(r.position_propensity, expected.position[0])
        assert r.slate_propensity == pytest.approx(expected.slate[0])
    out = tmp_path / "log.parquet"
    result = CliRunner().invoke(app, ["impressions", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(read_impressions(out)) == len(users) and "1 with a click" in result.output
    with pytest.raises(ValueError, match="explore must be"):
        create_app(artifact, feedback_dir=tmp_path / "x", explore="epsilon:2")
    # hostile logs: a record with other fields and a damaged line are skipped; a bad probability names its row
    segment = min((folder / "impressions").glob("feedback-*.log"))
    with open(segment, "ab") as f:
        f.write(encode_record({"request_id": "f" * 32, "user": users[0]}) + b"\x00garbage\n")
    assert len(impression_frame(folder)) == len(users)
    with open(segment, "ab") as f:
        f.write(encode_record({"request_id": "e" * 32, "timestamp": 1.0, "user": users[0], "policy": "p",
                               "policy_version": "", "slate": shown[0], "position_propensity": [0.5] * 5,
                               "prefix_propensity": [0.5] * 5, "slate_propensity": 1.5}))
    for args, message in (([str(folder), "--out", str(tmp_path / "log2.parquet")], "slate_propensity"),
                          ([str(tmp_path / "plain"), "--out", str(tmp_path / "log3.parquet")], "--explore"),
                          ([str(folder), "--out", str(tmp_path / "log.csv")], "Parquet")):
        bad = CliRunner().invoke(app, ["impressions", *args])  # recforge's main() makes these one line, exit 2
        assert isinstance(bad.exception, DataError) and message in str(bad.exception), bad.output
