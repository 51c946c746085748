"""Top-k selection over dense score blocks, with exclusions and the one tie-break of recforge.

Shared by every model's ``recommend``, the evaluator and the early-stopping validator, so all rank items
identically: higher score first, ties broken by the smaller item index; NaN, ``-inf`` and excluded items are never
selected. A model that cannot score an item gives it :data:`UNSCORED`: finite, so such items still fill a list
longer than what the model knows, but below every real score.
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np

#: The score of an item a model cannot score (an item added after fitting, one the network never saw). Half the
#: lowest float32, so sums of a few such scores stay finite; anything at or below it is "unscored".
UNSCORED = np.float32(np.finfo(np.float32).min / 2)
_SCORE_BLOCK_BYTES = 64 * 2**20  # bound on one dense score block
_FEW_ROWS = 4  # up to this many rows, top-k runs in numpy


def is_unscored(scores: np.ndarray) -> np.ndarray:
    """Where ``scores`` holds no real score: :data:`UNSCORED` (or below), NaN or an infinity."""
    return ~np.isfinite(scores) | (scores <= UNSCORED)


def batch_rows(n_items: int, budget_bytes: int = _SCORE_BLOCK_BYTES) -> int:
    """How many rows to score at once so a float32 block of ``n_items`` columns stays within the budget."""
    return max(1, min(65536, budget_bytes // max(1, 4 * n_items)))


@nb.njit(cache=True, inline="always")
def heap_sift_down(hs: np.ndarray, hi: np.ndarray, size: int, pos: int) -> None:
    """Restore a bounded min-heap on (score, -index) below ``pos``; the root is the worst kept entry."""
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        child = left
        right = left + 1
        if right < size and (hs[right] < hs[left] or (hs[right] == hs[left] and hi[right] > hi[left])):
            child = right
        if hs[child] < hs[pos] or (hs[child] == hs[pos] and hi[child] > hi[pos]):
            hs[pos], hs[child] = hs[child], hs[pos]
            hi[pos], hi[child] = hi[child], hi[pos]
            pos = child
        else:
            return


@nb.njit(cache=True, inline="always")
def heap_push(hs: np.ndarray, hi: np.ndarray, size: int, s: float, j: int) -> int:
    """Offer (s, j) to a bounded min-heap of capacity ``len(hs)`` (ties: smaller index wins); returns the size."""
    if size < hs.shape[0]:
        pos = size
        hs[pos] = s
        hi[pos] = j
        size += 1
        while pos > 0:
            parent = (pos - 1) // 2
            if hs[pos] < hs[parent] or (hs[pos] == hs[parent] and hi[pos] > hi[parent]):
                hs[pos], hs[parent] = hs[parent], hs[pos]
                hi[pos], hi[parent] = hi[parent], hi[pos]
                pos = parent
            else:
                break
    elif s > hs[0] or (s == hs[0] and j < hi[0]):
        hs[0] = s
        hi[0] = j
        heap_sift_down(hs, hi, size, 0)
    return size


@nb.njit(cache=True, nogil=True)
def row_topk(row: np.ndarray, k: int, out_i: np.ndarray, out_s: np.ndarray) -> None:
    """The ``k`` best entries of one score row into ``out_i`` / ``out_s``, best first; ``-1`` / ``-inf`` pad."""
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int32)
    size = 0
    n = row.shape[0]
    j = 0
    while j < n and size < k:  # fill the heap
        s = row[j]
        if s > -np.inf:  # skips NaN and -inf (excluded)
            size = heap_push(hs, hi, size, s, j)
        j += 1
    worst = hs[0] if size else np.float32(np.inf)
    while j < n:
        s = row[j]
        # Most entries lose to the current worst kept score; test that first (later ties lose to smaller indices).
        if s > worst:
            heap_push(hs, hi, size, s, j)
            worst = hs[0]
        j += 1
    for t in range(k):
        out_i[t] = -1
        out_s[t] = -np.inf
    # Pop worst-first into the tail so the output is best-first.
    while size > 0:
        size -= 1
        out_i[size] = hi[0]
        out_s[size] = hs[0]
        hs[0] = hs[size]
        hi[0] = hi[size]
        heap_sift_down(hs, hi, size, 0)


@nb.njit(parallel=True, cache=True, nogil=True)
def _block_topk(scores: np.ndarray, k: int, ex_ptr: np.ndarray, ex_idx: np.ndarray, out_i: np.ndarray, out_s: np.ndarray) -> None:
    for r in nb.prange(scores.shape[0]):
        row = scores[r]
        for p in range(ex_ptr[r], ex_ptr[r + 1]):
            row[ex_idx[p]] = -np.inf
        row_topk(row, k, out_i[r], out_s[r])


def mask_and_topk(
    scores: Any, k: int, exclude_indptr: np.ndarray | None = None, exclude_indices: np.ndarray | None = None,
    device: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` item indices and scores of every row of ``scores`` (modified in place: excluded entries become
    ``-inf``). ``exclude_indptr/indices`` is a CSR pattern with one row per score row.

    Rows with fewer than ``k`` selectable items are padded with index ``-1`` and score ``-inf``. With a torch
    ``device`` (from :func:`recforge.core.accelerator.device_for_rows`) the block (numpy or a tensor) is ranked
    there, with the same result.
    """
    if device is not None:
        from recforge.core import device_topk  # torch: only once a GPU ranks

        return device_topk.mask_and_topk(scores, k, device, exclude_indptr, exclude_indices)
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    n_rows = scores.shape[0]
    k_eff = max(0, min(int(k), scores.shape[1]))
    if exclude_indptr is None:
        exclude_indptr = np.zeros(n_rows + 1, np.int64)
        exclude_indices = np.zeros(0, np.int32)
    out_i = np.empty((n_rows, k_eff), np.int32)
    out_s = np.empty((n_rows, k_eff), np.float32)
    if not (k_eff and n_rows):
        return out_i, out_s
    if n_rows <= _FEW_ROWS:
        _few_rows_topk(scores, k_eff, exclude_indptr, exclude_indices, out_i, out_s)
    else:
        _block_topk(scores, k_eff, exclude_indptr.astype(np.int64), exclude_indices.astype(np.int32), out_i, out_s)
    return out_i, out_s


def _few_rows_topk(scores: np.ndarray, k: int, ex_ptr: np.ndarray, ex_idx: np.ndarray, out_i: np.ndarray,
                   out_s: np.ndarray) -> None:
    """:func:`_block_topk` in numpy, for a request of a few users: the same result without the second or so that
    the first call of a numba kernel costs in a fresh process (a one-user ``recommend`` from the command line)."""
    out_i.fill(-1)
    out_s.fill(-np.inf)
    for r in range(scores.shape[0]):
        row = scores[r]
        row[ex_idx[ex_ptr[r]:ex_ptr[r + 1]]] = -np.inf
        candidates = np.flatnonzero(row > -np.inf)  # NaN and -inf are never selected
        if len(candidates) > k:  # keep every entry tied with the k-th best, then order them
            kth = -np.partition(-row[candidates], k - 1)[k - 1]
            candidates = candidates[row[candidates] >= kth]
        best = candidates[np.argsort(-row[candidates], kind="stable")[:k]]  # ties: the smaller index first
        out_i[r, :len(best)] = best
        out_s[r, :len(best)] = row[best]
