"""Item-item models that score ``X_u · W``, and item-based k-nearest neighbours.

:class:`ItemItemModel` is the shared base of every model whose scores are a user's interaction row times an item ×
item weight matrix ``W`` (sparse here and in :mod:`recforge.models.graph`, dense in :mod:`recforge.models.linear`).
It keeps the user × item matrix ``X_`` as fitted state, so scoring, persistence and incremental updates (new users
score from their history at once; new items get empty rows and columns of ``W`` until the next ``fit``) live here
once.

:func:`item_knn_rows` is the similarity kernel shared with RP3beta: for every item it accumulates sparse dot
products with all other items through the users they share (a sparse accumulator, so the cost is
``Σ_u n_u²`` and the memory ``O(n_items)`` per thread, whatever the catalogue size) and keeps the top ``k``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numba as nb
import numpy as np
import scipy.sparse as sp

from recforge.core.accelerator import cuda_device
from recforge.core.params import Boolean, Choice, Constraint, DeviceName, Integer, Real
from recforge.core.sparse import csr_from_state, csr_to_state, merge_csr, pad_csr
from recforge.core.threads import thread_limits
from recforge.core.topk import UNSCORED, heap_push, mask_and_topk
from recforge.data.interactions import Interactions
from recforge.errors import ArtifactError, DataError
from recforge.models.base import Recommender
from recforge.models.registry import register

log = logging.getLogger(__name__)

Values = Literal["binary", "count", "weight", "rating"]
#: The ``values`` parameter of every item-item model: what the user × item matrix holds.
VALUES = Choice("binary", "count", "weight", "rating")


# ====================================================================== the user × item matrix
def interaction_matrix(interactions: Interactions, values: str = "binary") -> sp.csr_matrix:
    """The user × item matrix ``X`` (float32 CSR, sorted indices) the item-item models learn from.

    ``values``: ``"binary"`` (1 for every interacted pair), ``"count"`` (number of interactions), ``"weight"``
    (summed weight column) or ``"rating"`` (the latest rating of the pair).
    """
    if not VALUES.accepts(values):
        raise DataError(f"values must be {VALUES.describe()}, got {values!r}")
    if values == "binary":
        csr = interactions.csr("ones")
        mat = sp.csr_matrix((np.ones(csr.nnz, np.float32), csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)
    else:
        source = {"count": "ones", "weight": "weight", "rating": "rating"}[values]
        mat = interactions.csr(source).copy()  # type: ignore[arg-type]
    mat.sort_indices()
    return mat.astype(np.float32)


# ====================================================================== weighting schemes
def _item_user_stats(item_users: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per user (column) document frequency, per item (row) length."""
    df = np.bincount(item_users.indices, minlength=item_users.shape[1]).astype(np.float64)
    length = np.asarray(item_users.sum(axis=1), dtype=np.float64).ravel()
    return df, length


def tfidf_weight(item_users: sp.csr_matrix) -> sp.csr_matrix:
    """TF-IDF weights of an item × user matrix (items are the documents, users the terms).

    ``w_iu = sqrt(x_iu) · (log(n_items) − log(1 + df_u))``, ``df_u`` = number of items of user ``u``, so users
    who interact with everything count less.
    """
    m = sp.csr_matrix(item_users, dtype=np.float64, copy=True)
    df, _ = _item_user_stats(m)
    idf = np.log(max(m.shape[0], 1)) - np.log1p(df)
    m.data = np.sqrt(m.data) * idf[m.indices]
    return m


