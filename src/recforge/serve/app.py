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
answered with a bare 500, never a stack trace. Every id is parsed strictly (:mod:`recforge.serve.events`) and every
feedback event is checked before it is acknowledged. With an API key configured, every endpoint but ``/health``
needs the header ``X-API-Key`` (reads may be opened, or given a read-only key); a user's seen items can be listed
(``exclude_seen=false``) only where the service allows it. Bodies above ``max_body_bytes`` are refused with 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

import recforge
from recforge.errors import DataError, RecforgeError, StorageError, UnknownIdError, UnsupportedError
from recforge.models.base import Recommender
from recforge.retrieval import ANN_MIN_ITEMS, HNSWIndex, VectorIndex
from recforge.serve.batching import Busy, Overloaded, ScoringQueue
from recforge.serve.events import (
    EventError,
    Limits,
    check_batch,
    event_problem,
    exact_integer,
    parse_id,
    parse_ids,
)
from recforge.serve.fastpath import MAX_USER_CHARS, first_header, key_matches, recommend_query
from recforge.serve.feedback import FeedbackLog, GroupCommitter, default_feedback_dir
from recforge.serve.impressions import Explorer, parse_explore
from recforge.serve.openapi import ERRORS
from recforge.serve.openapi import install as install_openapi

log = logging.getLogger(__name__)

MAX_K = 1000
Id = StrictInt | StrictStr | StrictFloat  # floats: JSON Schema's integers may be written 930.0 (parse_id decides)


def _json_integer(value: Any) -> int:
    """An integer as JSON Schema means it: ``787`` or ``787.0`` (exact up to 2**53), never ``true`` or ``"787"``."""
    value = exact_integer(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("Input should be an integer")  # noqa: TRY004 - pydantic turns ValueError into a 422
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer), Strict()]
#: The first path segments Prometheus labels may carry; anything else is counted as "other".
ROUTES = frozenset({"recommend", "similar", "feedback", "health", "metrics", "docs", "openapi.json", "redoc"})


@dataclass(frozen=True)
class ServeSettings:
    """How the service runs (``recforge serve`` options of the same names).

    Attributes:
        feedback_dir: folder of the durable feedback log (default ``<artifact>/feedback``).
        api_key: the write key: ``POST /feedback`` needs it; it also opens every read.
        read_key: a key that opens reads only.
        open_reads: serve reads without a key even when keys are configured.
        allow_include_seen: let clients ask for ``exclude_seen=false`` (which lists a user's history).
        max_body_bytes: the largest request body; larger ones get 413, also when sent chunked.
        limits: id lengths and how many new users/items one feedback batch may add.
        sync_seconds: how often a worker reads the feedback other workers logged.
        apply_seconds: micro-batch period of learning from feedback (0: inside the request).
        ann_min_items: catalogue size from which models that score by an inner product (factor models, the
            two-tower) answer ``/recommend`` from an HNSW index instead of scoring every item.
        overload_seconds: load shedding: while the service runs this far behind, ``GET /recommend`` is answered
            503 (with ``Retry-After``) at once instead of being queued and scored late.
        explore: ``"epsilon:E"``: ``GET /recommend`` explores and logs each impression with its probabilities and a
            ``request_id`` that feedback can carry (:mod:`recforge.serve.impressions`); ``"none"``: the top-k.
    """

    feedback_dir: str | None = None
    api_key: str | None = None
    read_key: str | None = None
    open_reads: bool = False
    allow_include_seen: bool = False
    max_body_bytes: int = 1 << 20
    limits: Limits = field(default_factory=Limits)
    sync_seconds: float = 0.5
    apply_seconds: float = 0.05
    ann_min_items: int = ANN_MIN_ITEMS
    overload_seconds: float = 0.1
    explore: str = "none"

    def to_env(self) -> dict[str, str]:
        """Environment variables that carry these settings to ``create_app_from_env`` (keys apart from the rest,
        so they never appear in a process listing of the settings)."""
        rest = {k: v for k, v in asdict(self).items() if k not in ("api_key", "read_key")}
        env = {"RECFORGE_SERVE_SETTINGS": json.dumps(rest)}
        env.update({name: key for name, key in (("RECFORGE_API_KEY", self.api_key),
                                                ("RECFORGE_READ_KEY", self.read_key)) if key})
        return env

    @classmethod
    def from_env(cls) -> ServeSettings:
        """The settings :meth:`to_env` wrote."""
        rest = json.loads(os.environ.get("RECFORGE_SERVE_SETTINGS") or "{}")
        rest["limits"] = Limits(**rest.get("limits", {}))
        return cls(**rest, api_key=os.environ.get("RECFORGE_API_KEY") or None,
                   read_key=os.environ.get("RECFORGE_READ_KEY") or None)


