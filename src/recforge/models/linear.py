"""Linear item-item autoencoders: EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", 2019)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numba as nb
import numpy as np
import scipy.sparse as sp
import torch
from scipy.linalg import lapack

from recforge.core.device import free_gpu_bytes, resolve_device, torch_threads
from recforge.core.params import Constraint, DeviceName, Integer, Real
from recforge.core.threads import thread_limits
from recforge.data.interactions import Interactions
from recforge.errors import DataError
from recforge.models.neighbors import VALUES, ItemItemModel, Values
from recforge.models.registry import register

log = logging.getLogger(__name__)

_TILE = 64


@nb.njit(parallel=True, cache=True)
def _gram_lower(t_ptr, t_idx, t_val, ptr, idx, val, g):  # type: ignore[no-untyped-def]
    """Lower triangle (j <= i) of ``g += XᵀX``; ``t_*`` is X by item (CSR of Xᵀ), ``*`` X by user, sorted."""
    for i in nb.prange(g.shape[0]):
        row = g[i]
        for p in range(t_ptr[i], t_ptr[i + 1]):
            u = t_idx[p]
            x = t_val[p]
            for q in range(ptr[u], ptr[u + 1]):
                j = idx[q]
                if j > i:
                    break
                row[j] += x * val[q]


@nb.njit(parallel=True, cache=True)
def _ease_from_inverse(g, d, tile):  # type: ignore[no-untyped-def]
    """Turn ``P`` (held in the lower triangle of ``g``) into ``B = I − P diag(1/d)`` in place, both triangles.

    Tiles below the diagonal are read once and written to themselves and to their mirror above it, so no
    second n × n buffer is needed; different tile rows touch disjoint memory, hence the parallel loop.
    """
    n = g.shape[0]
    n_tiles = (n + tile - 1) // tile
    for ti in nb.prange(n_tiles):
        i0 = ti * tile
        i1 = min(n, i0 + tile)
        for tj in range(ti + 1):
            j0 = tj * tile
            for i in range(i0, i1):
                j1 = i if tj == ti else min(n, j0 + tile)
                for j in range(j0, j1):
                    v = g[i, j]
                    g[i, j] = -v / d[j]
                    g[j, i] = -v / d[i]
                if tj == ti:
                    g[i, i] = 0.0


def ease_weights(x_by_user, x_by_item, reg: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    """EASE's ``B`` (float32, C order) from ``X`` as CSR (users × items) and its transpose as CSR.

    ``G = XᵀX + reg·I`` is built (lower triangle), Cholesky-factorised (``spotrf``) and inverted (``spotri``)
    in one float32 buffer, in place; ``B_ij = −P_ij / P_jj`` (``B_jj = 0``) is then written into the same
    buffer. A C-ordered symmetric matrix is its own Fortran-ordered transpose, so LAPACK works on it unchanged.
    """
    n = x_by_user.shape[1]
    g = np.zeros((n, n), np.float32)
    _gram_lower(
        x_by_item.indptr.astype(np.int64), x_by_item.indices.astype(np.int32), x_by_item.data.astype(np.float32),
        x_by_user.indptr.astype(np.int64), x_by_user.indices.astype(np.int32), x_by_user.data.astype(np.float32),
        g,
    )  # fmt: skip
    g.flat[:: n + 1] += np.float32(reg)
    f = g.T  # Fortran-contiguous view: its upper triangle is g's lower one
    chol, info = lapack.spotrf(f, lower=0, overwrite_a=1, clean=0)
    if info != 0:
        raise DataError(f"EASE: XᵀX + reg·I is not positive definite in float32 (LAPACK info {info}); raise reg")
    inv, info = lapack.spotri(chol, lower=0, overwrite_c=1)
    if info != 0:
        raise DataError(f"EASE: the inverse of XᵀX + reg·I failed (LAPACK info {info}); raise reg")
    if not np.shares_memory(inv, g):  # LAPACK wrapper copied after all; keep working on its result
        g = np.ascontiguousarray(inv.T)
    d = np.diagonal(g).astype(np.float64)
    _ease_from_inverse(g, d, _TILE)
    return g


#: Bytes of X's dense user rows that one step of the GPU Gram product holds.
_GRAM_CHUNK_BYTES = 2**30


def ease_gpu_bytes(n_items: int) -> int:
    """GPU memory :func:`ease_weights_torch` needs at its peak, the inverse: the Cholesky factor, the inverse and
    the working copy cuSOLVER's inverse makes, three n × n float32 matrices (a 50k catalogue peaked at 28 GB on an
    H200), plus one chunk of dense rows for the solver's workspace and the Gram product."""
    return 3 * 4 * n_items * n_items + _GRAM_CHUNK_BYTES


