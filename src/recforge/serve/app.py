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

from recforge.errors import RecforgeError, UnknownIdError, UnsupportedError
from recforge.models.base import Recommender
from recforge.models.topk import mask_and_topk
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
                 sync_seconds: float = 0.5) -> None:
        self.model: Recommender = Recommender.load(artifact)
        self.artifact = str(artifact)
        self.lock = threading.Lock()
        self.log = FeedbackLog(feedback_dir or Path(artifact) / "feedback")
        self.sync_seconds = sync_seconds
        self._last_sync = 0.0
        self.n_events = 0
        self.extra_seen: dict[int, set[int]] = {}  # models without partial_fit: feedback items excluded here
        replayed = list(self.log.replay())
        if replayed:
            self._apply(replayed)
            log.info("replayed %d feedback events from %s", len(replayed), self.log.folder)

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
        for row in rows:  # validate ids' types before anything is written
            _typed(row["user"], self.model.user_map_.is_string, "user")
            _typed(row["item"], self.model.item_map_.is_string, "item")
        n = self.log.append(rows)
        self._apply(rows)
        return n

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
            else:  # no incremental learning: the items are at least never recommended to that user again
                users = m.user_map_.to_index(frame["user_id"].to_numpy(), on_unknown="keep")
                items = m.item_map_.to_index(frame["item_id"].to_numpy(), on_unknown="keep")
                for u, i in zip(users, items):
                    if u >= 0 and i >= 0:
                        self.extra_seen.setdefault(int(u), set()).add(int(i))
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


def create_app(
    artifact: str | os.PathLike[str],
    feedback_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    sync_seconds: float = 0.5,
) -> FastAPI:
    """The service for a saved model; ``feedback_dir`` defaults to ``<artifact>/feedback``."""
    service = Service(artifact, feedback_dir, sync_seconds)
    m = service.model
    app = FastAPI(title="recforge", version="0.1.0",
                  description=f"Recommendations from a {type(m).__name__} ({m.n_users_:,} users, {m.n_items_:,} items)")
    app.state.service = service
    registry = CollectorRegistry()
    requests = Counter("recforge_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("recforge_request_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        route = request.url.path.split("/")[1] or "root"
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
            response: Response = JSONResponse({"detail": f"request body larger than {max_body_bytes} bytes"}, 413)
        elif size is None and request.method in ("POST", "PUT", "PATCH"):
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    break
            if len(body) > max_body_bytes:
                response = JSONResponse({"detail": f"request body larger than {max_body_bytes} bytes"}, 413)
            else:
                request._body = body  # type: ignore[attr-defined]  # already consumed: hand it on
                response = await call_next(request)
        else:
            response = await call_next(request)
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - start)
        return response

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

    def check_key(x_api_key: str | None = Header(default=None)) -> None:
        if api_key and not (x_api_key and secrets.compare_digest(x_api_key, api_key)):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {"status": "ok", "model": m.name, "users": m.n_users_, "items": m.n_items_,
                "feedback_events": service.n_events, "artifact": service.artifact}

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus text format: ``recforge_requests_total`` and ``recforge_request_seconds``."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/recommend")
    def recommend(
        user: str = Query(min_length=1, max_length=200, description="User id"),
        k: int = Query(10, ge=1, le=MAX_K),
        exclude_seen: bool = True,
    ) -> dict[str, Any]:
        """Top-k items for a known user, seen items (training + feedback) excluded by default."""
        service.sync()
        u = service.user_index(user)
        with service.lock:
            scores = m.score(np.array([u]))
            cols = np.zeros(0, np.int32)
            if exclude_seen:
                cols = m.seen_[u].indices
                extra = service.extra_seen.get(u)
                if extra:
                    cols = np.union1d(cols, np.fromiter(extra, np.int64))
        items, top = mask_and_topk(scores, min(k, m.n_items_), np.array([0, len(cols)]), np.asarray(cols, np.int32))
        return {"user": user, "items": _items_payload(m, items[0], top[0])}

    @app.post("/recommend")
    def recommend_history(body: HistoryBody) -> dict[str, Any]:
        """Top-k items for a session (items oldest first); unknown items are ignored."""
        idx = service.item_indices(body.items, on_unknown="ignore")
        with service.lock:
            try:
                recs = m.recommend_for_history(m.item_map_.to_ids(idx), k=body.k,
                                               exclude_history=body.exclude_history, on_unknown="ignore")
            except UnsupportedError as exc:
                raise HTTPException(400, str(exc)) from None
        items = m.item_map_.to_index(recs["item_id"].to_numpy(), on_unknown="keep")
        return {"items": _items_payload(m, np.asarray(items), recs["score"].to_numpy())}

    @app.get("/similar/{item}")
    def similar(item: str, k: int = Query(10, ge=1, le=MAX_K)) -> dict[str, Any]:
        """The k items most similar to ``item``."""
        idx = service.item_indices([item])
        with service.lock:
            try:
                top, scores = m._similar_indices(np.asarray(idx, np.int64), min(k, max(m.n_items_ - 1, 1)))
            except UnsupportedError as exc:
                raise HTTPException(400, str(exc)) from None
        return {"item": item, "items": _items_payload(m, top[0], scores[0])}

    @app.post("/feedback", dependencies=[Depends(check_key)])
    def feedback(body: FeedbackBody) -> dict[str, Any]:
        """Append events to the durable log (fsync'd before this answers) and apply them."""
        n = service.record(body.events)
        return {"accepted": n, "total": service.n_events}

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