def bm25_weight(item_users: sp.csr_matrix, K1: float = 1.2, B: float = 0.75) -> sp.csr_matrix:
    """Okapi BM25 weights of an item × user matrix (items are the documents, users the terms).

    ``w_iu = x_iu (K1 + 1) / (K1 (1 − B + B len_i / avg_len) + x_iu) · idf_u`` with ``idf_u = log(n_items) −
    log(1 + df_u)``, ``len_i`` = the item's total (its number of users for binary data) and ``avg_len`` the mean
    over items with at least one interaction. ``K1`` saturates repeated interactions, ``B`` damps popular items.
    """
    m = sp.csr_matrix(item_users, dtype=np.float64, copy=True)
    df, length = _item_user_stats(m)
    idf = np.log(max(m.shape[0], 1)) - np.log1p(df)
    active = length > 0
    avg = length[active].mean() if active.any() else 1.0
    norm = (1.0 - B) + B * length / avg
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    m.data = m.data * (K1 + 1.0) / (K1 * norm[rows] + m.data) * idf[m.indices]
    return m


# ====================================================================== kernels
@nb.njit(parallel=True, cache=True)
def _knn_kernel(
    t_ptr: np.ndarray,
    t_idx: np.ndarray,
    t_val: np.ndarray,
    u_ptr: np.ndarray,
    u_idx: np.ndarray,
    u_val: np.ndarray,
    user_w: np.ndarray,
    row_scale: np.ndarray,
    col_scale: np.ndarray,
    row_norm: np.ndarray,
    col_norm: np.ndarray,
    shrink: float,
    k: int,
    n_chunks: int,
    out_idx: np.ndarray,
    out_val: np.ndarray,
    out_cnt: np.ndarray,
) -> None:
    n_items = t_ptr.shape[0] - 1
    n_cols = col_scale.shape[0]
    for c in nb.prange(n_chunks):
        lo = c * n_items // n_chunks
        hi = (c + 1) * n_items // n_chunks
        acc = np.zeros(n_cols, np.float64)
        # stamp[j] == i marks j as touched for row i: no reset pass, and a branch-free append below.
        stamp = np.full(n_cols, -1, np.int64)
        touched = np.empty(n_cols + 1, np.int32)
        cand_s = np.empty(n_cols, np.float32)
        cand_j = np.empty(n_cols, np.int32)
        for i in range(lo, hi):
            nt = 0
            for p in range(t_ptr[i], t_ptr[i + 1]):
                u = t_idx[p]
                x = t_val[p] * user_w[u]
                for q in range(u_ptr[u], u_ptr[u + 1]):
                    j = u_idx[q]
                    touched[nt] = j
                    nt += stamp[j] != i
                    stamp[j] = i
                    acc[j] += x * u_val[q]
            m = 0
            ri = row_scale[i]
            ni = row_norm[i]
            for t in range(nt):
                j = touched[t]
                if j != i:
                    s = acc[j] * ri * col_scale[j] / (ni * col_norm[j] + shrink)
                    if s > 0.0:
                        cand_s[m] = s
                        cand_j[m] = j
                        m += 1
                acc[j] = 0.0
            if m <= k:
                for t in range(m):
                    out_idx[i, t] = cand_j[t]
                    out_val[i, t] = cand_s[t]
                out_cnt[i] = m
                continue
            # Bounded min-heap on (score, -index): the root is the worst kept entry, so most candidates are
            # rejected by one comparison; ties go to the smaller item index, whatever the visiting order.
            hs = out_val[i]
            hi_ = out_idx[i]
            size = 0
            for t in range(m):
                size = heap_push(hs, hi_, size, cand_s[t], cand_j[t])
            out_cnt[i] = size


@nb.njit(parallel=True, cache=True, nogil=True)
def _score_sparse(x_ptr, x_idx, x_val, users, w_ptr, w_idx, w_val, out):  # type: ignore[no-untyped-def]
    for r in nb.prange(users.shape[0]):
        u = users[r]
        row = out[r]
        for p in range(x_ptr[u], x_ptr[u + 1]):
            i = x_idx[p]
            x = x_val[p]
            for q in range(w_ptr[i], w_ptr[i + 1]):
                row[w_idx[q]] += x * w_val[q]


