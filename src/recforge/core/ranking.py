"""Batched full-catalogue ranking: scores → exclusions → top-k, hits and the first relevant rank.

The one ranking kernel behind the reported metrics and early stopping. Rows are scored in blocks so memory stays
bounded (100k users × 20k items never exist as one matrix); ties are broken as in :mod:`recforge.core.topk`. On a
GPU the blocks are ranked there (:mod:`recforge.core.device_topk`, the same results).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba as nb
import numpy as np
import scipy.sparse as sp
import torch

from recforge.core import device_topk
from recforge.core.progress import progress_bar
from recforge.core.topk import batch_rows, row_topk


@nb.njit(parallel=True, cache=True)
def _rank_block(
    scores: np.ndarray,
    k: int,
    ex_ptr: np.ndarray,
    ex_idx: np.ndarray,
    t_ptr: np.ndarray,
    t_idx: np.ndarray,
    out_items: np.ndarray,
    out_hits: np.ndarray,
    out_first: np.ndarray,
) -> None:
    n = scores.shape[1]
    for r in nb.prange(scores.shape[0]):
        row = scores[r]
        for p in range(ex_ptr[r], ex_ptr[r + 1]):
            row[ex_idx[p]] = -np.inf
        top_s = np.empty(k, np.float32)
        row_topk(row, k, out_items[r], top_s)
        t0 = t_ptr[r]
        t1 = t_ptr[r + 1]
        targets = t_idx[t0:t1]  # sorted
        for j in range(k):
            it = out_items[r, j]
            if it < 0:
                out_hits[r, j] = False
                continue
            pos = np.searchsorted(targets, it)
            out_hits[r, j] = pos < targets.shape[0] and targets[pos] == it
        # The best-scored target (ties: smaller index) is the first relevant item of the full ranking.
        best_i = -1
        best_s = np.float32(-np.inf)
        for p in range(targets.shape[0]):
            t = targets[p]
            s = row[t]
            if s > best_s:
                best_s = s
                best_i = t
        if best_i < 0:
            out_first[r] = 0
            continue
        count = 1
        for j in range(n):
            s = row[j]
            if s > best_s or (s == best_s and j < best_i):
                count += 1
        out_first[r] = count


@dataclass(frozen=True)
class RankingOutput:
    """What the metrics need: per evaluated row the top-k items, hit flags, relevant count and first rank."""

    rows: np.ndarray
    top_items: np.ndarray
    hits: np.ndarray
    n_rel: np.ndarray
    first_rank: np.ndarray


#: Score blocks ranked on a device may be this many times larger than on the CPU (fewer, larger kernels).
_DEVICE_BLOCK_FACTOR = 4


def rank_rows(
    score_fn: Callable[[np.ndarray], np.ndarray | torch.Tensor],
    n_items: int,
    users: np.ndarray,
    targets: sp.csr_matrix,
    k: int,
    exclude: sp.csr_matrix | None,
    batch_size: int | None = None,
    progress: bool = False,
    device: torch.device | None = None,
) -> RankingOutput:
    """Rank the full catalogue for every row: row ``r`` is scored as ``score_fn(users)[r]``, its relevant items are
    row ``r`` of ``targets`` and its excluded items row ``r`` of ``exclude`` (both CSR with one row per entry
    of ``users``).

    ``score_fn`` returns a float block as a numpy array or a torch tensor. With ``device`` (e.g. the GPU the model
    scores on) blocks are ranked there with torch; without, on the CPU with numba.
    """
    users = np.asarray(users, dtype=np.int64)
    k_eff = min(k, n_items)
    targets = targets.tocsr()
    targets.sort_indices()
    n_rows = len(users)
    top = np.empty((n_rows, k_eff), np.int32)
    hits = np.empty((n_rows, k_eff), np.bool_)
    first = np.empty(n_rows, np.int64)
    step = batch_size or batch_rows(n_items) * (1 if device is None else _DEVICE_BLOCK_FACTOR)
    empty_ptr = np.zeros(step + 1, np.int64)
    empty_idx = np.zeros(0, np.int32)
    bar = progress_bar(total=n_rows, desc="ranking", unit="user", enabled=progress, leave=False)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        block = score_fn(users[lo:hi])
        t = targets[lo:hi]
        if device is not None:
            scores_t = device_topk.to_block(block, device)
            if exclude is not None:
                ex = exclude[lo:hi]
                device_topk.exclude_(scores_t, ex.indptr, ex.indices)
            else:
                device_topk.exclude_(scores_t)
            top_t, hits_t, first_t = device_topk.rank_block(scores_t, k_eff, t)
            top[lo:hi], hits[lo:hi], first[lo:hi] = top_t.cpu().numpy(), hits_t.cpu().numpy(), first_t.cpu().numpy()
            bar.update(hi - lo)
            continue
        if isinstance(block, torch.Tensor):
            block = block.detach().float().cpu().numpy()
        scores = np.ascontiguousarray(block, dtype=np.float32)
        if exclude is not None:
            ex = exclude[lo:hi]
            ex_ptr, ex_idx = ex.indptr.astype(np.int64), ex.indices.astype(np.int32)
        else:
            ex_ptr, ex_idx = empty_ptr[: hi - lo + 1], empty_idx
        _rank_block(
            scores, k_eff, ex_ptr, ex_idx, t.indptr.astype(np.int64), t.indices.astype(np.int32),
            top[lo:hi], hits[lo:hi], first[lo:hi],
        )
        bar.update(hi - lo)
    bar.close()
    if k_eff < k:  # a catalogue smaller than k: the missing ranks are empty (never a hit)
        top = np.pad(top, ((0, 0), (0, k - k_eff)), constant_values=-1)
        hits = np.pad(hits, ((0, 0), (0, k - k_eff)), constant_values=False)
    return RankingOutput(users, top, hits, np.diff(targets.indptr), first)
