"""The HTTP recommendation service (FastAPI): recommendations, similar items, online feedback, health, metrics.

``create_app(artifact)`` loads a saved model (safetensors + JSON: loading runs no code), replays the feedback log
into it, and serves:

- ``GET /recommend?user=ID&k=10&exclude_seen=true`` — top-k for a known user;
- ``POST /recommend`` ``{"items": [...], "k": 10}`` — top-k for an item history (a session; sequential, content,
  item-item and popularity models);
- ``GET /similar/{item}?k=10`` — "more like this";
- ``POST /feedback`` ``{"events": [{"user": .., "item": .., "rating"?: .., "timestamp"?: ..}]}`` — appended to the
  fsync'd log *before* the answer, then applied: models with ``partial_fit`` learn from it at once, and every
  model stops recommending the items at once (seen-item exclusion);
- ``GET /health`` and ``GET /metrics`` (Prometheus text: request counts and latencies per endpoint).

Errors are JSON ``{"detail": "..."}`` with a 4xx status that names the problem; unexpected failures are logged and
answered with a bare 500, never a stack trace. With an API key configured, ``POST /feedback`` needs the header
``X-API-Key``. Bodies above ``max_body_bytes`` are refused with 413.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

import recforge
from recforge.errors import RecforgeError, UnknownIdError, UnsupportedError
from recforge.models.base import Recommender
from recforge.serve.feedback import FeedbackLog

log = logging.getLogger(__name__)

MAX_K = 1000
Id = int | str


class Event(BaseModel):
    """One feedback event."""

    model_config = ConfigDict(extra="forbid")
    user: Id
    item: Id
    rating: float | None = Field(default=None, allow_inf_nan=False)
    timestamp: int | None = None


class FeedbackBody(BaseModel):
    """``POST /feedback``: one or many events (at most 10,000)."""

    model_config = ConfigDict(extra="forbid")
    events: list[Event] = Field(min_length=1, max_length=10_000)


class HistoryBody(BaseModel):
    """``POST /recommend``: a session's items, oldest first."""

    model_config = ConfigDict(extra="forbid")
    items: list[Id] = Field(max_length=10_000)
    k: int = Field(default=10, ge=1, le=MAX_K)
    exclude_history: bool = True


class Service:
    """The loaded model, its feedback log and the lock that keeps updates and reads apart."""

    def __init__(self, artifact: str | os.PathLike[str], feedback_dir: str | os.PathLike[str] | None,
                 sync_seconds: float = 0.5, apply_seconds: float = 0.05) -> None:
        self.model: Recommender = Recommender.load(artifact)
        self.artifact = str(artifact)
        self.lock = threading.Lock()
        self.log = FeedbackLog(feedback_dir or Path(artifact) / "feedback")
        self.sync_seconds = sync_seconds
        self._last_sync = 0.0
        self.n_events = 0
        # Feedback items of each user, excluded from that user's lists from the moment they are acknowledged
        # (the model itself learns from them in the background, within ``apply_seconds``).
        self.extra_seen: dict[int, set[int]] = {}
        self.apply_seconds = apply_seconds
        self._pending: list[dict[str, Any]] = []
        self._wake = threading.Event()
        self._write_lock = threading.Lock()
        replayed = list(self.log.replay())
        if replayed:
            self._apply(replayed)
            log.info("replayed %d feedback events from %s", len(replayed), self.log.folder)
        if apply_seconds > 0:
            threading.Thread(target=self._applier, name="recforge-feedback", daemon=True).start()

    def _applier(self) -> None:
        """Apply queued feedback in micro-batches, so a burst costs one ``partial_fit``, not one per request."""
        while True:
            self._wake.wait()
            time.sleep(self.apply_seconds)  # gather what arrives meanwhile
            self._wake.clear()
            with self._write_lock:
                batch, self._pending = self._pending, []
            if batch:
                try:
                    self._apply(batch)
                except Exception:  # keep serving: the events are durable and replay on restart
                    log.exception("applying %d feedback events failed", len(batch))

    def flush(self) -> None:
        """Apply queued feedback now (tests, shutdown)."""
        with self._write_lock:
            batch, self._pending = self._pending, []
        if batch:
            self._apply(batch)

    # ------------------------------------------------------------------ ids
    def user_index(self, user: Id) -> int:
        idx = self.model.user_map_.to_index(np.asarray([_typed(user, self.model.user_map_.is_string, "user")]),
                                            on_unknown="keep")
        if idx[0] < 0:
            raise HTTPException(404, f"unknown user {user!r}")
        return int(idx[0])

    def item_indices(self, items: list[Id], on_unknown: str = "raise") -> np.ndarray:
        typed = [_typed(i, self.model.item_map_.is_string, "item") for i in items]
        if not typed:
            return np.zeros(0, np.int32)
        idx = self.model.item_map_.to_index(np.asarray(typed), on_unknown="keep")
        if on_unknown == "raise" and (idx < 0).any():
            raise HTTPException(404, f"unknown item {typed[int(np.argmax(idx < 0))]!r}")
        return idx[idx >= 0]

    # ------------------------------------------------------------------ feedback
    def sync(self) -> None:
        """Apply records other worker processes wrote (at most every ``sync_seconds``)."""
        now = time.monotonic()
        if now - self._last_sync < self.sync_seconds:
            return
        self._last_sync = now
        new = self.log.read_new()
        if new:
            self._apply(new)

    def record(self, events: list[Event]) -> int:
        """Make events durable, then apply them; returns how many were accepted."""
        rows = [e.model_dump(exclude_none=True) for e in events]
        now = int(time.time())
        for row in rows:
            row.setdefault("timestamp", now)
        m = self.model
        users = [_typed(row["user"], m.user_map_.is_string, "user") for row in rows]  # validated before writing
        items = [_typed(row["item"], m.item_map_.is_string, "item") for row in rows]
        with self._write_lock:
            n = self.log.append(rows)
            self._mark_seen(users, items)
            if self.apply_seconds > 0:
                self._pending.extend(rows)
        if self.apply_seconds > 0:
            self._wake.set()
        else:
            self._apply(rows)
        return n

    def _mark_seen(self, users: list[Id], items: list[Id]) -> None:
        m = self.model
        u_idx = m.user_map_.to_index(np.asarray(users), on_unknown="keep")
        i_idx = m.item_map_.to_index(np.asarray(items), on_unknown="keep")
        for u, i in zip(u_idx, i_idx):
            if u >= 0 and i >= 0:
                self.extra_seen.setdefault(int(u), set()).add(int(i))

    def _apply(self, rows: list[dict[str, Any]]) -> None:
        m = self.model
        frame = pd.DataFrame({
            "user_id": [_typed(r["user"], m.user_map_.is_string, "user") for r in rows],
            "item_id": [_typed(r["item"], m.item_map_.is_string, "item") for r in rows],
            "timestamp": [int(r.get("timestamp", 0)) for r in rows],
        })
        ratings = [r.get("rating") for r in rows]
        if m.predicts_ratings:
            if any(v is None for v in ratings):
                mean = float(np.nanmean([v for v in ratings if v is not None] or [np.nan]))
                ratings = [mean if v is None else v for v in ratings]
            frame["rating"] = ratings
        with self.lock:
            if m.supports_partial_fit and not (m.predicts_ratings and frame.get("rating", pd.Series()).isna().any()):
                m.partial_fit(frame)
            self._mark_seen(frame["user_id"].tolist(), frame["item_id"].tolist())  # also without partial_fit
            self.n_events += len(rows)


