"""Top-k selection and full-catalogue ranking of score blocks held by torch (on a GPU): the device twin of
:mod:`recforge.core.topk` and the numba kernel of :mod:`recforge.core.ranking`, with the same contract.

Higher score first, ties broken by the smaller item index; NaN, ``-inf`` and excluded items are never selected;
rows with fewer than ``k`` selectable items are padded with index ``-1`` and score ``-inf``. ``torch.topk`` alone
orders ties arbitrarily, so the k-th best value of each row is found first, and of the items tied with it only the
ones with the smallest indices are taken.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

_NEG_INF = float("-inf")


def csr_coords(indptr: np.ndarray, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) index tensors on ``device`` of the stored entries of a CSR pattern."""
    rows = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    return torch.from_numpy(rows).to(device), torch.from_numpy(np.asarray(indices, np.int64)).to(device)


def to_block(scores: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 score block on ``device`` (a numpy block is copied there; a tensor already there is used as is)."""
    return torch.as_tensor(scores).to(device=device, dtype=torch.float32).contiguous()


def exclude_(scores: torch.Tensor, indptr: np.ndarray | None = None, indices: np.ndarray | None = None) -> torch.Tensor:
    """Set the entries of a CSR pattern (``indptr``/``indices``, one row per score row) and every NaN to ``-inf``,
    in place."""
    scores.masked_fill_(torch.isnan(scores), _NEG_INF)
    if indptr is not None and indices is not None and len(indices):
        rows, cols = csr_coords(indptr, indices, scores.device)
        scores[rows, cols] = _NEG_INF
    return scores


def topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (int64 indices, scores) of every row of a float block whose NaN and excluded entries are already
    ``-inf`` (:func:`exclude_`), best first, ties to the smaller index, padded with ``-1`` / ``-inf``."""
    n_rows, n_cols = scores.shape
    k = max(0, min(int(k), n_cols))
    if not (k and n_rows):
        return (torch.empty((n_rows, k), dtype=torch.int64, device=scores.device),
                torch.empty((n_rows, k), dtype=scores.dtype, device=scores.device))
    kth = torch.topk(scores, k, dim=1, largest=True, sorted=False).values.min(dim=1, keepdim=True).values
    above = scores > kth
    need = k - above.sum(dim=1, keepdim=True, dtype=torch.int32)
    tied = scores == kth
    # Exactly k entries per row: all strictly above the k-th value, then the first `need` ties by index.
    take = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= need))
    index = take.nonzero()[:, 1].view(n_rows, k)
    values = scores.gather(1, index)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices  # stable: ties keep index order
    index, values = index.gather(1, order), values.gather(1, order)
    index.masked_fill_(values == _NEG_INF, -1)
    return index, values


def rank_block(
    scores: torch.Tensor, k: int, targets: sp.csr_matrix
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`recforge.core.ranking.rank_rows` needs of one excluded block (:func:`exclude_`): the top-``k``
    items, whether each is a target (``targets``: CSR, one sorted row per score row), and the 1-based rank of the
    best-scored target in the full ranking (0 when the row has no rankable target)."""
    n_rows, n_cols = scores.shape
    top, _ = topk_rows(scores, k)
    t_rows, t_cols = csr_coords(targets.indptr, targets.indices, scores.device)
    is_target = torch.zeros_like(scores, dtype=torch.bool)
    is_target[t_rows, t_cols] = True
    hits = is_target.gather(1, top.clamp(min=0)) & (top >= 0)
    t_scores = scores[t_rows, t_cols]
    best = torch.full((n_rows,), _NEG_INF, dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, t_rows, t_scores, reduce="amax")
    winner = (t_scores == best[t_rows]) & (t_scores > _NEG_INF)
    best_i = torch.full((n_rows,), n_cols, dtype=torch.int64, device=scores.device)
    best_i = best_i.scatter_reduce(0, t_rows[winner], t_cols[winner], reduce="amin")
    column = torch.arange(n_cols, device=scores.device)
    ahead = (scores > best[:, None]).sum(dim=1) + ((scores == best[:, None]) & (column < best_i[:, None])).sum(dim=1)
    first = torch.where(best_i < n_cols, ahead + 1, torch.zeros_like(ahead))
    return top, hits, first


def mask_and_topk(
    scores: np.ndarray | torch.Tensor, k: int, device: torch.device, exclude_indptr: np.ndarray | None = None,
    exclude_indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`recforge.core.topk.mask_and_topk` on ``device``: int32 indices and float32 scores, as numpy arrays."""
    block = exclude_(to_block(scores, device), exclude_indptr, exclude_indices)
    index, values = topk_rows(block, k)
    return index.to(torch.int32).cpu().numpy(), values.cpu().numpy()


class VectorScorer:
    """Scores blocks of users as ``queries @ items.T`` (+ per-item bias, + per-user bias, + a constant) on a
    device, the item side moved there once; what factor models and the two-tower score by (float32 throughout,
    like their CPU ``score``)."""

    def __init__(self, queries: np.ndarray, items: np.ndarray, device: torch.device, query_bias: np.ndarray | None = None,
                 item_bias: np.ndarray | None = None, constant: float = 0.0) -> None:
        self.queries, self.query_bias, self.constant = queries, query_bias, float(constant)
        self.items = torch.from_numpy(np.ascontiguousarray(items, np.float32)).to(device)
        self.item_bias = None if item_bias is None else torch.from_numpy(np.asarray(item_bias, np.float32)).to(device)
        self.device = device

    def __call__(self, users: np.ndarray) -> torch.Tensor:
        q = torch.from_numpy(np.ascontiguousarray(self.queries[users], np.float32)).to(self.device)
        scores = q @ self.items.T
        if self.item_bias is not None:
            scores += self.item_bias[None, :]
        if self.query_bias is not None:
            scores += torch.from_numpy(np.asarray(self.query_bias[users], np.float32)).to(self.device)[:, None]
        if self.constant:
            scores += self.constant
        return scores
