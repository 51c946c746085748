"""Thread control: numba's parallel loops and BLAS must not oversubscribe the cores.

Models with a ``num_threads`` parameter (0 = all cores) run their work inside :func:`thread_limits`, which sets
numba's thread count and caps BLAS (OpenBLAS/MKL via threadpoolctl) for the duration, then restores both; torch's
threads are capped by :func:`recforge.core.device.torch_threads`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numba
import numpy as np
from threadpoolctl import threadpool_limits


def resolve_threads(num_threads: int | None) -> int:
    """``None`` or ``0`` means every thread numba may use (this process's share of the cores when a launcher
    such as torchrun runs several ranks on the machine); otherwise at most that many."""
    limit = numba.config.NUMBA_NUM_THREADS
    if not num_threads or num_threads <= 0:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return max(1, limit // ranks_here) if ranks_here > 1 else limit
    return max(1, min(int(num_threads), limit))


@contextlib.contextmanager
def thread_limits(num_threads: int | None, blas_threads: int | None = None) -> Iterator[int]:
    """Run a block with ``num_threads`` numba threads and ``blas_threads`` BLAS threads (default: the same)."""
    n = resolve_threads(num_threads)
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=blas_threads or n, user_api="blas"):
            yield n
    finally:
        numba.set_num_threads(previous)


#: Bytes between the starts of two :func:`chunk_scratch` buffers, at least (a cache line, four AVX-512 vectors of
#: float32 apart).
_SCRATCH_ALIGN = 64


@numba.njit(cache=True)
def chunk_scratch(n_chunks: int, n_buffers: int, length: int, like: np.ndarray) -> np.ndarray:
    """Scratch buffers for a numba ``prange`` over ``n_chunks`` work units: ``[c, b, :length]`` is chunk ``c``'s
    buffer ``b``, of ``like``'s dtype, every buffer starting on a 64-byte boundary, one gap of 64 bytes or more
    from the next.

    Why not ``np.empty`` inside the loop: buffers allocated there come from each thread's own heap, and a row's
    result then depended on the thread that computed it (seen on an AMD EPYC: ImplicitALS's factors changed with
    ``num_threads``, and from run to run). The likely mechanism, not traced to the machine code: with ``fastmath``
    LLVM vectorises loops over such buffers behind run-time placement checks, falling back to a scalar path that
    rounds differently."""
    per = _SCRATCH_ALIGN // like.itemsize
    padded = ((length + per - 1) // per + 1) * per
    raw = np.empty(n_chunks * n_buffers * padded + per, like.dtype)
    start = ((_SCRATCH_ALIGN - raw.ctypes.data % _SCRATCH_ALIGN) % _SCRATCH_ALIGN) // like.itemsize
    return raw[start : start + n_chunks * n_buffers * padded].reshape(n_chunks, n_buffers, padded)
