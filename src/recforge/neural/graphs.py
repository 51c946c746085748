"""Training steps replayed from a CUDA graph.

A small model's training step on a GPU is a few hundred short kernels, each launched from Python: the GPU waits
for the host between them (SASRec on ML-100K: about 10 ms a step on an H200 for perhaps 1 ms of GPU work). A CUDA
graph records the whole step once (forward, backward, gradient clipping, the optimiser's update) and replays it
with one launch. PyTorch's rules for that (its "whole-network capture"): every batch of the same shape, copied
into the same input tensors; no host synchronisation inside the step; an optimiser built with
``capturable=True``; autocast without its weight cache; warm-up steps on a side stream before the capture, on
the stream that captures.

:class:`GraphedStep` applies them to any step function; batches of another shape always run eagerly. A capture
that fails in Python while CUDA ended it cleanly falls back to running the step eagerly, with one warning; a
capture that CUDA invalidated (an operation a capture forbids) leaves torch's caching allocator, and before torch
2.13 its random generator, in the middle of a capture, so eager steps could not be trusted after it: that is an
error which says to train with ``cuda_graphs=False``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from recforge.errors import UnsupportedError

log = logging.getLogger(__name__)

#: Eager steps before the capture (PyTorch's examples use 3): lazy initialisation (cuBLAS handles, the optimiser's
#: state) must happen before, not during, the capture.
WARMUP_STEPS = 3

Batch = dict[str, Any]
StepFn = Callable[[Batch], torch.Tensor]


class CaptureInvalidated(RuntimeError):
    """CUDA refused to end a capture: an operation inside it is not allowed in a graph."""


class CudaGraphs:
    """The CUDA side of :class:`GraphedStep` (a test replaces it to run the same logic on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Run a block on the capturing stream, ordered after and before the current stream's work."""
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def capture(self, run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record ``run`` into a graph; its replay and the tensor the replays write the loss into.

        What ``torch.cuda.graph`` does, but the capture's stream is restored however the capture ends (that context
        manager ends the capture first, and a capture CUDA invalidated raises there, leaving the side stream current
        for everything after); :class:`CaptureInvalidated` when CUDA refuses to end it."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.stream.device)
        torch.cuda.empty_cache()
        with torch.cuda.stream(self.stream):
            graph.capture_begin()
            try:
                loss = run()
            finally:
                try:
                    graph.capture_end()
                except RuntimeError as exc:
                    raise CaptureInvalidated(_first_line(exc)) from exc
        return graph.replay, loss


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class GraphedStep:
    """One optimiser step per call, replayed from a CUDA graph once :data:`WARMUP_STEPS` eager steps on batches of
    one shape have run.

    ``step(batch) -> loss`` is the trainer's eager step: it zeroes the gradients (to None), runs the forward pass
    and the backward pass, clips and steps the optimiser, and returns the loss tensor. It must not synchronise with
    the host nor change shape with the values in the batch; the trainer checks the rest (no loss scaler, no
    data-parallel wrapper, a constant learning rate, which the graph records). ``before_capture()`` (optional)
    runs once, just before the capture: the trainer makes its optimiser capturable there.
    """

    def __init__(self, step: StepFn, device: torch.device, before_capture: Callable[[], None] | None = None) -> None:
        self.step = step
        self.before_capture = before_capture
        self.cuda = CudaGraphs(device)
        self.shape: tuple[Any, ...] | None = None
        self.warm = 0
        self.inputs: Batch | None = None
        self.replay: Callable[[], None] | None = None
        self.loss: torch.Tensor | None = None
        self.failed = False

    @staticmethod
    def _shape(batch: Batch) -> tuple[Any, ...]:
        return tuple((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, v)
                     for k, v in sorted(batch.items()))

    def __call__(self, batch: Batch) -> torch.Tensor:
        shape = self._shape(batch)
        if self.replay is not None and shape == self.shape:
            for key, value in batch.items():
                if isinstance(value, torch.Tensor):
                    self.inputs[key].copy_(value, non_blocking=True)  # type: ignore[index]
            self.replay()
            return self.loss.clone()  # type: ignore[union-attr]  # the next replay overwrites the captured one
        if self.failed or self.replay is not None or (self.shape is not None and shape != self.shape):
            return self.step(batch)
        self.shape = shape
        if self.warm < WARMUP_STEPS:
            self.warm += 1
            with self.cuda.side_stream():
                return self.step(batch)
        return self._capture(batch)

    def _capture(self, batch: Batch) -> torch.Tensor:
        """Record the step with ``batch`` in static input tensors, then replay it once for this batch (a capture
        only records)."""
        self.inputs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        failure = None
        if self.before_capture is not None:
            self.before_capture()
        try:
            self.replay, self.loss = self.cuda.capture(lambda: self.step(self.inputs))  # type: ignore[arg-type]
        except CaptureInvalidated as exc:
            raise UnsupportedError(f"the training step cannot be replayed from a CUDA graph here ({exc}); train with "
                                   "cuda_graphs=False") from exc
        except RuntimeError as exc:
            failure = _first_line(exc)
        if failure is not None:  # outside the except block, so the abandoned graph is freed before the eager step
            self.failed, self.inputs = True, None
            log.warning("CUDA graph capture of the training step failed (%s); training on without graphs", failure)
            return self.step(batch)
        log.info("training steps replayed from a CUDA graph (batches of %s)",
                 {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        self.replay()
        return self.loss.clone()  # type: ignore[union-attr]
