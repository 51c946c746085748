"""The service and its feedback log under hostile input: every case here was once a 500, a crash at start-up, a
leak of a user's history or silently lost data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from recforge.data import Interactions
from recforge.errors import StorageError
from recforge.models import Recommender, create_model
from recforge.serve import FeedbackLog, create_app
from recforge.serve.app import Loaded
from recforge.serve.feedback import encode_record

KEY = {"X-API-Key": "w"}


@pytest.fixture(scope="module")
def artifact(planted: Interactions, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "ease"
    create_model("ease", reg=50.0).fit(planted).save(path)
    return path


@pytest.fixture(scope="module")
def string_artifact(planted: Interactions, tmp_path_factory) -> Path:
    frame = planted.to_frame()
    frame["user_id"] = "u" + frame["user_id"].astype(str)
    frame["item_id"] = "i" + frame["item_id"].astype(str)
    path = tmp_path_factory.mktemp("hostile") / "pop-str"
    create_model("pop").fit(Interactions.from_frame(frame)).save(path)
    return path


def _client(artifact: Path, tmp_path: Path, **settings) -> TestClient:
    settings = {"feedback_dir": tmp_path / "fb", "api_key": "w", "apply_seconds": 0, **settings}
    return TestClient(create_app(artifact, **settings), headers=KEY)


# ---------------------------------------------------------------------------------------------------- feedback
@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"user": 1, "item": 1, "timestamp": 10**29}, "timestamp must be whole Unix seconds"),
        ({"user": 1, "item": 1, "timestamp": -5}, "timestamp must be whole Unix seconds"),
        ({"user": 2**63, "item": 1}, "outside the int64 range"),
        ({"user": 1, "item": -(2**63) - 1}, "outside the int64 range"),
        ({"user": "1_0", "item": 1}, "plain ASCII digits"),
        ({"user": " 1 ", "item": 1}, "plain ASCII digits"),
        ({"user": "\uff11", "item": 1}, "plain ASCII digits"),
        ({"user": True, "item": 1}, "user"),
        ({"user": 1, "item": 1.5}, "item"),
        ({"user": 1, "item": 1, "rating": 1e308}, "rating range"),
        ({"user": 1, "item": 1, "rating": True}, "rating"),
    ],
)
def test_bad_events_are_refused_before_they_are_logged(artifact: Path, tmp_path: Path, event: dict,
                                                       message: str) -> None:
    client = _client(artifact, tmp_path)
    response = client.post("/feedback", json={"events": [{"user": 1, "item": 1}, event]})
    assert response.status_code == 422 and message in response.json()["detail"], response.text
    assert list(FeedbackLog(tmp_path / "fb").replay()) == []  # nothing of the batch was acknowledged
    assert _client(artifact, tmp_path).get("/health").status_code == 200  # and a restart is fine


def test_a_logged_record_that_cannot_be_applied_is_skipped_on_replay(artifact: Path, planted: Interactions,
                                                                     tmp_path: Path, caplog) -> None:
    folder = tmp_path / "fb"
    folder.mkdir()
    good = {"user": int(planted.user_map.ids[0]), "item": int(planted.item_map.ids[0]), "timestamp": 5}
    bad = [{"user": 1, "item": 1, "timestamp": 10**29}, {"user": 2**64, "item": 1}, {"user": 1}]
    (folder / "feedback-20240101-1-0.log").write_bytes(b"".join(encode_record(e) for e in [*bad, good]))
    with caplog.at_level(logging.WARNING):
        client = _client(artifact, tmp_path)
    assert client.get("/health").json()["feedback_events"] == 1
    assert caplog.text.count("invalid record") == 3
    assert 'recforge_feedback_skipped{reason="invalid"} 3.0' in client.get("/metrics").text


def test_one_batch_cannot_grow_the_catalogue_without_bound(artifact: Path, tmp_path: Path) -> None:
    client = _client(artifact, tmp_path)
    events = [{"user": 1, "item": 10_000 + i} for i in range(101)]
    response = client.post("/feedback", json={"events": events})
    assert response.status_code == 422 and "101 items the model does not know" in response.json()["detail"]
    assert client.post("/feedback", json={"events": events[:100]}).status_code == 200


def test_string_ids_have_a_length_limit(string_artifact: Path, tmp_path: Path) -> None:
    client = _client(string_artifact, tmp_path)
    long_id = "x" * 65
    response = client.post("/feedback", json={"events": [{"user": long_id, "item": "i1"}]})
    assert response.status_code == 422 and "1 to 64 characters" in response.json()["detail"]
    assert client.get("/recommend", params={"user": long_id}).status_code == 422
    assert client.post("/feedback", json={"events": [{"user": "x" * 64, "item": "i1"}]}).status_code == 200
    # a string-id model takes JSON integers as their decimal strings
    assert client.post("/feedback", json={"events": [{"user": 5, "item": "i1"}]}).status_code == 200
    assert [e["user"] for e in FeedbackLog(tmp_path / "fb").replay()] == ["x" * 64, "5"]


# ---------------------------------------------------------------------------------------------------- ids in reads
@pytest.mark.parametrize("user", ["99999999999999999999999", "1_0", " 1 ", "\uff11", "1.5", "1e3", "1.", "-",
                                  "9007199254740993.0"])
def test_malformed_or_huge_ids_are_422_not_500(artifact: Path, tmp_path: Path, user: str) -> None:
    client = _client(artifact, tmp_path)
    assert client.get("/recommend", params={"user": user}).status_code == 422
    assert client.get(f"/similar/{user}").status_code == 422
    assert client.post("/recommend", json={"items": [user]}).status_code == 422


def test_an_integer_id_reads_the_same_in_a_query_as_in_a_json_body(artifact: Path, planted: Interactions,
                                                                   tmp_path: Path) -> None:
    """JSON (and so the published schema) calls 930.0 an integer; a client that copies it from a body into a
    query must get the same user, not a 422."""
    client = _client(artifact, tmp_path)
    user = int(planted.user_map.ids[3])
    plain = client.get("/recommend", params={"user": str(user)}).json()["items"]
    assert client.get("/recommend", params={"user": f"{user}.0"}).json()["items"] == plain
    assert client.post("/feedback", json={"events": [{"user": float(user), "item": 1}]}).status_code == 200


def test_history_bodies_are_strict_and_fall_back_to_popularity(artifact: Path, planted: Interactions,
                                                                tmp_path: Path) -> None:
    client = _client(artifact, tmp_path)
    assert client.post("/recommend", json={"items": [True]}).status_code == 422
    assert client.post("/recommend", json={"items": [1.5]}).status_code == 422
    assert client.post("/recommend", json={"items": [1.0]}).status_code == 200  # JSON Schema: 1.0 is an integer
    counts = np.bincount(planted.items, minlength=planted.n_items)
    popular = [int(planted.item_map.ids[i]) for i in np.argsort(-counts, kind="stable")[:3]]
    for items in ([], [10**9, 10**9 + 1]):
        body = client.post("/recommend", json={"items": items, "k": 3}).json()
        assert body["fallback"] == "popularity" and [r["item_id"] for r in body["items"]] == popular


# ---------------------------------------------------------------------------------------------------- auth, privacy
def test_reads_need_a_key_and_the_history_stays_private(artifact: Path, planted: Interactions,
                                                        tmp_path: Path) -> None:
    app = create_app(artifact, feedback_dir=tmp_path / "fb", api_key="w", read_key="r")
    anonymous, reader, writer = TestClient(app), TestClient(app, headers={"X-API-Key": "r"}), TestClient(app, headers=KEY)
    user = int(planted.user_map.ids[0])
    for path in ("/recommend", "/similar/1", "/metrics"):
        assert anonymous.get(path, params={"user": user}).status_code == 401
    assert anonymous.get("/health").status_code == 200 and "artifact" not in anonymous.get("/health").json()
    assert reader.get("/recommend", params={"user": user}).status_code == 200
    assert reader.post("/feedback", json={"events": [{"user": user, "item": 1}]}).status_code == 401
    assert writer.get("/recommend", params={"user": user}).status_code == 200
    refused = reader.get("/recommend", params={"user": user, "exclude_seen": "false"})
    assert refused.status_code == 403 and "--allow-include-seen" in refused.json()["detail"]
    opened = TestClient(create_app(artifact, feedback_dir=tmp_path / "fb2", api_key="w", open_reads=True,
                                   allow_include_seen=True))
    assert opened.get("/recommend", params={"user": user, "exclude_seen": "false"}).status_code == 200
    assert opened.post("/feedback", json={"events": [{"user": user, "item": 1}]}).status_code == 401


def test_keys_are_compared_as_utf8_bytes(artifact: Path, tmp_path: Path) -> None:
    client = TestClient(create_app(artifact, feedback_dir=tmp_path / "fb", api_key="clé"))
    assert client.get("/metrics", headers={"X-API-Key": "clé".encode()}).status_code == 200
    assert client.get("/metrics", headers={"X-API-Key": "clè".encode()}).status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": b"\xff\xfe"}).status_code == 401


# ---------------------------------------------------------------------------------------------------- bounds
def test_metrics_label_only_known_routes(artifact: Path, tmp_path: Path) -> None:
    client = _client(artifact, tmp_path)
    for n in range(50):
        assert client.get(f"/random-{n}").status_code == 404
    text = client.get("/metrics").text
    assert "random-" not in text and 'endpoint="other",status="404"} 50.0' in text


def test_a_chunked_body_over_the_limit_is_413(artifact: Path, tmp_path: Path) -> None:
    client = _client(artifact, tmp_path, max_body_bytes=1000)

    def chunks():
        yield b'{"events": ['
        for _ in range(200):
            yield b'{"user": 1, "item": 1},'
        yield b'{"user": 1, "item": 1}]}'

    response = client.post("/feedback", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than 1000 bytes" in response.json()["detail"]
    small = client.post("/feedback", content=iter([b'{"events": [{"user": 1, ', b'"item": 1}]}']),
                        headers={"content-type": "application/json"})
    assert small.status_code == 200, small.text


# ---------------------------------------------------------------------------------------------------- the log
def _segment(folder: Path, n: int) -> tuple[Path, list[bytes]]:
    folder.mkdir(exist_ok=True)
    records = [encode_record({"user": i, "item": i}) for i in range(n)]
    path = folder / "feedback-20240101-1-0.log"
    path.write_bytes(b"".join(records))
    return path, records


def test_a_damaged_byte_loses_one_record_not_the_rest(tmp_path: Path, caplog) -> None:
    path, records = _segment(tmp_path, 100)
    data = bytearray(path.read_bytes())
    at = sum(len(r) for r in records[:49]) + 20  # inside record 50
    data[at] = ord("\r")
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        log = FeedbackLog(tmp_path)
        users = [e["user"] for e in log.replay()]
    assert users == [i for i in range(100) if i != 49]
    assert "half-written" not in caplog.text and log.skipped["damaged"] == 1


def test_garbage_without_a_newline_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    path, records = _segment(tmp_path, 10)
    data = b"".join(records[:5]) + b"\0" * 4096 + b"".join(records[5:])
    path.write_bytes(data)
    assert [e["user"] for e in FeedbackLog(tmp_path).replay()] == list(range(10))
    path.write_bytes(b"".join(records[:3]) + b"junk 12 {" + records[3][:-5] + b"".join(records[4:]))
    assert [e["user"] for e in FeedbackLog(tmp_path).replay()] == [0, 1, 2, *range(4, 10)]


def test_the_feedback_folder_is_checked(tmp_path: Path, caplog) -> None:
    (tmp_path / "feedback-20240101-1-0.log").mkdir()  # a folder named like a segment
    with caplog.at_level(logging.WARNING):
        assert list(FeedbackLog(tmp_path).replay()) == []
    assert "not a regular file" in caplog.text
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a folder"):
        FeedbackLog(tmp_path / "file")
    with pytest.raises(StorageError, match="not writable"):  # /proc refuses even root
        FeedbackLog("/proc/recforge-feedback")


# ---------------------------------------------------------------------------------------------------- slow disks
def test_feedback_is_group_committed_and_a_slow_disk_stalls_only_feedback(artifact: Path, planted: Interactions,
                                                                           tmp_path: Path, monkeypatch) -> None:
    import asyncio
    import os
    import time

    import httpx

    app = create_app(artifact, feedback_dir=tmp_path / "fb", apply_seconds=0)
    syncs: list[float] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.1)
        syncs.append(time.perf_counter())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    user, items = int(planted.user_map.ids[0]), [int(i) for i in planted.item_map.ids[:20]]

    async def main() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            posts = [asyncio.create_task(client.post("/feedback", json={"events": [{"user": user, "item": i}]}))
                     for i in items]
            await asyncio.sleep(0.02)  # the first fsync is under way
            read = await client.get("/recommend", params={"user": user})
            read_done = time.perf_counter()
            assert read.status_code == 200
            return await asyncio.gather(*posts), read_done

    answers, read_done = asyncio.run(main())
    assert all(r.status_code == 200 for r in answers)
    assert len(syncs) < len(items) / 2  # batches that arrive during an fsync share the next one
    assert read_done < syncs[-1]  # the read did not wait for the disk
    assert len(list(FeedbackLog(tmp_path / "fb").replay())) == 20


# ---------------------------------------------------------------------------------------------------- hot swap
def test_hot_swap_to_a_refitted_artifact_keeps_every_event(artifact: Path, planted: Interactions,
                                                           tmp_path: Path) -> None:
    import asyncio

    import httpx

    from recforge.serve.refit import refit_with_feedback

    folder = tmp_path / "fb"
    # shedding off: on a busy test machine a slow turn must not turn into a 503 (the swap itself is tested here)
    app = create_app(artifact, feedback_dir=folder, api_key="w", apply_seconds=0.02, overload_seconds=60.0)
    user = int(planted.user_map.ids[5])
    items = [int(i) for i in planted.item_map.ids[:60]]
    client = TestClient(app, headers=KEY)
    assert client.post("/feedback", json={"events": [{"user": user, "item": i} for i in items[:10]]}).status_code == 200
    new = tmp_path / "refitted"
    refit_with_feedback(artifact, planted, folder).save(new)

    async def main() -> tuple[list[int], dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers=KEY) as c:
            async def traffic(i: int) -> int:
                if i % 3 == 0:
                    r = await c.post("/feedback", json={"events": [{"user": user, "item": items[10 + i // 3]}]})
                else:
                    r = await c.get("/recommend", params={"user": user, "k": 5})
                return r.status_code
            tasks = [asyncio.create_task(traffic(i)) for i in range(60)]
            swap = await c.post("/admin/reload", json={"artifact": str(new)})
            return list(await asyncio.gather(*tasks)), swap.json()

    codes, swapped = asyncio.run(main())
    assert set(codes) == {200} and swapped["reloaded"] == "ease"
    app.state.service.flush()
    logged = [e["item"] for e in FeedbackLog(folder).replay()]
    assert sorted(logged) == sorted(items[:30])  # 10 before, 20 during the swap: none lost
    recs = client.get("/recommend", params={"user": user, "k": 100}).json()["items"]
    assert not {r["item_id"] for r in recs} & set(items[:30])  # every acknowledged item excluded after the swap
    # a restart from the refitted artifact replays only what came after its training data
    restarted = TestClient(create_app(new, feedback_dir=folder, api_key="w"), headers=KEY)
    assert restarted.get("/health").json()["feedback_events"] == 20


def test_reload_needs_the_write_key_and_survives_a_bad_artifact(artifact: Path, tmp_path: Path) -> None:
    open_app = TestClient(create_app(artifact, feedback_dir=tmp_path / "fb"))
    assert open_app.post("/admin/reload").status_code == 403
    client = _client(artifact, tmp_path, read_key="r")
    assert client.post("/admin/reload", headers={"X-API-Key": "r"}).status_code == 401
    bad = client.post("/admin/reload", json={"artifact": str(tmp_path / "nowhere")})
    assert bad.status_code == 409 and "still serving the previous model" in bad.json()["detail"]
    assert client.post("/admin/reload").json()["reloaded"] == "ease"  # the same artifact again
    assert client.get("/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------------- large catalogues
# ALS: well-separated scores (rating models clip, so their exact ranks tie at the top; a barely trained BPR has
# near-ties that any approximate index may order either way). ALS's artifact carries its HNSW graph; SASRec's index
# is built when the service loads it.
_ANN_MODELS = {"als": {"n_factors": 16, "epochs": 5, "num_threads": 1},
               "sasrec": {"max_len": 30, "n_factors": 32, "epochs": 8, "lr": 3e-3, "num_threads": 1, "progress": False}}


@pytest.mark.parametrize("name", sorted(_ANN_MODELS))
def test_the_ann_path_matches_exact_and_excludes_seen_items(name: str, planted: Interactions, tmp_path: Path) -> None:
    path = tmp_path / name
    create_model(name, **_ANN_MODELS[name]).fit(planted).save(path, ann=name == "als")
    exact = _client(path, tmp_path / "exact")
    ann = _client(path, tmp_path / "ann", ann_min_items=1)
    assert ann.app.state.service.state.index is not None and exact.app.state.service.state.index is None
    assert (ann.app.state.service.model.ann_graph_ is not None) == (name == "als")
    frame = planted.to_frame()
    overlap = []
    for user in planted.user_map.ids[:40]:
        want = [r["item_id"] for r in exact.get("/recommend", params={"user": int(user), "k": 10}).json()["items"]]
        got = [r["item_id"] for r in ann.get("/recommend", params={"user": int(user), "k": 10}).json()["items"]]
        assert len(got) == 10 and not set(got) & set(frame.loc[frame["user_id"] == user, "item_id"])
        overlap.append(len(set(want) & set(got)) / 10)
    assert np.mean(overlap) >= 0.95  # recall@10 of the HNSW path against exact scoring
    item = int(planted.item_map.ids[0])
    user = int(planted.user_map.ids[0])
    assert ann.post("/feedback", json={"events": [{"user": user, "item": item}]}).status_code == 200
    recs = ann.get("/recommend", params={"user": user, "k": 200}).json()["items"]
    assert item not in {r["item_id"] for r in recs}  # acknowledged feedback is excluded on the ANN path too


def test_a_stored_graph_of_other_vectors_is_rebuilt(planted: Interactions, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    params = _ANN_MODELS["als"]
    model = create_model("als", **params).fit(planted)
    other = create_model("als", **{**params, "seed": 7}).fit(planted).save(tmp_path / "other", ann=True)
    model.save(tmp_path / "als")
    model = Recommender.load(tmp_path / "als")
    model.ann_graph_ = Recommender.load(other).ann_graph_  # a graph that passed its own artifact's hash check
    with caplog.at_level(logging.WARNING):
        state = Loaded(model, tmp_path / "als", ann_min_items=1)
    assert "holds other vectors than the model's" in caplog.text
    queries, items = model.retrieval_vectors(np.arange(5))
    found, _ = state.index.search(queries, 1)
    np.testing.assert_array_equal(found[:, 0], np.argmax(queries @ items.T, axis=1))


def test_string_ids_with_nul_characters_are_refused(string_artifact: Path, tmp_path: Path) -> None:
    """Fixed-width numpy strings drop trailing NULs: "i1\\0" would be stored as the other item "i1"."""
    client = _client(string_artifact, tmp_path)
    for bad in ("i1\x00", "\x00"):
        answer = client.post("/feedback", json={"events": [{"user": "u3", "item": bad}]})
        assert answer.status_code == 422 and "NUL" in answer.json()["detail"]
    assert client.get("/recommend", params={"user": "u3\x00"}).status_code == 422
    assert list(FeedbackLog(tmp_path / "fb").replay()) == []  # nothing was logged


def test_a_score_that_overflows_is_null_not_a_500(planted: Interactions, tmp_path: Path) -> None:
    """Stored values can be finite and still overflow for one user (the loaded model's check scores its first
    users only): the answer carries the ranking with a null score."""
    model = create_model("als", n_factors=4, epochs=1, num_threads=1).fit(planted)
    model.user_factors_[20] = 1e38  # its scores overflow to ±inf, the first users' stay finite
    model.item_factors_ *= 1e3
    path = model.save(tmp_path / "als")
    user = planted.user_map.to_ids(np.array([20])).tolist()[0]
    with np.errstate(over="warn", invalid="warn"):  # as outside the test suite, which raises on them
        response = _client(path, tmp_path).get("/recommend", params={"user": str(user), "k": 5})
    assert response.status_code == 200, response.text
    assert any(row["score"] is None for row in response.json()["items"])
