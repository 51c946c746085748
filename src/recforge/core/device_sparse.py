"""Sparse products on a torch device (a GPU): item-item similarities with their top-k, and scores ``X_u · W``.

The GPU twins of the numba kernels of :mod:`recforge.models.neighbors`: :func:`scaled_product_topk` computes the
same weights and keeps the same neighbours (float64 products, the float32 values ranked with the shared tie-break);
:class:`SparseRowScorer` scores blocks of users from their interaction rows, as dense products: cuSPARSE's
sparse × dense product adds in a varying order on a GPU, so the same request could score different last bits.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from recforge.core.device_topk import topk_rows

#: Bytes of the dense blocks one step of :func:`scaled_product_topk` holds at once, about.
_BLOCK_BYTES = 2 * 2**30


def sparse_tensor(mat: sp.csr_matrix, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scipy CSR matrix as a torch sparse CSR tensor on ``device``."""
    mat = sp.csr_matrix(mat)
    with warnings.catch_warnings():  # torch calls its CSR support beta; the products used here are long-standing
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(mat.indptr.astype(np.int64)), torch.from_numpy(mat.indices.astype(np.int64)),
            torch.from_numpy(mat.data).to(dtype), mat.shape, check_invariants=False,
        ).to(device)  # fmt: skip


def scaled_product_topk(
    left: sp.csr_matrix, right: sp.csr_matrix, k: int, device: torch.device, *, middle: np.ndarray,
    row_scale: np.ndarray, col_scale: np.ndarray, row_norm: np.ndarray, col_norm: np.ndarray, shrink: float,
) -> sp.csr_matrix:
    """For a square result (rows and columns index one catalogue): ``d = left · diag(middle) · right`` and
    ``w_ij = d_ij · row_scale_i · col_scale_j / (row_norm_i · col_norm_j + shrink)``; per row the ``k`` largest
    positive ``w_ij`` with ``j ≠ i`` (ties: smaller ``j``), as float32 CSR with sorted indices.

    Computed in blocks of rows, ``right``ᵀ (sparse) times a dense block of ``left``ᵀ, so memory is bounded by
    :data:`_BLOCK_BYTES` whatever the catalogue size.
    """
    n_rows, n_inner = left.shape
    n_cols = right.shape[1]
    right_t = sparse_tensor(sp.csr_matrix(right.T.multiply(middle[None, :])), device, torch.float64)
    left = sp.csr_matrix(left, dtype=np.float64)

    def on_device(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(v, np.float64)).to(device)

    rs, cs, rn, cn = on_device(row_scale), on_device(col_scale), on_device(row_norm), on_device(col_norm)
    # a row of the block: its dense column of left (float64), then its products and their denominators (float64)
    step = max(1, min(n_rows, _BLOCK_BYTES // (8 * n_inner + 16 * n_cols)))
    parts_idx, parts_val, counts = [], [], []
    for lo in range(0, n_rows, step):
        hi = min(n_rows, lo + step)
        block = torch.from_numpy(left[lo:hi].T.toarray()).to(device)  # n_inner × rows
        w = (right_t @ block).T  # rows × n_cols
        del block
        # scaled in place, in the order of d · rs · cs / (rn · cn + shrink): the same numbers, a third of the memory
        w.mul_(rs[lo:hi, None]).mul_(cs[None, :])
        denominator = rn[lo:hi, None] * cn[None, :]
        w.div_(denominator.add_(shrink))
        del denominator
        w32 = w.to(torch.float32)  # ranked as float32, as the CPU kernel's candidates
        w32.masked_fill_(~(w > 0), float("-inf"))
        del w
        rows = torch.arange(lo, hi, device=device)
        if hi > lo and n_cols > 0:
            diagonal = rows < n_cols
            w32[diagonal.nonzero()[:, 0], rows[diagonal]] = float("-inf")
        idx, val = topk_rows(w32, k)
        kept = idx >= 0
        counts.append(kept.sum(dim=1).cpu().numpy())
        parts_idx.append(idx[kept].cpu().numpy())
        parts_val.append(val[kept].cpu().numpy())
    indptr = np.zeros(n_rows + 1, np.int64)
    if counts:
        np.cumsum(np.concatenate(counts), out=indptr[1:])
    indices = np.concatenate(parts_idx).astype(np.int32) if parts_idx else np.zeros(0, np.int32)
    values = np.concatenate(parts_val).astype(np.float32) if parts_val else np.zeros(0, np.float32)
    out = sp.csr_matrix((values, indices, indptr), shape=(n_rows, n_cols))
    out.sort_indices()
    return out


class SparseRowScorer:
    """Scores ``X[users] · W`` on a device for blocks of users (``X``: user × item CSR; ``W``: item × item, dense
    or CSR, moved to the device once as a dense matrix); columns from ``n_scored`` on get ``unscored`` (items ``W``
    does not know). Each block's rows are made dense there and multiplied by one dense product, whose additions
    come in a fixed order: a block scores the same bits every time."""

    def __init__(self, x: sp.csr_matrix, w: np.ndarray | sp.csr_matrix, device: torch.device, n_scored: int,
                 unscored: float) -> None:
        self.x, self.device, self.n_scored, self.unscored = x, device, n_scored, float(unscored)
        if isinstance(w, np.ndarray):
            self.w = torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(device)
        else:  # only the nonzeros travel
            self.w = sparse_tensor(w, device).to_dense()

    def __call__(self, users: np.ndarray) -> torch.Tensor:
        scores = sparse_tensor(self.x[users], self.device).to_dense() @ self.w
        scores[:, self.n_scored :] = self.unscored
        return scores