@nb.njit(parallel=True, cache=True, nogil=True)
def _score_dense(x_ptr, x_idx, x_val, users, w, out):  # type: ignore[no-untyped-def]
    for r in nb.prange(users.shape[0]):
        u = users[r]
        row = out[r]
        for p in range(x_ptr[u], x_ptr[u + 1]):
            wi = w[x_idx[p]]
            x = x_val[p]
            for j in range(wi.shape[0]):
                row[j] += x * wi[j]


def item_knn_rows(
    item_users: sp.csr_matrix,
    user_items: sp.csr_matrix,
    k: int,
    *,
    user_weight: np.ndarray | None = None,
    row_scale: np.ndarray | None = None,
    col_scale: np.ndarray | None = None,
    row_norm: np.ndarray | None = None,
    col_norm: np.ndarray | None = None,
    shrink: float = 0.0,
    device: Any = None,
) -> sp.csr_matrix:
    """Top-``k`` item × item weights by row, as CSR (float32, sorted indices).

    For every row item ``i`` and column item ``j ≠ i``::

        d_ij = Σ_u item_users[i, u] · user_weight[u] · user_items[u, j]
        w_ij = d_ij · row_scale[i] · col_scale[j] / (row_norm[i] · col_norm[j] + shrink)

    and only the ``k`` largest positive ``w_ij`` of each row are kept (ties: smaller ``j``); rows and columns
    index the same catalogue, so the result is square and its diagonal is never stored. Missing vectors mean
    ones (norms: ones and ``shrink`` 0 give plain products). Runs in parallel over rows with numba's current
    thread count; the result does not depend on it. With a CUDA ``device`` (:func:`~recforge.core.accelerator.
    cuda_device`) the products run there in dense blocks (:func:`recforge.core.device_sparse.scaled_product_topk`,
    the same weights and neighbours).
    """
    n_rows, n_users = item_users.shape
    n_cols = user_items.shape[1]
    ones_r = np.ones(n_rows, np.float64)
    ones_c = np.ones(n_cols, np.float64)

    def vec(v: np.ndarray | None, default: np.ndarray) -> np.ndarray:
        return default if v is None else np.ascontiguousarray(v, dtype=np.float64)

    it = sp.csr_matrix(item_users)
    ui = sp.csr_matrix(user_items)
    it.sort_indices()
    ui.sort_indices()
    k_eff = max(1, min(int(k), max(n_cols - 1, 1)))
    if device is not None:
        # torch is imported only when a GPU computes (see recforge.core.accelerator)
        from recforge.core.device_sparse import scaled_product_topk

        return scaled_product_topk(
            it, ui, k_eff, device, middle=vec(user_weight, np.ones(n_users, np.float64)),
            row_scale=vec(row_scale, ones_r), col_scale=vec(col_scale, ones_c), row_norm=vec(row_norm, ones_r),
            col_norm=vec(col_norm, ones_c), shrink=float(shrink),
        )  # fmt: skip
    out_idx = np.zeros((n_rows, k_eff), np.int32)
    out_val = np.zeros((n_rows, k_eff), np.float32)
    out_cnt = np.zeros(n_rows, np.int64)
    if n_rows and it.nnz and ui.nnz:
        n_chunks = min(n_rows, max(64, 8 * nb.get_num_threads()))
        _knn_kernel(
            it.indptr.astype(np.int64), it.indices.astype(np.int32), it.data.astype(np.float64),
            ui.indptr.astype(np.int64), ui.indices.astype(np.int32), ui.data.astype(np.float64),
            vec(user_weight, np.ones(n_users, np.float64)),
            vec(row_scale, ones_r), vec(col_scale, ones_c), vec(row_norm, ones_r), vec(col_norm, ones_c),
            float(shrink), k_eff, n_chunks, out_idx, out_val, out_cnt,
        )  # fmt: skip
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(out_cnt, out=indptr[1:])
    keep = np.arange(k_eff)[None, :] < out_cnt[:, None]
    out = sp.csr_matrix((out_val[keep], out_idx[keep], indptr), shape=(n_rows, n_cols))
    out.sort_indices()
    return out


