"""Progress bars for training loops: one bar per fit, the latest loss in its postfix, silenced on demand."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class EpochProgress:
    """Iterate over epochs with a tqdm bar; ``log(loss)`` records the loss in ``history`` and shows it.

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
        self._bar: tqdm | None = None

    def __iter__(self) -> Iterator[int]:
        self._bar = tqdm(range(self.n_epochs), desc=self.desc, unit="epoch", disable=not self.enabled, leave=False)
        yield from self._bar
        self._bar.close()
        if self.history:
            log.info("%s: %d epochs, final loss %.6g", self.desc, len(self.history), self.history[-1])

    def log(self, loss: float) -> None:
        """Record one epoch's loss."""
        self.history.append(float(loss))
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.5g}")
