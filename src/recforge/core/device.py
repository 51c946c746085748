"""Where torch work runs: CUDA when present, else the CPU; how many CPU threads torch may use; mixed precision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from recforge.core.threads import resolve_threads
from recforge.errors import ParameterError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) picks ``cuda`` when a GPU is visible and ``cpu`` otherwise; other values are
    checked so a typo or a missing GPU gives a clear error instead of a failure deep inside torch."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParameterError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} was asked for, but no CUDA GPU is available; use device='auto' or 'cpu'")
    return dev


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[int]:
    """Run a block with at most ``num_threads`` torch intra-op threads (0/None = all cores), then restore."""
    n = resolve_threads(num_threads)
    previous = torch.get_num_threads()
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for mixed precision: bfloat16 on GPUs that support it, float16 on older ones, none on
    the CPU (CPU autocast is slower than float32 for these small models)."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