def l1_normalize_rows(mat: sp.csr_matrix) -> sp.csr_matrix:
    """Each row divided by its sum (rows summing to zero are left alone)."""
    sums = np.asarray(mat.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(1.0, sums, out=np.ones_like(sums), where=sums != 0)
    out = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ mat, dtype=np.float32)
    out.sort_indices()
    return out


# ====================================================================== shared base
class ItemItemModel(Recommender):
    """Base of models scoring ``X_u · W``: ``X_`` is the user × item matrix the model was fitted on (CSR,
    float32, see ``values``), ``weights_`` an item × item matrix (scipy CSR or a dense float32 array).

    Incremental updates (``partial_fit``): new events are added to ``X_`` (so existing and new users score with
    their whole history at once, no refit); new items get empty rows and columns in ``W`` — they contribute
    nothing to scores and rank after every fitted item (score ``UNSCORED``) until the next ``fit``.
    """

    state_shapes: ClassVar[dict[str, tuple[Any, ...]]] = {"W": ("items", "items")}

    supports_partial_fit: ClassVar[bool] = True
    values: str = "binary"

    @property
    def learns_from(self) -> str:
        """From ``values``: the binary matrix, counts or weights, or the ratings."""
        return {"count": "counts", "weight": "counts", "rating": "ratings"}.get(self.values, "binary")

    def _set_matrix(self, interactions: Interactions) -> sp.csr_matrix:
        self.X_ = interaction_matrix(interactions, self.values)
        self.n_fitted_items_ = interactions.n_items
        return self.X_

    def _score(self, users: np.ndarray) -> np.ndarray:
        x = self.X_
        out = np.zeros((len(users), self.n_items_), np.float32)
        users = np.ascontiguousarray(users, dtype=np.int64)
        if isinstance(self.weights_, np.ndarray):
            _score_dense(x.indptr, x.indices, x.data, users, self.weights_, out)
        else:
            w = self.weights_
            _score_sparse(x.indptr, x.indices, x.data, users, w.indptr, w.indices, w.data, out)
        if self.n_fitted_items_ < out.shape[1]:
            # Items added by partial_fit have no weights yet: rank them after every fitted item.
            out[:, self.n_fitted_items_ :] = UNSCORED
        return out

    def block_scorer(self, device: Any) -> Any:
        """On a GPU, ``X_u · W`` is computed there when ``W``, made dense, takes at most a quarter of the free
        memory (:class:`~recforge.core.device_sparse.SparseRowScorer`); else on the CPU."""
        if device is None:
            return self.score
        # torch is imported only once a GPU ranks (see recforge.core.accelerator)
        from recforge.core.device import free_gpu_bytes
        from recforge.core.device_sparse import SparseRowScorer

        w = self.weights_
        dense_bytes = 4 * w.shape[0] * w.shape[1]
        if device.type == "cuda" and 4 * dense_bytes > free_gpu_bytes(device):
            return self.score
        return SparseRowScorer(self.X_, w, device, self.n_fitted_items_, float(UNSCORED))

    def _score_histories(self, offsets: np.ndarray, items: np.ndarray) -> np.ndarray:
        # A history is scored like a user row with binary values (its items' order does not matter here).
        n = len(offsets) - 1
        x = sp.csr_matrix((np.ones(len(items), np.float32), items, offsets), shape=(n, self.n_items_))
        x.sum_duplicates()
        x.data[:] = 1.0
        out = np.zeros((n, self.n_items_), np.float32)
        rows = np.arange(n, dtype=np.int64)
        if isinstance(self.weights_, np.ndarray):
            _score_dense(x.indptr.astype(np.int64), x.indices, x.data, rows, self.weights_, out)
        else:
            w = self.weights_
            _score_sparse(x.indptr.astype(np.int64), x.indices, x.data, rows, w.indptr, w.indices, w.data, out)
        if self.n_fitted_items_ < out.shape[1]:
            out[:, self.n_fitted_items_ :] = UNSCORED
        return out

    def _similar_indices(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # "More like this" is the score row of a one-item history: the item's row of W.
        n = len(items)
        scores = self._score_histories(np.arange(n + 1, dtype=np.int64), np.asarray(items, dtype=np.int64))
        return mask_and_topk(scores, k, np.arange(n + 1, dtype=np.int64), np.asarray(items, dtype=np.int32))

    # ------------------------------------------------------------------ incremental updates
    def _grow(self, n_new_users: int, n_new_items: int) -> None:
        n_users, n_items = self.n_users_, self.n_items_  # the maps are already extended
        self.X_ = pad_csr(self.X_, n_users, n_items)
        if n_new_items:
            w = self.weights_
            if isinstance(w, np.ndarray):
                grown = np.zeros((n_items, n_items), np.float32)
                grown[: w.shape[0], : w.shape[1]] = w
                self.weights_ = grown
            else:
                self.weights_ = pad_csr(w, n_items, n_items)

    def _partial_fit(self, new: Interactions) -> None:
        if self.values == "weight" and new.weights is None:
            # partial_fit frames carry no weight column: new events weigh 1.
            new = Interactions(new.users, new.items, new.user_map, new.item_map, new.ratings, new.timestamps,
                               np.ones(len(new), np.float32))  # fmt: skip
        if self.values == "rating" and new.ratings is None:
            raise DataError(f"{type(self).__name__}(values='rating') updates need a rating column")
        add = interaction_matrix(new, self.values)
        # a pair's newest rating replaces the old one; counts and weights add up
        self.X_ = merge_csr(self.X_, add, {"rating": "replace", "binary": "ones"}.get(self.values, "sum"))

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"n_fitted_items": int(self.n_fitted_items_), **csr_to_state("X", self.X_)}
        if isinstance(self.weights_, np.ndarray):
            state["W"] = self.weights_
        else:
            state.update(csr_to_state("W", self.weights_))
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        n_users, n_items = self.n_users_, self.n_items_
        self.X_ = csr_from_state("X", state, (n_users, n_items))
        self.n_fitted_items_ = int(state.get("n_fitted_items", n_items))
        if not 0 <= self.n_fitted_items_ <= n_items:
            raise ArtifactError(f"n_fitted_items {self.n_fitted_items_} is outside 0..{n_items}")
        if "W" in state:
            self.weights_ = np.ascontiguousarray(state["W"], dtype=np.float32)
        else:
            self.weights_ = csr_from_state("W", state, (n_items, n_items))


