"""Alternating least squares: implicit-feedback weighted MF (Hu, Koren & Volinsky) and explicit biased MF.

Both models alternate between solving every user's factors with the item factors fixed and the reverse; each
row's problem is a small ridge regression. :class:`ImplicitALS` solves it by a few conjugate-gradient steps
warm-started from the previous factors (Takács, Pilászy & Tikk, 2011), which costs O(nnz·k) per sweep instead of
O(nnz·k²); :class:`BiasedALS` solves it exactly by a Cholesky factorisation per row. The per-row loops are numba
``prange`` loops (rows are independent, so results do not depend on the thread count); the one dense product per
half-sweep (``YᵀY``) is BLAS. On a GPU, :class:`ImplicitALS`'s conjugate gradient runs for all rows at once with
torch (:func:`implicit_half_step_torch`, the same steps), and :class:`BiasedALS`'s exact solves for a block of rows
at once (:func:`biased_half_step_torch`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar, Literal

import numba
import numpy as np
import scipy.sparse as sp
import torch
from numba import njit, prange

from recforge.core.accelerator import cuda_device
from recforge.core.device import deterministic_algorithms, resolve_device
from recforge.core.params import Boolean, Choice, Constraint, DeviceName, Integer, Real
from recforge.core.progress import EpochProgress
from recforge.core.sparse import csr_from_state, csr_to_state, merge_csr
from recforge.core.threads import chunk_scratch, thread_limits
from recforge.data.interactions import Interactions
from recforge.errors import ArtifactError, DataError
from recforge.models.factors import FactorModel, FactorRatingModel
from recforge.models.registry import register

log = logging.getLogger(__name__)

_TINY = 1e-20  # squared residual norm below which CG has converged (float32 factors)


# ---------------------------------------------------------------------------------------------------- kernels
def _n_chunks(n_rows: int) -> int:
    """Work units for a prange over rows: several per thread for load balance, each owning its scratch buffers."""
    return max(1, min(n_rows, 8 * numba.get_num_threads()))


@njit(cache=True, fastmath=True)
def _cholesky_solve(A: np.ndarray, b: np.ndarray, k: int) -> None:
    """Solve ``A x = b`` in place for a symmetric positive definite ``A`` of which only the lower triangle is
    filled; ``A`` is overwritten by its Cholesky factor and ``b`` by the solution."""
    for j in range(k):
        s = A[j, j]
        for p in range(j):
            s -= A[j, p] * A[j, p]
        # Guard: the regularised system is SPD in exact arithmetic; rounding must not produce a NaN.
        d = np.sqrt(s) if s > 1e-300 else 1e-150
        A[j, j] = d
        for i in range(j + 1, k):
            s = A[i, j]
            for p in range(j):
                s -= A[i, p] * A[j, p]
            A[i, j] = s / d
    for i in range(k):
        s = b[i]
        for p in range(i):
            s -= A[i, p] * b[p]
        b[i] = s / A[i, i]
    for i in range(k - 1, -1, -1):
        s = b[i]
        for p in range(i + 1, k):
            s -= A[p, i] * b[p]
        b[i] = s / A[i, i]


@njit(cache=True, fastmath=True, parallel=True)
def _implicit_cg(
    indptr: np.ndarray,
    indices: np.ndarray,
    conf: np.ndarray,
    rows: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    G: np.ndarray,
    cg_steps: int,
    n_chunks: int,
) -> None:
    """``cg_steps`` conjugate-gradient steps on ``(G + Yᵀ(C_u - I)Y) x_u = Yᵀ C_u 1`` for every row in ``rows``,
    starting from the current ``X[u]`` (updated in place). ``G = YᵀY + λI``; ``conf`` holds c_ui per nonzero."""
    n = rows.shape[0]
    k = X.shape[1]
    step = (n + n_chunks - 1) // n_chunks
    scratch = chunk_scratch(n_chunks, 4, k, X)
    for c in prange(n_chunks):
        x = scratch[c, 0, :k]
        r = scratch[c, 1, :k]
        p = scratch[c, 2, :k]
        ap = scratch[c, 3, :k]
        for t in range(c * step, min(n, (c + 1) * step)):
            u = rows[t]
            for a in range(k):
                x[a] = X[u, a]
            # r = b - A x, with b = Σ c_ui y_i and A x = G x + Σ (c_ui - 1)(y_i·x) y_i
            for a in range(k):
                s = np.float32(0.0)
                for b in range(k):
                    s += G[a, b] * x[b]
                r[a] = -s
            for idx in range(indptr[u], indptr[u + 1]):
                i = indices[idx]
                cu = conf[idx]
                d = np.float32(0.0)
                for a in range(k):
                    d += Y[i, a] * x[a]
                w = cu - (cu - np.float32(1.0)) * d
                for a in range(k):
                    r[a] += w * Y[i, a]
            rs = np.float32(0.0)
            for a in range(k):
                p[a] = r[a]
                rs += r[a] * r[a]
            for _ in range(cg_steps):
                if rs < _TINY:
                    break
                for a in range(k):
                    s = np.float32(0.0)
                    for b in range(k):
                        s += G[a, b] * p[b]
                    ap[a] = s
                for idx in range(indptr[u], indptr[u + 1]):
                    i = indices[idx]
                    d = np.float32(0.0)
                    for a in range(k):
                        d += Y[i, a] * p[a]
                    w = (conf[idx] - np.float32(1.0)) * d
                    for a in range(k):
                        ap[a] += w * Y[i, a]
                pap = np.float32(0.0)
                for a in range(k):
                    pap += p[a] * ap[a]
                if pap <= 0:
                    break
                alpha = rs / pap
                rs_new = np.float32(0.0)
                for a in range(k):
                    x[a] += alpha * p[a]
                    r[a] -= alpha * ap[a]
                    rs_new += r[a] * r[a]
                beta = rs_new / rs
                for a in range(k):
                    p[a] = r[a] + beta * p[a]
                rs = rs_new
            for a in range(k):
                X[u, a] = x[a]


@njit(cache=True, fastmath=True, parallel=True)
def _implicit_exact(
    indptr: np.ndarray,
    indices: np.ndarray,
    conf: np.ndarray,
    rows: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    G: np.ndarray,
    n_chunks: int,
) -> None:
    """Exact solve of the same system as :func:`_implicit_cg` by Cholesky (float64), for every row in ``rows``."""
    n = rows.shape[0]
    k = X.shape[1]
    step = (n + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        A = np.empty((k, k), np.float64)
        b = np.empty(k, np.float64)
        y = np.empty(k, np.float64)
        for t in range(c * step, min(n, (c + 1) * step)):
            u = rows[t]
            for a in range(k):
                b[a] = 0.0
                for q in range(a + 1):
                    A[a, q] = G[a, q]
            for idx in range(indptr[u], indptr[u + 1]):
                i = indices[idx]
                cu = np.float64(conf[idx])
                for a in range(k):
                    y[a] = Y[i, a]
                w = cu - 1.0
                for a in range(k):
                    wa = w * y[a]
                    b[a] += cu * y[a]
                    for q in range(a + 1):
                        A[a, q] += wa * y[q]
            _cholesky_solve(A, b, k)
            for a in range(k):
                X[u, a] = b[a]


@njit(cache=True, fastmath=True, parallel=True)
def _implicit_loss_rows(
    indptr: np.ndarray, indices: np.ndarray, conf: np.ndarray, X: np.ndarray, Y: np.ndarray
) -> np.ndarray:
    """Per-row sum over nonzeros of ``c(1 - s)² - s²`` (the correction of the all-zero-preference loss)."""
    n, k = X.shape
    out = np.zeros(n, np.float64)
    for u in prange(n):
        acc = 0.0
        for idx in range(indptr[u], indptr[u + 1]):
            i = indices[idx]
            s = 0.0
            for a in range(k):
                s += X[u, a] * Y[i, a]
            acc += conf[idx] * (1.0 - s) ** 2 - s * s
        out[u] = acc
    return out


@njit(cache=True, fastmath=True, parallel=True)
def _biased_exact(
    indptr: np.ndarray,
    indices: np.ndarray,
    ratings: np.ndarray,
    rows: np.ndarray,
    X: np.ndarray,
    xb: np.ndarray,
    Y: np.ndarray,
    yb: np.ndarray,
    mu: float,
    reg: float,
    bias_reg: float,
    weighted: bool,
    reg_prior: float,
    bias_prior: float,
    n_chunks: int,
) -> None:
    """Exact ridge solve of ``[x_u, b_u]`` for every row in ``rows``: targets ``r - μ - b_i`` regressed on the
    augmented design ``[y_i, 1]`` (the bias is a factor whose partner column is fixed at one). Regularisation
    is ``reg`` on factors and ``bias_reg`` on the bias, each times the row's count when ``weighted``, plus
    ``reg_prior`` and ``bias_prior`` whatever the count."""
    n = rows.shape[0]
    k = X.shape[1]
    k1 = k + 1
    step = (n + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        A = np.empty((k1, k1), np.float64)
        b = np.empty(k1, np.float64)
        Z = np.empty((4, k1), np.float64)
        tz = np.empty(4, np.float64)
        for t in range(c * step, min(n, (c + 1) * step)):
            u = rows[t]
            lo, hi = indptr[u], indptr[u + 1]
            if hi == lo:  # nothing observed: the ridge solution is zero
                for a in range(k):
                    X[u, a] = 0.0
                xb[u] = 0.0
                continue
            for a in range(k1):
                b[a] = 0.0
                for q in range(a + 1):
                    A[a, q] = 0.0
            # Rank-4 updates: four design rows per pass over A quarter the loads and stores of A.
            for idx in range(lo, hi, 4):
                m = min(4, hi - idx)
                for j in range(4):
                    if j < m:
                        i = indices[idx + j]
                        for a in range(k):
                            Z[j, a] = Y[i, a]
                        Z[j, k] = 1.0
                        tz[j] = ratings[idx + j] - mu - yb[i]
                    else:
                        for a in range(k1):
                            Z[j, a] = 0.0
                        tz[j] = 0.0
                for a in range(k1):
                    z0, z1, z2, z3 = Z[0, a], Z[1, a], Z[2, a], Z[3, a]
                    b[a] += tz[0] * z0 + tz[1] * z1 + tz[2] * z2 + tz[3] * z3
                    for q in range(a + 1):
                        A[a, q] += z0 * Z[0, q] + z1 * Z[1, q] + z2 * Z[2, q] + z3 * Z[3, q]
            scale = float(hi - lo) if weighted else 1.0
            for a in range(k):
                A[a, a] += reg * scale + reg_prior
            A[k, k] += bias_reg * scale + bias_prior
            _cholesky_solve(A, b, k1)
            for a in range(k):
                X[u, a] = b[a]
            xb[u] = b[k]


@njit(cache=True, fastmath=True, parallel=True)
def _biased_sse_rows(
    indptr: np.ndarray,
    indices: np.ndarray,
    ratings: np.ndarray,
    X: np.ndarray,
    xb: np.ndarray,
    Y: np.ndarray,
    yb: np.ndarray,
    mu: float,
) -> np.ndarray:
    """Per-row sum of squared training errors of ``μ + b_u + b_i + x_u·y_i``."""
    n, k = X.shape
    out = np.zeros(n, np.float64)
    for u in prange(n):
        acc = 0.0
        for idx in range(indptr[u], indptr[u + 1]):
            i = indices[idx]
            s = mu + xb[u] + yb[i]
            for a in range(k):
                s += X[u, a] * Y[i, a]
            acc += (ratings[idx] - s) ** 2
        out[u] = acc
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def implicit_half_step(
    R: sp.csr_matrix,
    conf: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    reg: float,
    solver: Literal["cg", "cholesky"] = "cg",
    cg_steps: int = 3,
    rows: np.ndarray | None = None,
) -> None:
    """Update ``X`` in place (rows ``rows``, default all) for fixed ``Y`` under the implicit-ALS objective.

    ``R`` gives the sparsity pattern (CSR, rows of ``X`` × rows of ``Y``) and ``conf`` the confidence of each
    of its nonzeros, aligned with ``R.data``. Exposed for tests and fold-in.
    """
    k = X.shape[1]
    rows = np.arange(X.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return
    gram = Y.T @ Y  # BLAS, once per half-step
    if solver == "cg":
        G = (gram + np.float32(reg) * np.eye(k, dtype=np.float32)).astype(np.float32)
        _implicit_cg(R.indptr, R.indices, conf, rows, X, Y, G, int(cg_steps), _n_chunks(len(rows)))
    else:
        G = gram.astype(np.float64) + reg * np.eye(k)
        _implicit_exact(R.indptr, R.indices, conf, rows, X, Y, G, _n_chunks(len(rows)))


#: Nonzeros whose ``y_i · p_u`` products one step of :func:`implicit_half_step_torch` gathers at once.
_DOT_CHUNK = 2**22


class DeviceCSR:
    """A CSR pattern with a value per nonzero (a confidence, a rating) on a torch device, for
    :func:`implicit_half_step_torch` and :class:`DeviceRatings`; ``deterministic``: sums in a fixed order (``index_add_`` under torch's deterministic mode) instead of cuSPARSE's
    product, whose additions arrive in a varying order on a GPU."""

    def __init__(self, R: sp.csr_matrix, conf: np.ndarray, device: torch.device, deterministic: bool = False) -> None:
        self.shape = R.shape
        self.deterministic = deterministic
        self.crow = torch.from_numpy(R.indptr.astype(np.int64)).to(device)
        self.col = torch.from_numpy(R.indices.astype(np.int64)).to(device)
        self.row = torch.repeat_interleave(torch.arange(R.shape[0], device=device), self.crow.diff())
        self.conf = torch.from_numpy(np.asarray(conf, np.float32)).to(device)

    def weighted_sum(self, values: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``Σ_i values_ui · y_i`` for every row ``u`` (a sparse × dense product)."""
        if self.deterministic:
            out = torch.zeros((self.shape[0], Y.shape[1]), dtype=Y.dtype, device=Y.device)
            for lo in range(0, len(values), _DOT_CHUNK):
                hi = lo + _DOT_CHUNK
                out.index_add_(0, self.row[lo:hi], values[lo:hi, None] * Y[self.col[lo:hi]])
            return out
        with warnings.catch_warnings():  # torch calls its CSR support beta; the product used here is long-standing
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            matrix = torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)
        return matrix @ Y

    def dots(self, P: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``p_u · y_i`` for every nonzero ``(u, i)``, gathered in chunks."""
        out = torch.empty_like(self.conf)
        for lo in range(0, len(out), _DOT_CHUNK):
            hi = lo + _DOT_CHUNK
            out[lo:hi] = (Y[self.col[lo:hi]] * P[self.row[lo:hi]]).sum(1)
        return out


def implicit_half_step_torch(R: DeviceCSR, X: torch.Tensor, Y: torch.Tensor, reg: float, cg_steps: int) -> None:
    """:func:`implicit_half_step`'s conjugate gradient for every row at once (``X`` updated in place): the same
    ``cg_steps`` steps from the current ``X``, a row stopping once its residual vanishes or its curvature is not
    positive; matrix-vector products ``G p + Σ_i (c_ui − 1)(y_i·p) y_i`` as dense and sparse products."""
    k = X.shape[1]
    G = Y.T @ Y + float(reg) * torch.eye(k, device=X.device, dtype=X.dtype)
    c1 = R.conf - 1.0
    r = R.weighted_sum(R.conf - c1 * R.dots(X, Y), Y) - X @ G  # b − A x, with b = Σ c_ui y_i
    p = r.clone()
    rs = (r * r).sum(1)
    done = rs < _TINY
    for _ in range(cg_steps):
        ap = p @ G + R.weighted_sum(c1 * R.dots(p, Y), Y)
        pap = (p * ap).sum(1)
        done |= pap <= 0
        alpha = torch.where(done, torch.zeros_like(pap), rs / torch.where(done, torch.ones_like(pap), pap))
        X += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        beta = torch.where(done, torch.zeros_like(rs), rs_new / torch.where(done, torch.ones_like(rs), rs))
        p = r + beta[:, None] * p
        rs = torch.where(done, rs, rs_new)
        done |= rs < _TINY


#: Float64 entries one block of :func:`biased_half_step_torch` may hold in its padded design rows (and in its
#: normal matrices): 256 MB each (a row longer than that is a block of its own).
_SOLVE_BLOCK = 2**25


class DeviceRatings(DeviceCSR):
    """A CSR matrix of ratings on a torch device (the ratings as :class:`DeviceCSR`'s per-nonzero values), with its
    non-empty rows in blocks of similar count for :func:`biased_half_step_torch`: sorted by count, so padding every
    row of a block to the block's longest row wastes little, and sized so a block's padded design and normal
    matrices (``width`` columns each) stay under :data:`_SOLVE_BLOCK` entries."""

    def __init__(self, R: sp.csr_matrix, width: int, device: torch.device) -> None:
        super().__init__(R, R.data, device)
        self.count = self.crow.diff()
        counts = np.diff(R.indptr)
        order = np.argsort(counts, kind="stable")
        self.empty = torch.from_numpy(order[counts[order] == 0]).to(device)
        order = order[counts[order] > 0]
        self.blocks: list[tuple[torch.Tensor, int]] = []
        most = max(1, _SOLVE_BLOCK // (width * width))  # rows a block can hold: each costs width² or more
        lo = 0
        while lo < len(order):
            window = order[lo : lo + most]
            rows_cost = np.maximum(counts[window], width) * width * np.arange(1, len(window) + 1)
            hi = lo + max(1, int(np.searchsorted(rows_cost, _SOLVE_BLOCK, side="right")))
            self.blocks.append((torch.from_numpy(order[lo:hi]).to(device), int(counts[order[hi - 1]])))
            lo = hi

    def sse(self, X: torch.Tensor, xb: torch.Tensor, Y: torch.Tensor, yb: torch.Tensor, mu: float) -> float:
        """Sum of squared errors of ``μ + b_u + b_i + x_u·y_i`` over the ratings (rows of ``X`` by columns of
        ``Y``)."""
        pred = mu + xb.double()[self.row] + yb.double()[self.col] + self.dots(X, Y).double()
        return float((self.conf.double() - pred).square().sum())


def biased_half_step_torch(R: DeviceRatings, X: torch.Tensor, xb: torch.Tensor, Y: torch.Tensor, yb: torch.Tensor,
                           mu: float, reg: float, bias_reg: float, weighted: bool, reg_prior: float,
                           bias_prior: float) -> None:
    """:func:`_biased_exact` for every row of ``R`` at once, a block of rows at a time (``X`` and ``xb`` updated
    in place): each row's augmented design ``[y_i, 1]`` gathered and padded with zero rows, its normal equations
    formed by a batched product and solved by a batched Cholesky factorisation, in float64 as on the CPU."""
    k = X.shape[1]
    for rows, width in R.blocks:
        start, count = R.crow[rows], R.count[rows]
        offset = torch.arange(width, device=X.device)
        valid = offset[None, :] < count[:, None]
        at = torch.where(valid, start[:, None] + offset[None, :], 0)
        cols = R.col[at]
        mask = valid.double()
        Z = torch.cat([Y[cols].double(), torch.ones_like(mask)[..., None]], dim=2) * mask[..., None]
        target = (R.conf[at].double() - mu - yb[cols].double()) * mask
        A = Z.transpose(1, 2) @ Z
        b = Z.transpose(1, 2) @ target[..., None]
        scale = count.double() if weighted else torch.ones_like(mask[:, 0])
        diagonal = A.diagonal(dim1=1, dim2=2)
        diagonal[:, :k] += (reg * scale + reg_prior)[:, None]
        diagonal[:, k] += bias_reg * scale + bias_prior
        factor, info = torch.linalg.cholesky_ex(A)
        if bool((info > 0).any()):  # singular without penalties (fewer ratings than factors): the CPU's guard
            A[info > 0] += 1e-10 * torch.eye(k + 1, dtype=A.dtype, device=A.device)
            factor, _ = torch.linalg.cholesky_ex(A)
        solution = torch.cholesky_solve(b, factor)[..., 0]
        X[rows] = solution[:, :k].to(X.dtype)
        xb[rows] = solution[:, k].to(xb.dtype)
    X[R.empty] = 0.0  # nothing observed: the ridge solution is zero
    xb[R.empty] = 0.0


# ---------------------------------------------------------------------------------------------------- models
#: The parameters both ALS models share.
_ALS_CONSTRAINTS: dict[str, Constraint] = {
    "n_factors": Integer(1),
    "reg": Real(0),
    "epochs": Integer(0),
    "init_std": Real(0),
    "seed": Integer(0),
    "progress": Boolean(),
    "num_threads": Integer(0),
}

@register("als")
class ImplicitALS(FactorModel):
    """Weighted matrix factorisation for implicit feedback by alternating least squares (Hu, Koren & Volinsky,
    2008), solved with warm-started conjugate gradient.

    Every (user, item) cell is fitted: preference ``p_ui = 1`` where the user interacted, else 0, with a
    confidence ``c_ui`` that grows with ``r_ui``, the interaction count or summed weight (``interactions.csr("auto")``);
    unseen cells weigh 1. Loss ``Σ c_ui (p_ui - x_u·y_i)² + λ (‖X‖² + ‖Y‖²)``. Each of the ``epochs``
    sweeps solves all users then all items: ``solver="cg"`` takes ``cg_steps`` conjugate-gradient steps per row from
    the previous factors (cheap, converges over the sweeps); ``"cholesky"`` solves each row exactly (O(k³) per row,
    for checking and small problems). Rows are independent, so any ``num_threads`` gives the same factors.
    ``device``: ``"auto"`` (``$RECFORGE_DEVICE``, else CUDA when present) runs the ``cg`` solver on a GPU with torch
    (the same steps for all rows at once, :func:`implicit_half_step_torch`); the factors end on the CPU. On a GPU
    the sparse products add in a varying order, so runs agree to float32 rounding only; ``deterministic=True``
    sums them in a fixed order instead (slower) and repeats a run bit for bit.

    ``confidence`` says how ``c_ui`` and ``λ`` follow from ``alpha`` and ``reg``:

    - ``"auto"`` (default), set from the data so that the defaults mean the same on any data:
      ``c_ui = 1 + α·log₂(1 + r_ui/m)`` with ``m`` the median nonzero ``r_ui`` (1 for events without counts, where
      this is ``1 + α``; play counts are not stars, and the logarithm keeps a user's thousand plays of one song from
      outweighing the rest of the history) and ``α = alpha / density`` (density: the share of user-item cells with
      an interaction), so positive cells keep the same share of the total confidence however sparse the data; the
      penalty is ``λ = reg·(1 + α)``, in step with the confidence a row's positive cells carry.
    - ``"linear"``: ``c_ui = 1 + alpha·r_ui`` and ``λ = reg``, as given (``implicit``'s weighting is ``alpha·r``,
      without the 1).
    - ``"log"``: ``c_ui = 1 + alpha·log(1 + r_ui/eps)`` and ``λ = reg``.

    The fitted ``alpha_``, ``reg_`` and ``count_scale_`` (``m``, or ``eps``) are kept, and ``partial_fit`` weighs
    new events with them: it adds them to the stored interaction matrix (counts add up), re-solves the users they
    touch exactly from their full histories with item factors fixed, then the touched items with user factors fixed.

    Defaults (``"auto"``, alpha 0.005, reg 5) were chosen on the leave-one-out validation event (train → valid) of
    six regimes of ``benchmarks/bench_regimes.py`` (ml-latest-small, ML-100K ``u1.base``, sessions, play counts,
    synthetic data at density 0.06%, five events per user), NDCG@10, 64 factors, 15 epochs, over alpha ∈ {0.005,
    0.015, 0.05} × reg ∈ {2, 5, 10}: the best or within noise on every regime (validation NDCG@10 0.0377 / 0.0522 /
    0.0260 / 0.1152 / 0.1347 / 0.0156), where the former fixed alpha 0.25, reg 10 (tuned on MovieLens alone) gave
    0.0365 / 0.0531 / 0.0252 / 0.0992 / 0.1323 / 0.0105, below popularity (0.0163) on the short histories.
    (``epochs`` was called ``iterations`` before 0.2.)
    """

    renamed_params: ClassVar[dict[str, str]] = {"iterations": "epochs"}
    learns: ClassVar[str] = "counts"
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "n_factors": {"low": 16, "high": 256, "log": True, "int": True},
        "reg": {"low": 0.1, "high": 300, "log": True},
        "alpha": {"low": 1e-4, "high": 0.3, "log": True},
    }
    param_constraints: ClassVar[dict[str, Constraint]] = {
        **_ALS_CONSTRAINTS,
        "alpha": Real(0),
        "confidence": Choice("auto", "linear", "log"),
        "eps": Real(0, strict=True),
        "solver": Choice("cg", "cholesky"),
        "cg_steps": Integer(1),
        "device": DeviceName(),
        "deterministic": Boolean(),
    }

    def __init__(
        self,
        n_factors: int = 64,
        reg: float = 5.0,
        alpha: float = 0.005,
        epochs: int = 15,
        confidence: Literal["auto", "linear", "log"] = "auto",
        eps: float = 1.0,
        solver: Literal["cg", "cholesky"] = "cg",
        cg_steps: int = 3,
        init_std: float = 0.01,
        seed: int = 0,
        progress: bool = True,
        num_threads: int = 0,
        device: str = "auto",
        deterministic: bool = False,
    ) -> None:
        self.n_factors = n_factors
        self.reg = reg
        self.alpha = alpha
        self.epochs = epochs
        self.confidence = confidence
        self.eps = eps
        self.solver = solver
        self.cg_steps = cg_steps
        self.init_std = init_std
        self.seed = seed
        self.progress = progress
        self.num_threads = num_threads
        self.device = device
        self.deterministic = deterministic

    supports_partial_fit = True
    #: The confidence multiplier, penalty and count unit the model was fitted with (see ``confidence``).
    alpha_: float
    reg_: float
    count_scale_: float

    def _set_confidence(self, R: sp.csr_matrix) -> None:
        """``alpha_``, ``reg_`` and ``count_scale_`` from the parameters and, for ``"auto"``, the data."""
        if self.confidence != "auto":
            self.alpha_, self.reg_, self.count_scale_ = float(self.alpha), float(self.reg), float(self.eps)
            return
        positive = R.data[R.data > 0]
        density = len(positive) / max(1, R.shape[0] * R.shape[1])
        self.count_scale_ = float(np.median(positive)) if len(positive) else 1.0
        self.alpha_ = float(self.alpha) / max(density, 1e-12)
        self.reg_ = float(self.reg) * (1.0 + self.alpha_)

    def _confidence(self, values: np.ndarray) -> np.ndarray:
        v = values.astype(np.float64)
        if self.confidence == "linear":
            c = 1.0 + self.alpha_ * v
        elif self.confidence == "log":
            c = 1.0 + self.alpha_ * np.log1p(v / self.count_scale_)
        else:
            c = 1.0 + self.alpha_ * np.log2(1.0 + v / self.count_scale_)
        return c.astype(np.float32)

    def _fit(self, interactions: Interactions) -> None:
        R = interactions.csr("auto").astype(np.float32)
        if R.data.size and R.data.min() < 0:
            raise DataError("ImplicitALS needs non-negative counts or weights; drop or shift negative weights")
        self.interactions_ = R
        self._set_confidence(R)
        rng = np.random.default_rng(self.seed)
        k = self.n_factors
        X = (rng.standard_normal((R.shape[0], k)) * self.init_std).astype(np.float32)
        Y = (rng.standard_normal((R.shape[1], k)) * self.init_std).astype(np.float32)
        conf_u = self._confidence(R.data)
        Rt = R.T.tocsr()
        Rt.sort_indices()
        conf_i = self._confidence(Rt.data)
        bar = EpochProgress(self.epochs, "ImplicitALS", enabled=self.progress)
        device = resolve_device(self.device)
        with thread_limits(self.num_threads):
            if device.type == "cuda" and self.solver == "cg":  # every row's CG at once on the GPU
                by_user = DeviceCSR(R, conf_u, device, self.deterministic)
                by_item = DeviceCSR(Rt, conf_i, device, self.deterministic)
                Xd, Yd = torch.from_numpy(X).to(device), torch.from_numpy(Y).to(device)
                with deterministic_algorithms(self.deterministic):
                    for _ in bar:
                        implicit_half_step_torch(by_user, Xd, Yd, self.reg_, self.cg_steps)
                        implicit_half_step_torch(by_item, Yd, Xd, self.reg_, self.cg_steps)
                        bar.log(self._loss_torch(by_user, Xd, Yd))
                X, Y = Xd.cpu().numpy(), Yd.cpu().numpy()
            else:
                for _ in bar:
                    implicit_half_step(R, conf_u, X, Y, self.reg_, self.solver, self.cg_steps)
                    implicit_half_step(Rt, conf_i, Y, X, self.reg_, self.solver, self.cg_steps)
                    bar.log(self._loss(R, conf_u, X, Y))
        self.loss_history_ = bar.history
        self.user_factors_ = np.ascontiguousarray(X)
        self.item_factors_ = np.ascontiguousarray(Y)

    def _loss(self, R: sp.csr_matrix, conf: np.ndarray, X: np.ndarray, Y: np.ndarray) -> float:
        """The weighted loss per nonzero: the all-cells term is ``Σ (XᵀX ∘ YᵀY)``, the nonzeros correct it."""
        X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
        with np.errstate(under="ignore"):  # factors of empty rows shrink towards zero; underflow is harmless
            full = float(np.sum((X64.T @ X64) * (Y64.T @ Y64)))
            penalty = self.reg_ * (float(np.square(X64).sum()) + float(np.square(Y64).sum()))
        corr = float(_implicit_loss_rows(R.indptr, R.indices, conf, X, Y).sum())
        return (full + corr + penalty) / max(1, R.nnz)

    def _loss_torch(self, R: DeviceCSR, X: torch.Tensor, Y: torch.Tensor) -> float:
        """:meth:`_loss` on the factors' device."""
        s = R.dots(X, Y).double()
        corr = (R.conf.double() * (1.0 - s) ** 2 - s * s).sum()
        X64, Y64 = X.double(), Y.double()
        full = ((X64.T @ X64) * (Y64.T @ Y64)).sum()
        penalty = self.reg_ * (X64.square().sum() + Y64.square().sum())
        return float(full + corr + penalty) / max(1, len(R.conf))

    def _partial_fit(self, new: Interactions) -> None:
        R = merge_csr(self.interactions_, new.csr("auto").astype(np.float32), "sum")
        self.interactions_ = R
        Rt = R.T.tocsr()
        Rt.sort_indices()
        X = np.ascontiguousarray(self.user_factors_, dtype=np.float32).copy()
        Y = np.ascontiguousarray(self.item_factors_, dtype=np.float32).copy()
        with thread_limits(self.num_threads):
            implicit_half_step(R, self._confidence(R.data), X, Y, self.reg_, "cholesky", rows=np.unique(new.users))
            implicit_half_step(Rt, self._confidence(Rt.data), Y, X, self.reg_, "cholesky", rows=np.unique(new.items))
        self.user_factors_, self.item_factors_ = X, Y

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), **csr_to_state("interactions", self.interactions_, "_"),
                "alpha": self.alpha_, "reg": self.reg_, "count_scale": self.count_scale_}

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        shape = (self.user_factors_.shape[0], self.item_factors_.shape[0])
        self.interactions_ = csr_from_state("interactions", state, shape, "_")
        # Artifacts saved before the confidence was set from the data used the parameters as given.
        fitted = {"alpha": self.alpha, "reg": self.reg, "count_scale": self.eps}
        for name, before in fitted.items():
            value = float(state.get(name, before))
            if not np.isfinite(value) or value < 0 or (name == "count_scale" and value == 0):
                raise ArtifactError(f"{name} must be a {'positive' if name == 'count_scale' else 'non-negative'} "
                                    f"number, got {value}")
            setattr(self, f"{name}_", value)


