"""Thread control for models: numba's parallel loops and BLAS must not oversubscribe the cores.

Models with a ``num_threads`` parameter run their training inside :func:`thread_limits`, which sets numba's
thread count and caps BLAS (OpenBLAS/MKL via threadpoolctl) for the duration, then restores both.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import numba
from threadpoolctl import threadpool_info, threadpool_limits

log = logging.getLogger(__name__)
_warned = False


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


def check_blas_threads(parallel_threads: int) -> None:
    """Warn once when BLAS would use several threads inside work that is already parallel.

    Calling multi-threaded BLAS from several worker threads multiplies the threads and slows everything down;
    the fix is ``threadpoolctl.threadpool_limits(1, "blas")`` or ``OPENBLAS_NUM_THREADS=1``.
    """
    global _warned
    if _warned or parallel_threads <= 1:
        return
    for pool in threadpool_info():
        if pool.get("user_api") == "blas" and pool.get("num_threads", 1) > 1:
            _warned = True
            log.warning(
                "%s uses %d threads while recforge runs %d parallel workers; set OPENBLAS_NUM_THREADS=1 "
                "or use threadpoolctl.threadpool_limits(1, 'blas') to avoid oversubscription",
                pool.get("internal_api"),
                pool.get("num_threads"),
                parallel_threads,
            )
            return