# ====================================================================== item-based kNN
@register("itemknn")
class ItemKNN(ItemItemModel):
    """Item-based k-nearest neighbours with shrunk cosine similarity: ``score_uj = Σ_i x_ui · s_ij``.

    ``s_ij = y_i · y_j / (‖y_i‖ ‖y_j‖ + shrink)`` where ``y_i`` is item ``i``'s column of the (optionally
    re-weighted) user × item matrix; ``similarity="dot"`` drops the denominator (plain ``y_i · y_j``). For every
    *target* item ``j`` only its ``n_neighbors`` most similar other items are kept, so an item is scored from its
    own neighbourhood (the item itself never counts as its neighbour — so ``n_neighbors`` here is ``K − 1`` of
    libraries that include it). Only positive similarities are kept.

    Parameters:
        n_neighbors: neighbours kept per item (>= 1; called ``k`` before 0.2).
        shrink: added to the cosine denominator (>= 0); damps similarities resting on few co-occurrences.
        weighting: ``"none"``, ``"tfidf"`` or ``"bm25"`` weighting of the item × user matrix before the
            similarity (users are the "terms": heavy users count less; BM25 also damps popular items by ``B``).
        K1, B: BM25 parameters (``K1 > 0``, ``0 <= B <= 1``).
        similarity: ``"cosine"`` (default) or ``"dot"``.
        normalize: divide each item's row of kept weights by its sum (l1).
        values: what ``X`` holds, see :func:`interaction_matrix`; scores use the unweighted ``X``.
        num_threads: threads for the similarity kernel and scoring (0 = all cores); results do not depend on it.
        device: ``"auto"`` (``$RECFORGE_DEVICE``, else CUDA when present, else the CPU), ``"cpu"`` or
            ``"cuda[:N]"``: on a GPU the similarities are computed with torch (the same neighbours).

    Defaults (n_neighbors=5, shrink=10, weighting="none") come from validation NDCG@10 on leave-last-one-out
    splits of ML-100K and ml-latest-small (``benchmarks/bench_implicit.py``; 2-200 neighbours, shrink 0-50): they
    are within 6% of each dataset's best. Next-item protocols favour very small neighbourhoods (2 was best on
    both); random-holdout protocols and larger catalogues usually want more (50-200): tune ``n_neighbors``.

    Cost: ``Σ_u n_u²`` multiply-adds (``n_u`` = items of user ``u``), ``O(n_items)`` memory per thread plus the
    ``n_items × k`` result; the catalogue size itself is not limited.
    """

    renamed_params: ClassVar[dict[str, str]] = {"k": "n_neighbors"}
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "n_neighbors": {"low": 5, "high": 1000, "log": True, "int": True},
        "shrink": {"low": 0.0, "high": 200.0},
        "weighting": {"choices": ["none", "tfidf", "bm25"]},
    }
    param_constraints: ClassVar[dict[str, Constraint]] = {
        "n_neighbors": Integer(1),
        "shrink": Real(0),
        "weighting": Choice("none", "tfidf", "bm25"),
        "K1": Real(0, strict=True),
        "B": Real(0, 1.0),
        "similarity": Choice("cosine", "dot"),
        "normalize": Boolean(),
        "values": VALUES,
        "num_threads": Integer(0),
        "device": DeviceName(),
    }

    def __init__(
        self,
        n_neighbors: int = 5,
        shrink: float = 10.0,
        weighting: Literal["none", "tfidf", "bm25"] = "none",
        K1: float = 1.2,
        B: float = 0.75,
        similarity: Literal["cosine", "dot"] = "cosine",
        normalize: bool = False,
        values: Values = "binary",
        num_threads: int = 0,
        device: str = "auto",
    ) -> None:
        self.n_neighbors = n_neighbors
        self.shrink = shrink
        self.weighting = weighting
        self.K1 = K1
        self.B = B
        self.similarity = similarity
        self.normalize = normalize
        self.values = values
        self.num_threads = num_threads
        self.device = device

    def _fit(self, interactions: Interactions) -> None:
        device = cuda_device(self.device)
        x = self._set_matrix(interactions)
        item_users = x.T.tocsr()
        if self.weighting == "tfidf":
            item_users = tfidf_weight(item_users)
        elif self.weighting == "bm25":
            item_users = bm25_weight(item_users, self.K1, self.B)
        norm = None
        if self.similarity == "cosine":
            norm = np.sqrt(np.asarray(item_users.multiply(item_users).sum(axis=1), dtype=np.float64).ravel())
        with thread_limits(self.num_threads):
            # Cosine is symmetric: row j's top-k over i is target item j's neighbourhood, i.e. column j of W.
            rows = item_knn_rows(
                item_users, item_users.T.tocsr(), self.n_neighbors, row_norm=norm, col_norm=norm,
                shrink=self.shrink if self.similarity == "cosine" else 0.0, device=device,
            )  # fmt: skip
        w = rows.T.tocsr()
        w.sort_indices()
        self.weights_ = l1_normalize_rows(w) if self.normalize else sp.csr_matrix(w, dtype=np.float32)
