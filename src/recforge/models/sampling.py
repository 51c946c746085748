"""Sampling for the SGD models trained on (user, item) pairs with sampled negatives (BPR, pointwise MF).

The kernels draw from :mod:`recforge.core.rng` streams, so a fixed seed gives the same model on any machine
regardless of numpy's global random state; :func:`epoch_streams` shuffles an epoch's visiting order and hands out
one stream per thread chunk.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit

from recforge.core.params import Boolean, Choice, Constraint, Integer, Real
from recforge.core.rng import rand_below, seed_states, shuffle_in_place

_MAX_TRIES = 64  # negative draws per sample before giving up (a user who has nearly every item)
#: Samples per epoch from which ``device="auto"`` trains BPR and the pointwise model on a GPU. Below it the GPU's
#: blocks are small and launching them dominates: on one H200 a BPR trial on ml-latest-small (100,836 pairs, up to
#: 400 epochs) took 20-65 s in blocks of 504 samples and 3-26 s in blocks of 4,096, where the CPU kernel fits the
#: 200-epoch default in 4.7 s on 2 cores. From here an epoch's 1,000 blocks hold 5,000 samples or more; where the
#: GPU starts to win on a many-core CPU is not measured yet. ``device="cuda"`` uses the GPU at any size.
SGD_GPU_MIN_SAMPLES = 5_000_000

#: The parameters the sampled-negative SGD models share.
SAMPLED_SGD_CONSTRAINTS: dict[str, Constraint] = {
    "n_factors": Integer(1),
    "epochs": Integer(0),
    "lr": Real(0, strict=True),
    "reg": Real(0),
    "neg_sampling": Choice("uniform", "popularity"),
    "init_std": Real(0),
    "partial_epochs": Integer(0),
    "seed": Integer(0),
    "progress": Boolean(),
    "num_threads": Integer(0),
}


@njit(cache=True, inline="always")
def row_contains(indptr: np.ndarray, indices: np.ndarray, row: int, col: int) -> bool:
    """Whether sorted CSR row ``row`` holds column ``col`` (binary search)."""
    lo = indptr[row]
    hi = indptr[row + 1]
    while lo < hi:
        mid = (lo + hi) >> 1
        v = indices[mid]
        if v < col:
            lo = mid + 1
        elif v > col:
            hi = mid
        else:
            return True
    return False


@njit(cache=True, inline="always")
def sample_negative(
    states: np.ndarray,
    t: int,
    n_items: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    user: int,
    reject: bool,
    pool: np.ndarray,
) -> int:
    """A random item the user has not interacted with (``-1`` after ``_MAX_TRIES`` failures); without
    ``reject``, any item. Uniform over items when ``pool`` is empty, else uniform over ``pool`` (pass the item
    of every interaction to draw in proportion to popularity)."""
    for _ in range(_MAX_TRIES):
        if pool.shape[0] > 0:
            j = np.int64(pool[rand_below(states, t, pool.shape[0])])
        else:
            j = rand_below(states, t, n_items)
        if not reject or not row_contains(indptr, indices, user, j):
            return j
    return np.int64(-1)


def negative_pool(mode: str, seen: sp.csr_matrix) -> np.ndarray:
    """The pool :func:`sample_negative` draws from: empty for uniform sampling, every interaction's item for
    popularity-proportional sampling."""
    if mode == "uniform":
        return np.empty(0, np.int32)
    return np.ascontiguousarray(seen.indices, dtype=np.int32)


def positive_pairs(mat: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) of every stored entry of a CSR matrix, as int32 arrays in row order."""
    users = np.repeat(np.arange(mat.shape[0], dtype=np.int32), np.diff(mat.indptr))
    return users, mat.indices.astype(np.int32)


def epoch_streams(seed: int, stream: int, epoch: int, order: np.ndarray, n_chunks: int) -> np.ndarray:
    """Shuffle ``order`` in place for this epoch and return ``n_chunks`` generator states (one per thread chunk);
    ``stream`` separates a fit (0) from later incremental updates (1, 2, ...)."""
    key = 2 * (stream * 100_003 + epoch)
    shuffle_in_place(order, seed_states(seed, key, 1))
    return seed_states(seed, key + 1, n_chunks)