def _typed(value: Id, is_string: bool, what: str) -> Id:
    """Ids as the model stores them: strings stay strings; integer maps need integers."""
    if is_string:
        return str(value)
    if isinstance(value, bool):
        raise HTTPException(422, f"{what} id must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        raise HTTPException(422, f"{what} ids of this model are integers; got {value!r}") from None


def _items_payload(model: Recommender, items: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    valid = items >= 0
    ids = model.item_map_.to_ids(items[valid])
    titles = getattr(model, "item_titles_", None)
    out = []
    for rank, (item, idx, score) in enumerate(zip(ids, items[valid], scores[valid]), start=1):
        row: dict[str, Any] = {"item_id": item.item() if hasattr(item, "item") else item, "score": float(score),
                               "rank": rank}
        if titles is not None and titles[idx]:
            row["title"] = str(titles[idx])
        out.append(row)
    return out


class _Guard:
    """Pure ASGI middleware (no per-request task or body copy): request counts and latencies for Prometheus, and
    the body-size limit — by Content-Length up front, and by counting streamed chunks otherwise."""

    def __init__(self, app: Any, requests: Counter, latency: Histogram, max_body_bytes: int) -> None:
        self.app, self.requests, self.latency, self.max_body = app, requests, latency, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = scope["path"].split("/")[1] or "root"
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        size = dict(scope.get("headers", ())).get(b"content-length")
        too_big = size is not None and (not size.isdigit() or int(size) > self.max_body)
        received = {"n": 0}

        async def receive_limited() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                received["n"] += len(message.get("body", b""))
                if received["n"] > self.max_body:
                    raise _BodyTooLarge
            return message

        try:
            if too_big:
                raise _BodyTooLarge
            await self.app(scope, receive_limited, send_wrapper)
        except _BodyTooLarge:
            response = JSONResponse({"detail": f"request body larger than {self.max_body} bytes"}, 413)
            await response(scope, receive, send_wrapper)
        self.requests.labels(route, str(status["code"])).inc()
        self.latency.labels(route).observe(time.perf_counter() - start)


class _BodyTooLarge(Exception):
    pass


def create_app(
    artifact: str | os.PathLike[str],
    feedback_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    sync_seconds: float = 0.5,
    apply_seconds: float = 0.05,
) -> FastAPI:
    """The service for a saved model; ``feedback_dir`` defaults to ``<artifact>/feedback``. Feedback is durable
    and excluded from the user's lists when ``POST /feedback`` answers; the model learns from it in micro-batches
    every ``apply_seconds`` (0: synchronously, inside the request)."""
    service = Service(artifact, feedback_dir, sync_seconds, apply_seconds)
    m = service.model
    app = FastAPI(title="recforge", version=recforge.__version__,
                  description=f"Recommendations from a {type(m).__name__} ({m.n_users_:,} users, {m.n_items_:,} items)")
    app.state.service = service
    registry = CollectorRegistry()
    requests = Counter("recforge_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("recforge_request_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
    app.add_middleware(_Guard, requests=requests, latency=latency, max_body_bytes=max_body_bytes)

    @app.exception_handler(RecforgeError)
    async def recforge_error(request: Request, exc: RecforgeError) -> JSONResponse:
        status = 404 if isinstance(exc, UnknownIdError) else 400
        return JSONResponse({"detail": str(exc)}, status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, 500)

    async def check_key(x_api_key: str | None = Header(default=None)) -> None:
        if api_key and not (x_api_key and secrets.compare_digest(x_api_key, api_key)):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {"status": "ok", "model": m.name, "users": m.n_users_, "items": m.n_items_,
                "feedback_events": service.n_events + len(service._pending), "artifact": service.artifact}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format: ``recforge_requests_total`` and ``recforge_request_seconds``."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # Handlers are async: they take a millisecond or two of CPU, and a thread-pool hop would cost as much.
    # Learning from feedback (partial_fit) runs in a background thread, in micro-batches.
    @app.get("/recommend")
    async def recommend(
        user: str = Query(min_length=1, max_length=200, description="User id"),
        k: int = Query(10, ge=1, le=MAX_K),
        exclude_seen: bool = True,
    ) -> JSONResponse:
        """Top-k items for a known user, seen items (training + feedback) excluded by default."""
        service.sync()
        u = service.user_index(user)
        with service.lock:
            pending = service.extra_seen.get(u) if exclude_seen else None  # feedback not learned yet
            extra = [np.fromiter(pending, np.int64)] if pending else None
            items, top = m.recommend_indices(np.array([u]), k, m.seen_ if exclude_seen else None,
                                             extra_exclude=extra)
        return JSONResponse({"user": user, "items": _items_payload(m, items[0], top[0])})

    @app.post("/recommend")
    def recommend_history(body: HistoryBody) -> dict[str, Any]:
        """Top-k items for a session (items oldest first); unknown items are ignored."""
        typed = np.asarray([_typed(i, m.item_map_.is_string, "item") for i in body.items])
        with service.lock:
            try:
                recs = m.recommend_for_history(typed, k=body.k, exclude_history=body.exclude_history,
                                               on_unknown="ignore")
            except UnsupportedError as exc:
                raise HTTPException(400, str(exc)) from None
        items = m.item_map_.to_index(recs["item_id"].to_numpy(), on_unknown="keep")
        return {"items": _items_payload(m, np.asarray(items), recs["score"].to_numpy())}

    @app.get("/similar/{item}")
    async def similar(item: str, k: int = Query(10, ge=1, le=MAX_K)) -> dict[str, Any]:
        """The k items most similar to ``item``."""
        idx = service.item_indices([item])
        with service.lock:
            try:
                top, scores = m.similar_indices(idx, k)
            except UnsupportedError as exc:
                raise HTTPException(400, str(exc)) from None
        return {"item": item, "items": _items_payload(m, top[0], scores[0])}

    # Also on the event loop: an fsync of a few records takes well under a millisecond on a local SSD, while a
    # thread-pool handler waits for the interpreter lock behind every recommendation (60 ms at p99 measured).
    @app.post("/feedback", dependencies=[Depends(check_key)])
    async def feedback(body: FeedbackBody) -> dict[str, Any]:
        """Append events to the durable log (fsync'd before this answers) and apply them."""
        n = service.record(body.events)
        return {"accepted": n, "total": service.log.n_written}

    return app


def create_app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (used by ``recforge serve``, also with several workers): settings
    from ``RECFORGE_SERVE_ARTIFACT``, ``RECFORGE_SERVE_FEEDBACK``, ``RECFORGE_API_KEY`` and
    ``RECFORGE_SERVE_MAX_BODY``."""
    artifact = os.environ.get("RECFORGE_SERVE_ARTIFACT")
    if not artifact:
        raise RecforgeError("RECFORGE_SERVE_ARTIFACT is not set; start the service with `recforge serve ARTIFACT`")
    return create_app(artifact, os.environ.get("RECFORGE_SERVE_FEEDBACK") or None,
                      os.environ.get("RECFORGE_API_KEY") or None, int(os.environ.get("RECFORGE_SERVE_MAX_BODY", str(1 << 20))))
