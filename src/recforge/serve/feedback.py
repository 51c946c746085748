"""A durable feedback log: every acknowledged event is on disk (fsync'd) before the service answers.

Records are lines ``<crc32 hex> <json>\\n`` in segment files ``feedback-YYYYMMDD-<pid>-<n>.log`` (one per day and
writer process, so several workers never write the same file). Replaying reads every segment in name order,
splitting on ``\\n`` only (JSON escapes every other control byte, so a stray ``\\r`` or NUL can only be damage). A
damaged stretch (bad checksum, bad JSON, garbage such as a block of NULs) is skipped with a warning, and reading
resynchronises at the next intact record, also when that record shares a line with the garbage; a record whose
content a validator refuses is skipped the same way. Nothing in a segment raises. ``read_new`` returns records
other writers appended since the last call, which is how several worker processes see each other's feedback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from recforge.data.io import fsync_folder
from recforge.errors import StorageError

log = logging.getLogger(__name__)

_PREFIX = "feedback-"
_RECORD_START = re.compile(rb"[0-9a-f]{8} \{")

#: Checks one replayed event: ``None`` when it is good, else the reason it is refused.
Validator = Callable[[dict[str, Any]], "str | None"]
#: Where a write ended: how many records, the segment's name, the byte offset after them.
Position = tuple[int, str, int]


def encode_record(event: dict[str, Any]) -> bytes:
    """One log line: the CRC32 of the JSON body (8 hex digits), a space, the JSON body, a newline."""
    body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The event of a complete line, or ``None`` when the line is damaged (bad checksum, bad JSON, truncated)."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        event = json.loads(body)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class FeedbackLog:
    """Append-only, fsync'd event log in ``folder`` (created if missing)."""

    def __init__(self, folder: str | os.PathLike[str], validate: Validator | None = None) -> None:
        self.folder = Path(folder)
        check_folder(self.folder)
        self.validate = validate
        self.skipped: Counter[str] = Counter()  # why replayed records were refused: "damaged" or "invalid"
        self._day = ""
        self._file: Any = None
        self._path: Path | None = None
        self._offsets: dict[str, int] = {}
        self._own: set[str] = set()  # segments this writer created: never re-read (their records are applied)
        self._ignored: set[str] = set()  # names like a segment that are not files (warned about once)
        self.n_written = 0

    # ------------------------------------------------------------------ writing
    def _segment(self) -> Any:
        day = time.strftime("%Y%m%d", time.gmtime())
        if self._file is None or day != self._day:
            if self._file is not None:
                self._file.close()
            n = 0
            while True:
                path = self.folder / f"{_PREFIX}{day}-{os.getpid()}-{n}.log"
                if not path.exists():
                    break
                n += 1
            self._file = open(path, "ab")  # noqa: SIM115 - kept open for appends; closed in close()
            self._path, self._day = path, day
            self._own.add(path.name)
            fsync_folder(self.folder)  # the new file's directory entry must survive a crash too
        return self._file

    def append(self, events: Iterable[dict[str, Any]]) -> int:
        """Write events and fsync; returns how many. When this returns, the events survive a crash."""
        return self._write(b"".join(encode_record(e) for e in events))[0]

    def _write(self, data: bytes) -> Position:
        """Write and fsync ``data``; returns how many records, and the segment and byte offset they end at."""
        if not data:
            return 0, "", 0
        fh = self._segment()
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        n = data.count(b"\n")
        self.n_written += n
        assert self._path is not None
        return n, self._path.name, fh.tell()

    def close(self) -> None:
        """Close the current segment."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # ------------------------------------------------------------------ reading
    def segments(self) -> list[Path]:
        """Every segment file, oldest name first; anything else named like one (a folder, a socket) is ignored
        with a warning."""
        out = []
        for path in sorted(self.folder.glob(f"{_PREFIX}*.log")):
            if path.is_file():
                out.append(path)
            elif path.name not in self._ignored:
                log.warning("feedback log: ignoring %s, which is not a regular file", path.name)
                self._ignored.add(path.name)
        return out

    def _read(self, path: Path, start: int) -> tuple[list[dict[str, Any]], int]:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
        events: list[dict[str, Any]] = []
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                break  # an incomplete last line: a write in progress or a crash; not consumed
            self._take(data, pos, end + 1, path, start, events)
            pos = end + 1
        return events, start + pos

    def _take(self, data: bytes, pos: int, end: int, path: Path, start: int, events: list[dict[str, Any]]) -> None:
        """Decode the line ``data[pos:end]``; when it is damaged, resynchronise at the first intact record
        inside it (garbage without a newline, such as a block of NULs, glues itself to the next record)."""
        event = decode_line(data[pos:end])
        if event is None:
            for match in _RECORD_START.finditer(data, pos + 1, end):
                event = decode_line(data[match.start():end])
                if event is not None:
                    self._skip("damaged", path, start + pos, match.start() - pos)
                    break
            else:
                self._skip("damaged", path, start + pos, end - pos)
                return
        reason = self.validate(event) if self.validate is not None else None
        if reason is not None:
            self._skip("invalid", path, start + pos, end - pos, reason)
            return
        events.append(event)

    def _skip(self, kind: str, path: Path, at: int, size: int, reason: str = "") -> None:
        self.skipped[kind] += 1
        what = f"an invalid record ({reason})" if reason else "a damaged record"
        log.warning("feedback log %s: skipping %s at byte %d (%d bytes)", path.name, what, at, size)

    def replay(self, start: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
        """Every valid record of every segment (damaged ones skipped with a warning), from the byte offsets in
        ``start`` (what a refitted model was trained on) or the beginning; marks them as read."""
        for path in self.segments():
            events, end = self._read(path, (start or {}).get(path.name, 0))
            size = path.stat().st_size
            if end < size:
                log.warning("feedback log %s: skipping a half-written last record (%d bytes)", path.name, size - end)
            self._offsets[path.name] = end
            yield from events

    def read_since(self, offsets: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The records of every segment (this writer's too) after ``offsets``, and the offsets they end at;
        ``offsets`` of this reader are not touched."""
        events: list[dict[str, Any]] = []
        ends = dict(offsets)
        for path in self.segments():
            got, ends[path.name] = self._read(path, offsets.get(path.name, 0))
            events.extend(got)
        return events, ends

    def skip_to(self, offsets: dict[str, int]) -> None:
        """Treat other writers' records before ``offsets`` as read (they were applied elsewhere)."""
        for name, end in offsets.items():
            if name not in self._own:
                self._offsets[name] = max(self._offsets.get(name, 0), end)

    def read_new(self) -> list[dict[str, Any]]:
        """Records appended by other writers since the last ``replay``/``read_new``."""
        out: list[dict[str, Any]] = []
        for path in self.segments():
            if path.name in self._own:
                continue
            start = self._offsets.get(path.name, 0)
            try:
                if path.stat().st_size <= start:
                    continue
            except FileNotFoundError:
                continue
            events, end = self._read(path, start)
            self._offsets[path.name] = end
            out.extend(events)
        return out