def ease_weights_torch(x_by_user: sp.csr_matrix, reg: float, device: torch.device) -> np.ndarray:
    """EASE's ``B`` (float32, C order) computed with torch on ``device`` (the GPU path of :func:`ease_weights`,
    the same maths): ``G = XᵀX`` from dense chunks of user rows, ``+ reg·I``, Cholesky factor, its inverse ``P``,
    ``B_ij = −P_ij / P_jj`` with ``B_jj = 0``."""
    n_users, n = x_by_user.shape
    g = torch.zeros((n, n), dtype=torch.float32, device=device)
    step = max(1, _GRAM_CHUNK_BYTES // (4 * max(n, 1)))
    for lo in range(0, n_users, step):
        rows = torch.from_numpy(x_by_user[lo : lo + step].toarray().astype(np.float32, copy=False)).to(device)
        g.addmm_(rows.T, rows)
        del rows
    g.diagonal().add_(float(reg))
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        raise DataError(f"EASE: XᵀX + reg·I is not positive definite in float32 (torch info {int(info)}); raise reg")
    del g
    p = torch.cholesky_inverse(chol)
    del chol
    if not p.is_contiguous():  # column-major from LAPACK/cuSOLVER; P is symmetric, so its transpose is P in C order
        p = p.T
    p.div_(-p.diagonal().clone())  # column j divided by −P_jj
    p.fill_diagonal_(0.0)
    return p.cpu().numpy()


@register("ease")
class EASE(ItemItemModel):
    """EASE: the item × item weights ``B`` minimising ``‖X − XB‖² + reg‖B‖²`` with ``diag(B) = 0``.

    Closed form ``B = I − P diag(1/diag(P))``, ``P = (XᵀX + reg·I)⁻¹``; scores are ``X_u B``. ``X`` is the
    binary user × item matrix (or counts / weights / ratings, see ``values``).

    Catalogue size: fitting on the CPU holds ONE dense ``n_items × n_items`` float32 matrix (the Gram matrix is built,
    factorised, inverted and turned into ``B`` in place; measured peak on ml-latest-small, 9,724 items: 373 MB
    of arrays for a 361 MB ``B``), so memory ≈ ``4·n²`` bytes — 0.4 GB for 10k items, 1.6 GB for 20k, 3.6 GB
    for 30k — and time grows as ``n³`` (≈ 7 s for 9.7k items on one core of a 2-core Xeon, so roughly 3-4 min
    for 30k). ``B`` stays dense, so the artifact is ``4·n²`` bytes too, and ``partial_fit`` with new items
    briefly needs a second, larger copy. Above ``max_items`` (default 30,000) ``fit`` refuses with a
    :class:`~recforge.errors.DataError` giving the estimated memory; filter rare items
    (``recforge.data.filters.min_item_count``) or use a factor model (``"als"``) instead, or raise
    ``max_items`` (``None`` = no limit) when the memory and time are there.

    Parameters:
        reg: L2 regularisation λ (> 0); larger suits bigger / denser data (Steck used 200-1000).
        values: what ``X`` holds (``"binary"``, ``"count"``, ``"weight"``, ``"rating"``).
        max_items: largest catalogue ``fit`` accepts on the CPU (``None``: no limit); on a GPU the limit is the
            device's free memory (:func:`ease_gpu_bytes`: ``12·n²`` bytes and a 1 GB chunk).
        num_threads: threads for the Gram kernel and BLAS/LAPACK (0 = all cores).
        device: ``"auto"`` (``$RECFORGE_DEVICE``, else CUDA when present, else the CPU), ``"cpu"`` or
            ``"cuda[:N]"``: on a GPU, ``B`` is computed with torch (:func:`ease_weights_torch`) and kept on the CPU.

    The default ``reg=100`` had the best mean validation NDCG@10 (relative to each dataset's best) over the
    grid 10-1000 on leave-last-one-out splits of ML-100K (best alone: 300) and ml-latest-small (best alone: 50),
    see ``benchmarks/bench_implicit.py``.

    ``partial_fit``: new users score from their history at once (it is stored in ``X_``); new items get zero
    rows and columns in ``B``, so EASE neither uses them as evidence nor recommends them (they get the lowest
    score and rank after every fitted item) until it is refitted.
    """

    search_space: ClassVar[dict[str, dict[str, Any]]] = {"reg": {"low": 1, "high": 20000, "log": True}}
    param_constraints: ClassVar[dict[str, Constraint]] = {
        "reg": Real(0, strict=True),
        "values": VALUES,
        "max_items": Integer(1, optional=True),
        "num_threads": Integer(0),
        "device": DeviceName(),
    }

    def __init__(
        self, reg: float = 100.0, values: Values = "binary", max_items: int | None = 30_000, num_threads: int = 0,
        device: str = "auto",
    ) -> None:
        self.reg = reg
        self.values = values
        self.max_items = max_items
        self.num_threads = num_threads
        self.device = device

    def _fit(self, interactions: Interactions) -> None:
        n = interactions.n_items
        device = resolve_device(self.device)
        if device.type == "cuda":
            free = free_gpu_bytes(device)
            if ease_gpu_bytes(n) > free:
                raise DataError(
                    f"EASE on {device} needs about {ease_gpu_bytes(n) / 1e9:.1f} GB for {n:,} items but "
                    f"{free / 1e9:.1f} GB are free; drop rare items first (recforge.data.filters.min_item_count), "
                    "use a factor model such as 'als', or fit on the CPU (device='cpu')")
            x = self._set_matrix(interactions)
            with torch_threads(self.num_threads):
                self.weights_ = ease_weights_torch(x, float(self.reg), device)
            return
        if self.max_items is not None and n > self.max_items:
            gb = 4 * n * n / 1e9
            raise DataError(
                f"EASE needs a dense {n:,} x {n:,} float32 matrix (about {gb:.1f} GB, and O(n^3) time) but "
                f"max_items={self.max_items:,}; drop rare items first (recforge.data.filters.min_item_count), "
                f"use a factor model such as 'als', or raise max_items (None = no limit) if you have the memory"
            )
        x = self._set_matrix(interactions)
        with thread_limits(self.num_threads):
            self.weights_ = ease_weights(x, x.T.tocsr(), float(self.reg))