class Event(BaseModel):
    """One feedback event: ids as the model's (integers: JSON integers or ASCII digit strings within int64),
    an optional finite rating, an optional timestamp (whole Unix seconds) and the ``request_id`` of the exploring
    ``GET /recommend`` answer it responds to (32 lower-case hex digits)."""

    model_config = ConfigDict(extra="forbid")
    user: Id
    item: Id
    rating: float | None = Field(default=None, allow_inf_nan=False, strict=True)
    timestamp: JsonInt | None = None
    request_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$", strict=True)


class FeedbackBody(BaseModel):
    """``POST /feedback``: one or many events (at most 10,000)."""

    model_config = ConfigDict(extra="forbid")
    events: list[Event] = Field(min_length=1, max_length=10_000)


class HistoryBody(BaseModel):
    """``POST /recommend``: a session's items, oldest first."""

    model_config = ConfigDict(extra="forbid")
    items: list[Id] = Field(max_length=10_000)
    k: JsonInt = Field(default=10, ge=1, le=MAX_K)
    exclude_history: StrictBool = True


class Loaded:
    """One loaded model and what the service keeps beside it; a hot swap replaces the whole object at once."""

    def __init__(self, model: Recommender, artifact: Path, ann_min_items: int = ANN_MIN_ITEMS) -> None:
        self.model = model
        self.artifact = artifact
        self.index: VectorIndex | None = None  # approximate top-k for large catalogues
        vectors = model.retrieval_vectors(np.zeros(0, np.int64)) if model.n_items_ >= ann_min_items else None
        if vectors is not None:
            self.index = _vector_index(vectors[1], model.ann_graph_)
        self.lock = threading.Lock()  # keeps learning (partial_fit) and scoring apart
        # Feedback items of each user, excluded from that user's lists from the moment they are acknowledged
        # (the model itself learns from them in the background, within ``apply_seconds``).
        self.extra_seen: dict[int, frozenset[int]] = {}
        self._seen_lock = threading.Lock()  # writers: the event loop (acknowledged feedback) and the applier
        self.popularity = np.bincount(model.seen_.indices, minlength=model.n_items_).astype(np.float32)
        self.popular = np.argsort(-self.popularity, kind="stable")[:MAX_K].astype(np.int32)
        self.n_events = 0

    def top_k(self, users: np.ndarray, k: int, exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item indices and scores for user indices (one row each, ``-1`` padded): exact, or from the
        index (over-fetching past the excluded items) for a large catalogue; seen items and acknowledged
        feedback excluded when asked. Runs on the scoring thread, under :attr:`lock`."""
        m = self.model
        extra = None
        if exclude_seen:  # feedback not learned yet; each user's set is replaced, never changed, so this read is safe
            pending = [self.extra_seen.get(int(u), ()) for u in users]
            if any(pending):
                extra = [np.fromiter(p, np.int64, len(p)) for p in pending]
        if self.index is None:
            return m.recommend_indices(users, k, m.seen_ if exclude_seen else None, extra_exclude=extra)
        queries, _ = m.retrieval_vectors(users)
        exclude = None
        if exclude_seen:  # built directly: scipy's row and column slicing cost more than the search itself
            seen = m.seen_
            parts = [seen.indices[seen.indptr[u] : seen.indptr[u + 1]] for u in users.tolist()]
            if extra is not None:
                parts = [np.concatenate([p, e]) for p, e in zip(parts, extra)]
            parts = [np.sort(p[p < self.index.n]) for p in parts]  # items added by feedback are not in the index
            indptr = np.zeros(len(parts) + 1, np.int64)
            np.cumsum([len(p) for p in parts], out=indptr[1:])
            indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            exclude = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(users), self.index.n))
        return self.index.search(queries, k, exclude)

    def mark_seen(self, users: list[Any], items: list[Any]) -> None:
        """Exclude each item from its user's lists from now on (known users and items only). A user's set is
        replaced by a new one, so the scoring thread never sees a set change under it."""
        u_idx = self.model.user_map_.to_index(np.asarray(users), on_unknown="keep")
        i_idx = self.model.item_map_.to_index(np.asarray(items), on_unknown="keep")
        added: dict[int, set[int]] = {}
        for u, i in zip(u_idx.tolist(), i_idx.tolist()):
            if u >= 0 and i >= 0:
                added.setdefault(u, set()).add(i)
        with self._seen_lock:
            for u, new in added.items():
                self.extra_seen[u] = self.extra_seen.get(u, frozenset()) | new

    def apply(self, rows: list[dict[str, Any]]) -> None:
        """Learn from checked feedback rows (``partial_fit`` where the model has it) and exclude their items."""
        m = self.model
        frame = pd.DataFrame({  # rows were checked (check_batch, or the log's validator on replay)
            "user_id": np.asarray([r["user"] for r in rows], dtype=str if m.user_map_.is_string else np.int64),
            "item_id": np.asarray([r["item"] for r in rows], dtype=str if m.item_map_.is_string else np.int64),
            "timestamp": np.asarray([r.get("timestamp", 0) for r in rows], dtype=np.int64),
        })
        ratings = [r.get("rating") for r in rows]
        if m.predicts_ratings:
            if any(v is None for v in ratings):  # an unrated event: the batch's mean rating, else the scale's middle
                given = [v for v in ratings if v is not None]
                low, high = getattr(m, "rating_min_", np.nan), getattr(m, "rating_max_", np.nan)
                fill = float(np.mean(given)) if given else (low + high) / 2
                ratings = [fill if v is None else v for v in ratings]
            frame["rating"] = ratings
        with self.lock:
            if m.supports_partial_fit and not (m.predicts_ratings and frame.get("rating", pd.Series()).isna().any()):
                m.partial_fit(frame)
            self.mark_seen(frame["user_id"].tolist(), frame["item_id"].tolist())  # also without partial_fit
            self.n_events += len(rows)


#: What an acknowledged feedback event does: ``applied`` (the model learns from it, ``partial_fit``, at once or
#: within ``apply_seconds``), ``excluded`` (a model that cannot learn online leaves the item out of the user's lists
#: from now on) or ``kept`` (a user or item the model does not know: only in the log, for the next refit).
OUTCOMES = ("applied", "excluded", "kept")


def outcomes(model: Recommender, rows: list[dict[str, Any]]) -> list[str]:
    """One of :data:`OUTCOMES` per checked feedback row, for ``model``."""
    if model.supports_partial_fit:
        return ["applied"] * len(rows)
    users = model.user_map_.to_index(np.asarray([r["user"] for r in rows]), on_unknown="keep")
    items = model.item_map_.to_index(np.asarray([r["item"] for r in rows]), on_unknown="keep")
    return ["excluded" if u >= 0 and i >= 0 else "kept" for u, i in zip(users.tolist(), items.tolist())]


class ReloadBody(BaseModel):
    """``POST /admin/reload``: another artifact folder to serve (default: the one serving now)."""

    model_config = ConfigDict(extra="forbid")
    artifact: StrictStr | None = Field(default=None, max_length=4096)


class Service:
    """The loaded model (:class:`Loaded`, swappable), its feedback log and the locks around them."""

    def __init__(self, artifact: str | os.PathLike[str], feedback_dir: str | os.PathLike[str] | None,
                 sync_seconds: float = 0.5, apply_seconds: float = 0.05, limits: Limits | None = None,
                 ann_min_items: int = ANN_MIN_ITEMS, overload_seconds: float = 0.1, explore: str | None = None,
                 ) -> None:
        epsilon = parse_explore(explore)
        self.limits = limits or Limits()
        self.ann_min_items = ann_min_items
        self.state = Loaded(Recommender.load(artifact), Path(artifact), ann_min_items)
        self.folder = Path(feedback_dir or default_feedback_dir(artifact))
        self.log = FeedbackLog(self.folder, validate=lambda event: event_problem(event, self.state.model, self.limits))
        self.writer = GroupCommitter(self.log)
        self.explorer = None if epsilon is None else Explorer(epsilon, self.folder)
        self.sync_seconds = sync_seconds
        self._last_sync = 0.0
        self.apply_seconds = apply_seconds
        self._pending: list[dict[str, Any]] = []
        self._wake = threading.Event()
        self._write_lock = threading.Lock()
        self._reload_lock = asyncio.Lock()
        self._applied_upto: dict[str, int] = {}  # own log positions a reload has already applied
        self.scorer = ScoringQueue(_score_unless_busy, max_lag=overload_seconds)
        replayed = list(self.log.replay(self.state.model.feedback_offsets_))
        if replayed:
            self.state.apply(replayed)
            log.info("replayed %d feedback events from %s", len(replayed), self.folder)
        if apply_seconds > 0:
            threading.Thread(target=self._applier, name="recforge-feedback", daemon=True).start()
        _freeze_heap()

    @property
    def model(self) -> Recommender:
        """The model serving now."""
        return self.state.model

    def _applier(self) -> None:
        """Apply queued feedback in micro-batches, so a burst costs one ``partial_fit``, not one per request."""
        while True:
            self._wake.wait()
            time.sleep(self.apply_seconds)  # gather what arrives meanwhile
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Apply queued feedback now (tests, shutdown)."""
        with self._write_lock:  # the batch belongs to the state it was queued for (a reload replays it itself)
            batch, self._pending, state = self._pending, [], self.state
        if batch:
            try:
                state.apply(batch)
            except Exception:  # keep serving: the events are durable and replay on restart
                log.exception("applying %d feedback events failed", len(batch))

    # ------------------------------------------------------------------ ids
    def index_of(self, value: Any, what: str, state: Loaded) -> int:
        """The index of a known ``"user"`` or ``"item"`` id (strictly parsed); 422 for a malformed id, 404 for an
        unknown one."""
        idmap = state.model.user_map_ if what == "user" else state.model.item_map_
        parsed = _parsed(parse_id, value, idmap.is_string, what, self.limits)
        idx = idmap.find(parsed)
        if idx < 0:
            raise HTTPException(404, f"unknown {what} {str(parsed)[:80]!r}")
        return idx

    async def recommend(self, user: Any, k: int, exclude_seen: bool) -> dict[str, Any]:
        """The ``GET /recommend`` answer for a user id, scored in a micro-batch (:mod:`.batching`); 404 for an
        unknown user, 503 (with ``Retry-After``) while the service runs too far behind to answer in time."""
        self.sync()
        state = self.state
        u = self.index_of(user, "user", state)
        try:
            items, scores = await self.scorer.submit(state, u, k, exclude_seen)
        except Overloaded as exc:
            raise HTTPException(503, f"overloaded, retry later ({exc})", headers={"Retry-After": "1"}) from None
        if self.explorer is None or (items < 0).any():  # too few items left to explore among: the top-k as it is
            return {"user": user, "items": _items_payload(state.model, items, scores)}
        return await self._explore(self.explorer, state, user, u, items, scores, exclude_seen)

    async def _explore(self, explorer: Explorer, state: Loaded, user: Any, u: int, items: np.ndarray,
                       scores: np.ndarray, exclude_seen: bool) -> dict[str, Any]:
        """An exploring answer (:mod:`.impressions`): the drawn slate, its impression durable before the answer;
        items outside the model's top-k have no score (``null``)."""
        m = state.model
        excluded = np.zeros(0, np.int64)
        if exclude_seen:
            seen = m.seen_.indices[m.seen_.indptr[u] : m.seen_.indptr[u + 1]]
            excluded = np.union1d(seen, np.fromiter(state.extra_seen.get(u, ()), np.int64)).astype(np.int64)
        draw = explorer.draw(items.astype(np.int64), m.n_items_, excluded)
        slate = draw.slates[0]
        known = dict(zip(items.tolist(), _json_scores(scores)))
        ids = m.item_map_.to_ids(slate).tolist()
        user_id = m.user_map_.to_ids(np.array([u])).tolist()[0]  # as the model stores it, not as the query spelt it
        request_id, written = explorer.record(user_id, ids, draw, f"{m.name}+epsilon:{explorer.epsilon:g}",
                                              state.artifact.name)
        try:
            await asyncio.wrap_future(written)
        except StorageError as exc:
            raise HTTPException(503, f"{exc}; the impression could not be logged") from None
        payload = _items_payload(m, slate, np.zeros(len(slate)))
        for row, idx in zip(payload, slate.tolist()):
            row["score"] = known.get(idx)
        return {"user": user, "items": payload, "request_id": request_id}

    # ------------------------------------------------------------------ feedback
    def sync(self) -> None:
        """Apply records other worker processes wrote (at most every ``sync_seconds``)."""
        now = time.monotonic()
        if now - self._last_sync < self.sync_seconds:
            return
        self._last_sync = now
        new = self.log.read_new()
        if new:
            self.state.apply(new)

    async def record(self, events: list[Event]) -> tuple[int, list[str]]:
        """Check events, make them durable (group-committed by the writer thread), then apply them; returns how
        many were accepted and what each one does (:func:`outcomes`)."""
        rows = _parsed(check_batch, [e.model_dump(exclude_none=True) for e in events], self.model, self.limits)
        now = int(time.time())
        for row in rows:
            row.setdefault("timestamp", now)
        try:
            n, segment, end = await asyncio.wrap_future(self.writer.submit(rows))
        except StorageError as exc:
            raise HTTPException(503, f"{exc}; nothing was acknowledged") from None
        with self._write_lock:
            state = self.state
            done = outcomes(state.model, rows)
            if self._applied_upto.get(segment, -1) >= end:
                return n, done  # a reload read these rows from the log and applied them to the new model
            state.mark_seen([r["user"] for r in rows], [r["item"] for r in rows])
            if self.apply_seconds > 0:
                self._pending.extend(rows)
        if self.apply_seconds > 0:
            self._wake.set()
        else:
            state.apply(rows)
        return n, done

    # ------------------------------------------------------------------ hot swap
    async def reload(self, artifact: Path | None = None) -> Loaded:
        """Load ``artifact`` (default: the one serving), replay the feedback log into it (from where a refitted
        artifact's training stopped), and swap it in without dropping a request or an acknowledged event."""
        async with self._reload_lock:
            path = artifact or self.state.artifact
            # Loading competes with the loop for the interpreter; the lag it causes is not an overload to shed.
            self.scorer.holding += 1
            try:
                fresh, reader, offsets = await asyncio.to_thread(self._prepare, path)
                # On the event loop and without an await: no request handler runs until the swap is done.
                with self._write_lock:
                    more, offsets = reader.read_since(offsets)  # what was acknowledged while it loaded
                    if more:
                        fresh.apply(more)
                    self.state, self._pending = fresh, []
                    self._applied_upto = offsets
                    self.log.skip_to(offsets)
            finally:
                self.scorer.release(grace=SWAP_GRACE)
            log.info("reloaded %s: %s with %d feedback events", path, fresh.model.name, fresh.n_events)
            _freeze_heap()
            return fresh

    def _prepare(self, path: Path) -> tuple[Loaded, FeedbackLog, dict[str, int]]:
        fresh = Loaded(Recommender.load(path), path, self.ann_min_items)
        reader = FeedbackLog(self.folder, validate=lambda event: event_problem(event, fresh.model, self.limits))
        events, offsets = reader.read_since(fresh.model.feedback_offsets_ or {})
        if events:
            fresh.apply(events)
        return fresh, reader, offsets


#: HNSW search breadth for ``/recommend``: recall@10 0.976 against exact scoring on a million-item, 64-factor ALS,
#: at 0.84 ms a search on one core (128: 0.994 at 1.43 ms).
SERVE_EXPANSION = 64
#: Seconds after a hot swap during which requests queue rather than being shed: a backlog of t seconds at
#: utilisation u takes t / (1 - u) to drain (1.5 s at 70%: 5 s), and a swap is rare enough to afford it.
SWAP_GRACE = 10.0


def _vector_index(items: np.ndarray, graph: np.ndarray | None) -> VectorIndex:
    """The HNSW index over a model's item vectors: the artifact's stored graph, or built now (slow for a big
    catalogue) when there is none or it does not fit."""
    if graph is not None:
        try:
            return HNSWIndex(items, graph=graph, expansion_search=SERVE_EXPANSION)
        except DataError as exc:
            log.warning("%s: building a new one", exc)
    started = time.perf_counter()
    index = HNSWIndex(items, expansion_search=SERVE_EXPANSION)
    log.info("HNSW index over %d items built in %.1f s", len(items), time.perf_counter() - started)
    return index


def _freeze_heap() -> None:
    """Move everything loaded so far out of the garbage collector's view: the libraries and the model are a few
    hundred thousand objects that live as long as the process, and a full collection walking them (≈150 ms on a
    small machine) would stall every request in flight."""
    gc.collect()
    gc.freeze()


def _score_unless_busy(state: Loaded, users: np.ndarray, k: int, exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
    """Score on the event loop, or raise :class:`Busy` while feedback is being learned (the loop never blocks)."""
    if not state.lock.acquire(blocking=False):
        raise Busy
    try:
        return state.top_k(users, k, exclude_seen)
    finally:
        state.lock.release()


def _parsed(parse: Any, *args: Any) -> Any:
    """``parse(*args)`` with :class:`EventError` answered as its HTTP status."""
    try:
        return parse(*args)
    except EventError as exc:
        raise HTTPException(exc.status, str(exc)) from None


def _json_scores(scores: np.ndarray) -> list[float | None]:
    """Scores as JSON numbers: one that is not finite (a model whose values overflow for this user) is ``null``
    rather than a response JSON cannot carry."""
    return [s if math.isfinite(s) else None for s in np.asarray(scores, np.float64).tolist()]


def _items_payload(model: Recommender, items: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    valid = items >= 0
    items = items[valid]
    ids, values = model.item_map_.to_ids(items).tolist(), _json_scores(scores[valid])
    out = [{"item_id": i, "score": s, "rank": r} for r, (i, s) in enumerate(zip(ids, values), start=1)]
    titles = getattr(model, "item_titles_", None)
    if titles is not None:
        for row, idx in zip(out, items.tolist()):
            if titles[idx]:
                row["title"] = str(titles[idx])
    return out


@dataclass
class _GuardOptions:
    requests: Counter
    latency: Histogram
    max_body: int
    routes: Callable[[], list[Any]]
    #: answers a request from its scope alone, or ``None`` to hand it to the application
    fast: Callable[[dict[str, Any]], Awaitable[Response | None]] | None = None


class _Guard:
    """Pure ASGI middleware (no per-request task): request counts and latencies for Prometheus (labelled by known
    routes only, so random paths cannot grow the metrics), the body-size limit — by Content-Length up front, and
    for a body without one (chunked) by reading it, up to the limit, before the application sees it — and the
    ``GET /recommend`` hot path."""

    def __init__(self, app: Any, options: _GuardOptions) -> None:
        self.app, self.options = app, options
        self.requests, self.latency, self.max_body = options.requests, options.latency, options.max_body
        self.routes = options.routes

    def allowed(self, path: str) -> str:
        """Every method any route of ``path`` takes (a 405 must list them all, not just one route's)."""
        methods: set[str] = set()
        for route in self.routes():
            regex = getattr(route, "path_regex", None)
            if regex is not None and regex.match(path):
                methods |= set(getattr(route, "methods", None) or ())
        return ", ".join(sorted(methods))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = scope["path"].split("/")[1] or "root"
        route = route if route in ROUTES else "other"
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if message["status"] == 405:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                    message = {**message, "headers": [*headers, (b"allow", self.allowed(scope["path"]).encode())]}
            await send(message)

        size = dict(scope.get("headers", ())).get(b"content-length")
        too_big = size is not None and (not size.isdigit() or int(size) > self.max_body)
        if size is None and not too_big and scope.get("method") in ("POST", "PUT", "PATCH"):
            body, too_big = await self._read_body(receive)
            receive = _replay(body)
        fast = None
        if too_big:
            fast = JSONResponse({"detail": f"request body larger than {self.max_body} bytes"}, 413)
        elif self.options.fast is not None and route == "recommend" and scope["method"] == "GET" \
                and scope["path"] == "/recommend":
            fast = await self.options.fast(scope)
        if fast is not None:
            await fast(scope, receive, send_wrapper)
        else:
            await self.app(scope, receive, send_wrapper)
        self.requests.labels(route, str(status["code"])).inc()
        self.latency.labels(route).observe(time.perf_counter() - start)

    async def _read_body(self, receive: Any) -> tuple[bytes, bool]:
        chunks, n = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            n += len(chunk)
            if n > self.max_body:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def _replay(body: bytes) -> Any:
    sent = {"done": False}

    async def receive() -> dict[str, Any]:
        if sent["done"]:
            return {"type": "http.disconnect"}
        sent["done"] = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def create_app(artifact: str | os.PathLike[str], settings: ServeSettings | None = None, **overrides: Any) -> FastAPI:
    """The service for a saved model, configured by ``settings`` (:class:`ServeSettings`; keyword arguments of
    the same names override single fields). Feedback is checked, durable and excluded from the user's lists when
    ``POST /feedback`` answers; the model learns from it in micro-batches every ``apply_seconds``."""
    cfg = settings or ServeSettings()
    if overrides:
        unknown = set(overrides) - set(ServeSettings.__dataclass_fields__)
        if unknown:
            raise TypeError(f"create_app() got unknown settings {sorted(unknown)}")
        overrides = {k: (str(v) if k == "feedback_dir" and v is not None else v) for k, v in overrides.items()}
        cfg = ServeSettings(**{**asdict(cfg), "limits": cfg.limits, **overrides})
    service = Service(artifact, cfg.feedback_dir, cfg.sync_seconds, cfg.apply_seconds, cfg.limits,
                      cfg.ann_min_items, cfg.overload_seconds, cfg.explore)
    first = service.model
    app = FastAPI(title="recforge", version=recforge.__version__, lifespan=_reload_on_sighup,
                  description=f"Recommendations from a {type(first).__name__} ({first.n_users_:,} users, "
                              f"{first.n_items_:,} items when it started)")
    app.state.service = service
    registry = CollectorRegistry()
    requests = Counter("recforge_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("recforge_request_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
    # a gauge, not a counter: with several workers each replays the same log, and "max" merges them right
    skipped = Gauge("recforge_feedback_skipped", "Feedback log records skipped on replay (damaged or invalid)",
                    ["reason"], registry=registry, multiprocess_mode="max")
    for reason, n in service.log.skipped.items():
        skipped.labels(reason).set(n)
    guard = _GuardOptions(requests, latency, cfg.max_body_bytes, lambda: app.routes)
    app.add_middleware(_Guard, options=guard)

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

    write_keys = [cfg.api_key.encode("utf-8")] if cfg.api_key else []
    read_keys = write_keys + ([cfg.read_key.encode("utf-8")] if cfg.read_key else [])

    def key_check(keys: list[bytes], what: str) -> Any:
        async def check(x_api_key: str | None = Header(default=None)) -> None:
            if not keys:
                return
            # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent
            if not key_matches(None if x_api_key is None else x_api_key.encode("latin-1"), keys):
                raise HTTPException(401, f"missing or wrong X-API-Key header ({what})")
        return check

    check_write = key_check(write_keys, "this endpoint needs the write key")
    needed_for_reads = [] if cfg.open_reads else read_keys
    check_read = key_check(needed_for_reads, "reads need a key on this service")

    async def fast_recommend(scope: dict[str, Any]) -> Response | None:
        """``GET /recommend`` without the framework when the request is plainly valid (see :mod:`.fastpath`)."""
        query = recommend_query(scope.get("query_string", b""), MAX_K)
        if query is None or not (query[2] or cfg.allow_include_seen):
            return None
        if needed_for_reads and not key_matches(first_header(scope, b"x-api-key"), needed_for_reads):
            return None
        try:
            return JSONResponse(await service.recommend(*query))
        except HTTPException as exc:  # answered as FastAPI's handler would: {"detail": ...} and the headers
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    guard.fast = fast_recommend

    install_openapi(app, first, cfg.limits)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        state = service.state
        return {"status": "ok", "model": state.model.name, "users": state.model.n_users_,
                "items": state.model.n_items_, "feedback_events": state.n_events + len(service._pending)}

    @app.get("/metrics", dependencies=[Depends(check_read)], response_class=PlainTextResponse, responses=ERRORS)
    async def metrics() -> Response:
        """Prometheus text format: ``recforge_requests_total``, ``recforge_request_seconds`` and
        ``recforge_feedback_skipped``, summed over the workers when there are several."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several workers: every worker's series, merged
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return Response(generate_latest(merged), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # Handlers are async: they take a millisecond or two of CPU, and a thread-pool hop would cost as much.
    # Learning from feedback (partial_fit) runs in a background thread, in micro-batches.
    @app.get("/recommend", dependencies=[Depends(check_read)], responses=ERRORS)
    async def recommend(
        user: str = Query(min_length=1, max_length=MAX_USER_CHARS, description="User id"),
        k: int = Query(10, ge=1, le=MAX_K),
        exclude_seen: bool = True,
    ) -> JSONResponse:
        """Top-k items for a known user, seen items (training + feedback) excluded (``exclude_seen=false`` only
        where the service allows it)."""
        if not exclude_seen and not cfg.allow_include_seen:
            raise HTTPException(403, "exclude_seen=false would list the user's history; this service does not "
                                     "allow it (recforge serve --allow-include-seen)")
        return JSONResponse(await service.recommend(user, k, exclude_seen))

    def recommend_history(body: HistoryBody) -> dict[str, Any]:
        """Top-k items for a session (items oldest first); unknown items are ignored. A history with no known
        item gets the most popular items, marked ``"fallback": "popularity"``."""
        state = service.state
        m = state.model
        ids = _parsed(parse_ids, body.items, m.item_map_.is_string, "item", service.limits)
        known = m.item_map_.to_index(ids, on_unknown="keep") if len(ids) else np.zeros(0, np.int32)
        if not (known >= 0).any():
            top = state.popular[:body.k]
            return {"items": _items_payload(m, top, state.popularity[top]), "fallback": "popularity",
                    "reason": "the history has no item this model knows"}
        with state.lock:
            try:
                recs = m.recommend_for_history(ids, k=body.k, exclude_history=body.exclude_history,
                                               on_unknown="ignore")
            except UnsupportedError as exc:
                raise HTTPException(400, str(exc)) from None
        items = m.item_map_.to_index(recs["item_id"].to_numpy(), on_unknown="keep")
        return {"items": _items_payload(m, np.asarray(items), recs["score"].to_numpy())}

    async def similar(item: str, k: int = Query(10, ge=1, le=MAX_K)) -> dict[str, Any]:
        """The k items most similar to ``item``."""
        state = service.state
        idx = np.array([service.index_of(item, "item", state)])
        with state.lock:
            try:
                top, scores = state.model.similar_indices(idx, k)
            except UnsupportedError as exc:
                raise HTTPException(400, str(exc)) from None
        return {"item": item, "items": _items_payload(state.model, top[0], scores[0])}

    # Only what the model can do is published (and routed): a client generated from /openapi.json never calls an
    # endpoint that must refuse it.
    if type(first).scores_histories():
        app.post("/recommend", dependencies=[Depends(check_read)], responses=ERRORS)(recommend_history)
    if type(first).has_similarity():
        app.get("/similar/{item}", dependencies=[Depends(check_read)], responses=ERRORS)(similar)

    # The handler waits for the writer thread's fsync (group commit), so a slow disk delays only feedback.
    @app.post("/feedback", dependencies=[Depends(check_write)], responses=ERRORS)
    async def feedback(body: FeedbackBody) -> dict[str, Any]:
        """Check events, append them to the durable log (fsync'd before this answers) and apply them."""
        n, done = await service.record(body.events)
        return {"accepted": n, **{o: done.count(o) for o in OUTCOMES}, "outcomes": done, "total": service.log.n_written}

    @app.post("/admin/reload", dependencies=[Depends(check_write)], responses=ERRORS)
    async def reload(body: ReloadBody | None = None) -> dict[str, Any]:
        """Hot swap: load an artifact (default: the one serving, e.g. refitted in place by ``recforge refit``),
        replay the feedback log it has not learned from, and switch to it without dropping requests."""
        if not write_keys:
            raise HTTPException(403, "reloading over HTTP needs a write key (recforge serve --api-key); "
                                     "or send the process SIGHUP")
        try:
            fresh = await service.reload(Path(body.artifact) if body and body.artifact else None)
        except RecforgeError as exc:
            raise HTTPException(409, f"not reloaded, still serving the previous model: {exc}") from None
        return {"reloaded": fresh.model.name, "users": fresh.model.n_users_, "items": fresh.model.n_items_,
                "feedback_events": fresh.n_events}

    return app


@contextlib.asynccontextmanager
async def _reload_on_sighup(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan: SIGHUP hot-swaps the artifact (where this loop may take signals: the main thread on POSIX)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_logged(app.state.service)))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        log.debug("SIGHUP reload not available here (not the main thread, or no signals)")
    yield


async def _reload_logged(service: Service) -> None:
    try:
        await service.reload()
    except RecforgeError as exc:
        log.error("SIGHUP reload failed, still serving the previous model: %s", exc)


def create_app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (used by ``recforge serve``, also with several workers): the artifact
    from ``RECFORGE_SERVE_ARTIFACT``, the settings from :meth:`ServeSettings.from_env`."""
    artifact = os.environ.get("RECFORGE_SERVE_ARTIFACT")
    if not artifact:
        raise RecforgeError("RECFORGE_SERVE_ARTIFACT is not set; start the service with `recforge serve ARTIFACT`")
    return create_app(artifact, ServeSettings.from_env())