def check_folder(folder: Path) -> None:
    """Create ``folder`` if missing; refuse one that is a file or that this process cannot write to, before the
    service acknowledges anything."""
    if folder.exists() and not folder.is_dir():
        raise StorageError(f"feedback folder {str(folder)!r} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"x")
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"feedback folder {str(folder)!r} is not writable: {exc.strerror or exc}") from None


class GroupCommitter:
    """Writes a :class:`FeedbackLog` from one background thread, with group commit: the batches submitted while
    an ``fsync`` runs are written together and made durable by the next single ``fsync``. Requests wait on a
    future, so a slow disk stalls only the requests that write, never the event loop or the reads."""

    def __init__(self, log: FeedbackLog) -> None:
        self.log = log
        self._queue: list[tuple[bytes, Future[Position]]] = []
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="recforge-feedback-writer", daemon=True)
        self._thread.start()

    def submit(self, events: Iterable[dict[str, Any]]) -> Future[Position]:
        """Queue events; once they are fsync'd the future gives how many were written and the segment and offset
        where the whole group ends (or the write's error)."""
        future: Future[Position] = Future()
        data = b"".join(encode_record(e) for e in events)
        with self._ready:
            if self._closed:
                raise StorageError("the feedback log is closed")
            self._queue.append((data, future))
            self._ready.notify()
        return future

    def close(self) -> None:
        """Write what is queued, then stop the thread and close the log."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()
        self.log.close()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                batch, self._queue = self._queue, []
                if not batch and self._closed:
                    return
            try:
                _, segment, end = self.log._write(b"".join(data for data, _ in batch))
            except OSError as exc:
                log.error("feedback log write failed: %s", exc)
                error = StorageError(f"the feedback log could not be written: {exc.strerror or exc}")
                for _, future in batch:
                    future.set_exception(error)
                continue
            for data, future in batch:
                future.set_result((data.count(b"\n"), segment, end))


def default_feedback_dir(artifact: str | os.PathLike[str]) -> Path:
    """Where ``recforge serve`` keeps the log of an artifact when no folder is given."""
    return Path(artifact) / "feedback"
