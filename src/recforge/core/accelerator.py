"""Whether work goes to a GPU, decided without importing torch where the answer is known to be the CPU.

Importing torch costs about a second, which a command scoring a few users, or a model told ``device="cpu"``,
never pays; :mod:`recforge.core.device` (which imports torch) is imported here only when a GPU may be used.
"""

from __future__ import annotations

import os
from typing import Any

#: From this many rows a top-k may run on a GPU (below it, looking for one costs more than it saves).
DEVICE_MIN_ROWS = 256


def _cpu_chosen(device: Any) -> bool:
    name = str(device).strip().lower()
    if name == "auto":  # RECFORGE_DEVICE is recforge.core.gpu_environment.DEVICE_ENV
        name = os.environ.get("RECFORGE_DEVICE", "").strip().lower() or "auto"
    return name == "cpu"


def cuda_device(device: Any = "auto") -> Any:
    """The CUDA ``torch.device`` a ``device`` parameter (``"auto"``, ``"cpu"``, ``"cuda[:N]"``) resolves to, or
    None for the CPU; errors as :func:`recforge.core.device.resolve_device`."""
    if _cpu_chosen(device):
        return None
    from recforge.core.device import resolve_device

    resolved = resolve_device(device)
    return resolved if resolved.type == "cuda" else None


def device_for_work(device: Any, n_work: int, min_work: int) -> Any:
    """:func:`cuda_device` for a job of ``n_work`` units, except that ``"auto"`` stays on the CPU below
    ``min_work`` units, where a GPU costs more than it saves; a device named explicitly is used at any size."""
    if str(device).strip().lower() == "auto" and n_work < min_work:
        return None
    return cuda_device(device)


def device_for_rows(n_rows: int) -> Any:
    """The CUDA device to score and rank ``n_rows`` rows on (where ``"auto"`` resolves to a GPU, for at least
    :data:`DEVICE_MIN_ROWS` rows), or None for the CPU."""
    return device_for_work("auto", n_rows, DEVICE_MIN_ROWS)