@register("biasedals")
class BiasedALS(FactorRatingModel):
    """Explicit-rating matrix factorisation with biases by alternating least squares:
    ``r_ui ≈ μ + b_u + b_i + p_u·q_i``.

    ``μ`` is the mean training rating; biases start from means damped by ``damping`` pseudo-ratings. Each of the ``epochs``
    sweeps solves every user's ``[p_u, b_u]`` exactly (Cholesky per row) by regressing ``r_ui - μ - b_i`` on the
    augmented design ``[q_i, 1]``, then every item's ``[q_i, b_i]`` symmetrically, so biases and factors are fitted
    jointly. Regularisation ``reg`` (factors) and ``bias_reg`` (biases) is multiplied by the row's rating count
    when ``weighted_reg`` (ALS-WR, Zhou et al. 2008, as in LensKit), so heavy and light users are shrunk alike;
    on top of it every row's factors carry ``prior_reg`` and its bias ``damping`` whatever its count, as if it had a
    few more ratings at the mean, so that a user or item with one or two ratings is not fitted exactly (without
    them BiasedALS fell far behind the bias model on sparse data).
    Predictions are clamped to the training rating range. ``partial_fit`` stores the new ratings (a newer rating
    of the same pair replaces the old one), then re-solves the touched users, then the touched items.
    ``device``: ``"auto"`` (``$RECFORGE_DEVICE``, else CUDA when present) fits on a GPU with torch
    (:func:`biased_half_step_torch`: the same exact solves, a block of rows at once); the factors end on the CPU.
    ``deterministic=True`` runs it with deterministic kernels only (cuBLAS promises repeatable products only then).

    The defaults mean the same on any rating scale: fitting ``(r - μ)/s`` (``s = rating_scale_``, the ratings'
    spread over the spread the defaults were tuned on) with these penalties is the same problem as fitting ``r``
    with the factor penalty ``reg·s`` and the factors started ``√s`` times larger (the factors take ``√s`` each,
    biases and errors ``s``), so that is what the model solves. Without it, on ratings spread 1.6 times wider (books
    on 1–10) the factors were 1.6 times less regularised than tuned and fell behind the bias model.

    Defaults were chosen on a random 10% validation carve of ML-100K ``u1.base`` (``random_split(u1.train,
    0.1, seed=0)``; the test file is never used), RMSE, 50 factors: grid reg ∈ {0.05, 0.08, 0.1, 0.15, 0.2, 0.3}
    × bias_reg ∈ {0, 0.02, 0.05, 0.1, 0.2} × epochs ∈ {5, 10, 20, 30}, and unweighted regularisation with
    reg ∈ {5, 10, 20} × bias_reg ∈ {1, 5}. Winner reg 0.15, bias_reg 0.05 (validation RMSE 0.9196 at 10
    epochs; 20 or 30 epochs gain 0.0007 at two or three times the cost, so 10 as in LensKit). ``prior_reg`` and
    ``damping`` were chosen on the validation carves (a random 10% of a random 90%) of ML-100K ``u1.base``,
    ml-latest-small and the synthetic generator at density 0.08% (6,000 users, 60,000 ratings), over
    prior_reg ∈ {0, 0.75, 1, 3, 10} × damping ∈ {0, 2, 5, 10}: (1, 2) is best or within 0.002 of the best on all
    three (validation RMSE 0.9293 / 0.8617 / 0.9189 against the bias model's 0.9478 / 0.8787 / 0.9300; with
    neither, 0.9304 / 0.8735 / 0.9877). (``epochs`` was called ``iterations`` before 0.2.)
    """

    renamed_params: ClassVar[dict[str, str]] = {"iterations": "epochs"}
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "n_factors": {"low": 10, "high": 200, "log": True, "int": True},
        "reg": {"low": 0.01, "high": 3, "log": True},
        "bias_reg": {"low": 0.001, "high": 3, "log": True},
    }
    param_constraints: ClassVar[dict[str, Constraint]] = {
        **_ALS_CONSTRAINTS,
        "bias_reg": Real(0),
        "weighted_reg": Boolean(),
        "prior_reg": Real(0),
        "damping": Real(0),
        "device": DeviceName(),
        "deterministic": Boolean(),
    }

    def __init__(
        self,
        n_factors: int = 50,
        reg: float = 0.15,
        bias_reg: float = 0.05,
        epochs: int = 10,
        weighted_reg: bool = True,
        prior_reg: float = 1.0,
        damping: float = 2.0,
        init_std: float = 0.1,
        seed: int = 0,
        progress: bool = True,
        num_threads: int = 0,
        device: str = "auto",
        deterministic: bool = False,
    ) -> None:
        self.n_factors = n_factors
        self.reg = reg
        self.bias_reg = bias_reg
        self.epochs = epochs
        self.weighted_reg = weighted_reg
        self.prior_reg = prior_reg
        self.damping = damping
        self.init_std = init_std
        self.seed = seed
        self.progress = progress
        self.num_threads = num_threads
        self.device = device
        self.deterministic = deterministic

    supports_partial_fit = True

    def _fit(self, interactions: Interactions) -> None:
        self._fit_rating_range(interactions)
        R = interactions.csr("rating").astype(np.float32)
        self.ratings_ = R
        Rt = R.T.tocsr()
        Rt.sort_indices()
        mu = float(R.data.astype(np.float64).mean())
        self.global_bias_ = mu
        bu, bi = self._damped_biases(R, Rt, mu)
        rng = np.random.default_rng(self.seed)
        k = self.n_factors
        std = self.init_std * np.sqrt(self.rating_scale_)
        X = (rng.standard_normal((R.shape[0], k)) * std).astype(np.float32)
        Y = (rng.standard_normal((R.shape[1], k)) * std).astype(np.float32)
        bar = EpochProgress(self.epochs, "BiasedALS", enabled=self.progress)
        device = cuda_device(self.device)
        if device is not None:
            X, bu, Y, bi = self._fit_on_device(R, Rt, X, bu, Y, bi, bar, device)
        else:
            with thread_limits(self.num_threads):
                for _ in bar:
                    self._half(R, X, bu, Y, bi, np.arange(R.shape[0]))
                    self._half(Rt, Y, bi, X, bu, np.arange(R.shape[1]))
                    sse = _biased_sse_rows(R.indptr, R.indices, R.data, X, bu, Y, bi, mu).sum()
                    bar.log(float(np.sqrt(sse / max(1, R.nnz))))  # training RMSE
        self.loss_history_ = bar.history
        self.user_factors_, self.item_factors_ = X, Y
        self.user_bias_, self.item_bias_ = bu, bi

    def _fit_on_device(self, R: sp.csr_matrix, Rt: sp.csr_matrix, X: np.ndarray, bu: np.ndarray, Y: np.ndarray,
                       bi: np.ndarray, bar: EpochProgress, device: torch.device) -> tuple[np.ndarray, ...]:
        """The epochs of :meth:`_fit` on a GPU (:func:`biased_half_step_torch`: the same exact solves, all rows
        at once); returns the factors and biases, back on the CPU."""
        width = self.n_factors + 1
        by_user, by_item = DeviceRatings(R, width, device), DeviceRatings(Rt, width, device)
        Xd, bud, Yd, bid = (torch.from_numpy(a).to(device) for a in (X, bu, Y, bi))
        mu = float(self.global_bias_)
        penalties = self._penalties()
        with deterministic_algorithms(self.deterministic):
            for _ in bar:
                biased_half_step_torch(by_user, Xd, bud, Yd, bid, mu, *penalties)
                biased_half_step_torch(by_item, Yd, bid, Xd, bud, mu, *penalties)
                bar.log(float(np.sqrt(by_user.sse(Xd, bud, Yd, bid, mu) / max(1, R.nnz))))
        return tuple(t.cpu().numpy() for t in (Xd, bud, Yd, bid))

    def _damped_biases(self, R: sp.csr_matrix, Rt: sp.csr_matrix, mu: float) -> tuple[np.ndarray, np.ndarray]:
        """Item then user damped means of the residuals, the usual starting point (and all that zero
        epochs leave)."""
        n_i = np.diff(Rt.indptr)
        sum_i = np.add.reduceat(np.r_[Rt.data.astype(np.float64) - mu, 0.0], Rt.indptr[:-1]) * (n_i > 0)
        bi = sum_i / (n_i + self.damping + (n_i == 0))
        res_u = R.data.astype(np.float64) - mu - bi[R.indices]
        n_u = np.diff(R.indptr)
        sum_u = np.add.reduceat(np.r_[res_u, 0.0], R.indptr[:-1]) * (n_u > 0)
        bu = sum_u / (n_u + self.damping + (n_u == 0))
        return bu.astype(np.float32), bi.astype(np.float32)

    def _half(
        self, R: sp.csr_matrix, X: np.ndarray, xb: np.ndarray, Y: np.ndarray, yb: np.ndarray, rows: np.ndarray
    ) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows):
            _biased_exact(R.indptr, R.indices, R.data, rows, X, xb, Y, yb, float(self.global_bias_),
                          *self._penalties(), _n_chunks(len(rows)))

    def _penalties(self) -> tuple[float, float, bool, float, float]:
        """The row solves' penalties: factors, bias, whether both scale with the row's count, and the per-row
        priors on factors and bias (factor penalties on the rating scale the defaults were tuned on)."""
        return (float(self.reg * self.rating_scale_), float(self.bias_reg), bool(self.weighted_reg),
                float(self.prior_reg * self.rating_scale_), float(self.damping))

    def _partial_fit(self, new: Interactions) -> None:
        R = merge_csr(self.ratings_, new.csr("rating").astype(np.float32), "replace")
        self.ratings_ = R
        Rt = R.T.tocsr()
        Rt.sort_indices()
        X = np.array(self.user_factors_, dtype=np.float32)
        Y = np.array(self.item_factors_, dtype=np.float32)
        bu = np.array(self.user_bias_, dtype=np.float32)
        bi = np.array(self.item_bias_, dtype=np.float32)
        with thread_limits(self.num_threads):
            self._half(R, X, bu, Y, bi, np.unique(new.users))
            self._half(Rt, Y, bi, X, bu, np.unique(new.items))
        self.user_factors_, self.item_factors_, self.user_bias_, self.item_bias_ = X, Y, bu, bi
        # Ratings outside the old range widen it, as a refit would.
        self.rating_min_ = min(self.rating_min_, float(new.ratings.min()))
        self.rating_max_ = max(self.rating_max_, float(new.ratings.max()))

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), **csr_to_state("ratings", self.ratings_, "_")}

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        shape = (self.user_factors_.shape[0], self.item_factors_.shape[0])
        self.ratings_ = csr_from_state("ratings", state, shape, "_")
