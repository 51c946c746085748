"""Progress on stderr: a tqdm bar in a terminal, plain lines elsewhere (logs and pipes get no escape codes and no
carriage returns), nothing when silenced; and the one-line summary that ends every training loop."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

#: Seconds between two plain progress lines.
PLAIN_INTERVAL = 30.0


class PlainProgress:
    """The part of tqdm's interface recforge uses, as a line on stderr at most every :data:`PLAIN_INTERVAL`
    seconds (``desc: 120/400 steps (30%), 12 s``) and one at the end."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, **_: Any) -> None:
        self.iterable = iterable
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.desc = desc or "progress"
        self.unit = unit
        self.n = initial
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._end("stopped" if exc_type is not None else "done")

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; print a line if the last one is old enough."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= PLAIN_INTERVAL:
            self._last = now
            self._write(now)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Shown at the end of the next line, like tqdm's postfix."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        """Shown at the end of the next line."""
        self.postfix = text

    def close(self) -> None:
        """The last line (once), if any time worth reporting passed."""
        self._end("done")

    def _end(self, how: str) -> None:
        """The last line, ``done`` or ``stopped`` (the block it counted ended by an error)."""
        if not self._closed:
            self._closed = True
            if time.monotonic() - self._start >= 1.0:
                self._write(time.monotonic(), end=how)

    def _write(self, now: float, end: str = "") -> None:
        count = f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        head = f"{end}, " if end else ""
        sys.stderr.write(f"{self.desc}: {head}{count}{share}, {now - self._start:.0f} s{tail}\n")
        sys.stderr.flush()


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A progress reporter with tqdm's interface (``update``, ``set_postfix``, ``close``, iteration, ``with``):
    a tqdm bar when stderr is a terminal, :class:`PlainProgress` lines when it is not, silent when not
    ``enabled``."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)


class EpochProgress:
    """Iterate over epochs with a progress bar; ``log(loss)`` records the loss in ``history`` and shows it, and the
    loop ends with one summary line on stderr (``FunkSVD: 60 epochs in 1.6 s, final loss 0.61``) when enabled.

    Example::

        bar = EpochProgress(self.epochs, "FunkSVD", enabled=self.progress)
        for epoch in bar:
            bar.log(train_one_epoch())
        self.loss_history_ = bar.history
    """

    def __init__(self, n_epochs: int, desc: str, enabled: bool = True) -> None:
        self.n_epochs = n_epochs
        self.desc = desc
        self.enabled = enabled
        self.history: list[float] = []
        self._bar: Any = None

    def __iter__(self) -> Iterator[int]:
        started = time.perf_counter()
        self._bar = progress_bar(range(self.n_epochs), desc=self.desc, unit="epoch", enabled=self.enabled,
                                 leave=False)
        yield from self._bar
        self._bar.close()
        line = fit_summary(self.desc, len(self.history) or self.n_epochs, time.perf_counter() - started,
                           f"final loss {self.history[-1]:.5g}" if self.history else None)
        if self.enabled:
            sys.stderr.write(line + "\n")
        log.info(line)

    def log(self, loss: float) -> None:
        """Record one epoch's loss."""
        self.history.append(float(loss))
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.5g}")


def fit_summary(model: str, epochs: int, seconds: float, detail: str | None = None) -> str:
    """The one line that ends a fit: model, epochs, seconds and (``detail``) its loss or best validation score."""
    return f"{model}: {epochs} epochs in {seconds:.1f} s" + (f", {detail}" if detail else "")
