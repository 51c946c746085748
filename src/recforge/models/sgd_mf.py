"""Explicit rating models trained by stochastic gradient descent: biased MF ("FunkSVD") and Koren's SVD++.

Both predict ``μ + b_u + b_i + q_i · p̃_u`` (clamped to the training rating range); for FunkSVD ``p̃_u = p_u``,
for SVD++ ``p̃_u = p_u + |N(u)|^-½ Σ_{j∈N(u)} y_j`` over the items the user rated in training. After fitting,
SVD++ stores ``p̃_u`` as its user factors, so scoring, saving and loading are those of
:class:`~recforge.models.factors.FactorRatingModel`.

Training is serial and deterministic: every epoch visits the ratings (FunkSVD) or the users and each user's
ratings (SVD++) in an order drawn from the seeded generator of :mod:`recforge.core.rng` (stream ``epoch``). The SGD kernels are
compiled with ``fastmath`` (it lets LLVM vectorise the dot products: about 1.8x faster), so results are
identical run to run on one machine but may differ in the last bits between CPUs with different SIMD widths.
FunkSVD also trains on a GPU, in blocks of simultaneous updates (see its ``device``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import numba
import numpy as np

from recforge.core.accelerator import device_for_work
from recforge.core.params import Boolean, Constraint, DeviceName, Integer, Real, parameter_error
from recforge.core.progress import EpochProgress
from recforge.core.rng import seed_states, shuffle_in_place
from recforge.core.threads import thread_limits
from recforge.data.interactions import Interactions
from recforge.models.factors import FactorRatingModel
from recforge.models.registry import register
from recforge.models.sampling import SGD_GPU_MIN_SAMPLES

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- kernels
@numba.njit(cache=True, fastmath=True)
def _funk_epoch(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    order: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    bu: np.ndarray,
    bi: np.ndarray,
    mu: float,
    lr: float,
    reg: float,
    lr_bias: float,
    bias_reg_u: np.ndarray,
    bias_reg_i: np.ndarray,
    item_start: int,
) -> float:
    """One SGD pass over ``order``; item rows below ``item_start`` stay fixed. Returns the mean squared error.
    The penalty a visit puts on a bias is the row's (``bias_reg_u[u]`` on ``b_u``, ``bias_reg_i[i]`` on ``b_i``)."""
    k = P.shape[1]
    sse = 0.0
    for t in range(len(order)):
        n = order[t]
        u = users[n]
        i = items[n]
        pred = mu + bu[u] + bi[i]
        for f in range(k):
            pred += P[u, f] * Q[i, f]
        e = ratings[n] - pred
        sse += e * e
        bu[u] += lr_bias * (e - bias_reg_u[u] * bu[u])
        if i >= item_start:
            bi[i] += lr_bias * (e - bias_reg_i[i] * bi[i])
            for f in range(k):
                pf = P[u, f]
                qf = Q[i, f]
                P[u, f] = pf + lr * (e * qf - reg * pf)
                Q[i, f] = qf + lr * (e * pf - reg * qf)
        else:
            for f in range(k):
                P[u, f] += lr * (e * Q[i, f] - reg * P[u, f])
    return sse / max(len(order), 1)


@numba.njit(cache=True, fastmath=True)
def _svdpp_epoch(
    indptr: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    user_order: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    Y: np.ndarray,
    bu: np.ndarray,
    bi: np.ndarray,
    mu: float,
    lr: float,
    reg: float,
    lr_bias: float,
    bias_reg: float,
    implicit_reg: float,
    states: np.ndarray,
) -> float:
    """One SVD++ epoch, user by user, in O(nnz · k).

    Per-rating SGD on ``y_j`` (``y_j ← (1 - lr λ) y_j + lr e |N|^-½ q_i`` for every ``j ∈ N(u)``) maps the
    implicit sum ``z = |N|^-½ Σ y_j`` to ``(1 - lr λ) z + lr e q_i``, so ``z`` is updated per rating in O(k), and
    after the user's ``n`` ratings every ``y_j`` equals ``(1 - lr λ)^n y_j + lr |N|^-½ a`` with ``a`` the
    decayed sum of the ``e q_i``: the same result as rating-by-rating SGD over the user's ratings, applied
    once per user.
    """
    k = P.shape[1]
    keep = 1.0 - lr * implicit_reg
    z = np.zeros(k)
    acc = np.zeros(k)
    pos = np.empty(0, np.int64)
    sse = 0.0
    count = 0
    for t in range(len(user_order)):
        u = user_order[t]
        lo = indptr[u]
        hi = indptr[u + 1]
        n_u = hi - lo
        if n_u == 0:
            continue
        norm = 1.0 / np.sqrt(n_u)
        for f in range(k):
            z[f] = 0.0
            acc[f] = 0.0
        for m in range(lo, hi):
            j = items[m]
            for f in range(k):
                z[f] += Y[j, f]
        for f in range(k):
            z[f] *= norm
        if len(pos) < n_u:
            pos = np.empty(n_u, np.int64)
        for m in range(n_u):
            pos[m] = lo + m
        shuffle_in_place(pos[:n_u], states)
        for m in range(n_u):
            idx = pos[m]
            i = items[idx]
            pred = mu + bu[u] + bi[i]
            for f in range(k):
                pred += Q[i, f] * (P[u, f] + z[f])
            e = ratings[idx] - pred
            sse += e * e
            bu[u] += lr_bias * (e - bias_reg * bu[u])
            bi[i] += lr_bias * (e - bias_reg * bi[i])
            for f in range(k):
                pf = P[u, f]
                qf = Q[i, f]
                P[u, f] = pf + lr * (e * qf - reg * pf)
                Q[i, f] = qf + lr * (e * (pf + z[f]) - reg * qf)
                acc[f] = keep * acc[f] + e * qf
                z[f] = keep * z[f] + lr * e * qf
        count += n_u
        decay = keep**n_u
        for m in range(lo, hi):
            j = items[m]
            for f in range(k):
                Y[j, f] = decay * Y[j, f] + lr * norm * acc[f]
    return sse / max(count, 1)


@numba.njit(cache=True, parallel=True)
def _fold_in(
    indptr: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    rows: np.ndarray,
    Q: np.ndarray,
    bi: np.ndarray,
    offset: np.ndarray,
    mu: float,
    reg: float,
    bias_reg: float,
    damping: float,
    P: np.ndarray,
    bu: np.ndarray,
) -> None:
    """Closed-form rows ``[b_u, p_u]`` for users ``rows[r]`` with items fixed: ridge regression of
    ``r - μ - b_i - q_i · offset[r]`` on ``[1, q_i]`` over the events ``indptr[r]:indptr[r+1]``, with the
    penalty the SGD objective puts on them (``reg`` / ``bias_reg`` per rating, so times the user's event
    count, plus ``damping`` on the bias; a tiny ridge keeps the system solvable when all are zero).
    Rows are independent: in parallel."""
    k = Q.shape[1]
    for r in numba.prange(len(rows)):
        u = rows[r]
        lo = indptr[r]
        hi = indptr[r + 1]
        n = hi - lo
        if n == 0:
            continue
        A = np.zeros((k + 1, k + 1))
        b = np.zeros(k + 1)
        x = np.empty(k + 1)
        x[0] = 1.0
        for m in range(lo, hi):
            i = items[m]
            y = ratings[m] - mu - bi[i]
            for f in range(k):
                x[f + 1] = Q[i, f]
                y -= Q[i, f] * offset[r, f]
            for a in range(k + 1):
                b[a] += x[a] * y
                for c in range(k + 1):
                    A[a, c] += x[a] * x[c]
        A[0, 0] += bias_reg * n + damping + 1e-9
        for f in range(k):
            A[f + 1, f + 1] += reg * n + 1e-9
        sol = np.linalg.solve(A, b)
        bu[u] = sol[0]
        for f in range(k):
            P[u, f] = sol[f + 1]


@numba.njit(cache=True, fastmath=True, parallel=True)
def _implicit_sums(indptr: np.ndarray, items: np.ndarray, Y: np.ndarray, out: np.ndarray) -> None:
    """``out[u] = |N(u)|^-½ Σ_{j∈N(u)} Y[j]`` (zero for users without items); rows in parallel."""
    k = Y.shape[1]
    for u in numba.prange(len(indptr) - 1):
        lo = indptr[u]
        hi = indptr[u + 1]
        for f in range(k):
            out[u, f] = 0.0
        if hi == lo:
            continue
        for m in range(lo, hi):
            j = items[m]
            for f in range(k):
                out[u, f] += Y[j, f]
        norm = 1.0 / np.sqrt(hi - lo)
        for f in range(k):
            out[u, f] *= norm


# --------------------------------------------------------------------------------------------- checks
def _rating_arrays(interactions: Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The user-major CSR of ratings (repeated pairs: the latest rating) as indptr, items, float64 ratings."""
    mat = interactions.csr("rating")
    return mat.indptr.astype(np.int64), mat.indices.astype(np.int32), mat.data.astype(np.float64)


_SGD_CONSTRAINTS: dict[str, Constraint] = {
    "n_factors": Integer(1),
    "epochs": Integer(1),
    "lr": Real(0, strict=True),
    "reg": Real(0),
    "bias_reg": Real(0),
    "lr_bias": Real(0, strict=True, optional=True),
    "lr_decay": Real(0, 1.0, strict=True),
    "init_std": Real(0),
    "partial_epochs": Integer(0),
    "seed": Integer(0),
    "progress": Boolean(),
    "num_threads": Integer(0),
}


class _SGDRatingModel(FactorRatingModel):
    """Shared parts: parameter checks, initialisation, the rating scale and the bookkeeping of ``partial_fit``.

    SGD runs on ratings brought to the spread the defaults were tuned on: ``(r - μ) / s`` with μ the training
    ratings' mean and ``s = σ / 1.119`` (σ their standard deviation; 1.119 is that of ML-100K's ``u1.base``, where
    ``lr``, ``reg`` and ``init_std`` were chosen), so the defaults mean the same on any rating scale. Without it,
    on ratings spread five times wider (−10…10) every error is five times larger: the item-factor steps grow
    25-fold against the penalties and SVD++ fell behind the bias model. The fitted biases and user-side factors are
    multiplied by ``s`` afterwards, so predictions come out on the ratings' own scale; ``partial_fit`` divides them
    again for its steps."""

    supports_partial_fit = True
    #: Fitted arrays on the rating scale (multiplied by ``s`` after fitting), by users and by items; the item
    #: factors stay as learned.
    _scaled_users: ClassVar[tuple[str, ...]] = ("user_factors_", "user_bias_")
    _scaled_items: ClassVar[tuple[str, ...]] = ("item_bias_",)

    #: The penalty on a row's bias whatever its count (FunkSVD's parameter; SVD++ has none).
    damping: float = 0.0

    def _check_learning_rate(self) -> None:
        largest = max(self.reg, self.bias_reg + self.damping)
        if self.lr * largest >= 1:
            raise parameter_error(self, "lr", f"times the largest penalty of one step ({largest:g}) = "
                                  f"{self.lr * largest:g} must be below 1 (lower lr)", self.lr)

    def _bias_penalties(self, user_counts: np.ndarray, item_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-visit penalties on user and item biases: ``bias_reg`` plus the row's ``damping`` spread over its
        ratings, so that one pass puts ``bias_reg·n + damping`` on the bias of a row with ``n`` ratings."""
        def per_visit(counts: np.ndarray) -> np.ndarray:
            return self.bias_reg + self.damping / np.maximum(counts, 1).astype(np.float64)

        return per_visit(user_counts), per_visit(item_counts)

    def _init_factors(self, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        rng = np.random.default_rng(self.seed)
        P = rng.normal(0.0, self.init_std, (n_users, self.n_factors))
        Q = rng.normal(0.0, self.init_std, (n_items, self.n_factors))
        return P, Q, rng

    def _standardise(self, ratings: np.ndarray) -> tuple[float, np.ndarray]:
        """The training ratings' mean (stored as the global bias) and the ratings centred and scaled by ``s``."""
        mu = float(ratings.mean())
        return mu, (ratings - mu) / self.rating_scale_

    def _rescale(self, factor: float) -> None:
        for name in (*self._scaled_users, *self._scaled_items):
            setattr(self, name, np.ascontiguousarray(getattr(self, name) * factor, dtype=np.float32))

    @contextlib.contextmanager
    def _unit_scale(self, new: Interactions) -> Iterator[Interactions]:
        """Run a ``partial_fit`` on the scale SGD learned on: the new events centred and scaled, the global bias 0
        and the scaled arrays divided by ``s`` meanwhile; back on the rating scale afterwards (also on an error),
        the rows of users and items without new events exactly as they were."""
        assert new.ratings is not None
        mu, scale = float(self.global_bias_), float(self.rating_scale_)
        before = {name: getattr(self, name) for name in (*self._scaled_users, *self._scaled_items)}
        self._rescale(1.0 / scale)
        self.global_bias_ = 0.0
        unit = Interactions(new.users, new.items, new.user_map, new.item_map,
                            ((new.ratings.astype(np.float64) - mu) / scale).astype(np.float32), new.timestamps,
                            new.weights)
        try:
            yield unit
        finally:
            self.global_bias_ = mu
            self._rescale(scale)
            for names, touched in ((self._scaled_users, new.users), (self._scaled_items, new.items)):
                for name in names:  # x / s * s is not always x in float32: untouched rows keep their bits
                    keep = np.ones(len(before[name]), bool)
                    keep[touched[touched < len(keep)]] = False
                    getattr(self, name)[: len(keep)][keep] = before[name][keep]

    @property
    def _lr_bias(self) -> float:
        return float(self.lr if self.lr_bias is None else self.lr_bias)

    def _grow(self, n_new_users: int, n_new_items: int) -> None:
        # Items known before the update keep their rows fixed in ``_partial_fit``: they were learned from many
        # ratings, and a handful of new events would mostly add noise to them.
        self._n_users_before = self.user_factors_.shape[0]
        self._n_items_before = self.item_factors_.shape[0]
        super()._grow(n_new_users, n_new_items)

    def _fold_in_new_users(
        self,
        new: Interactions,
        P: np.ndarray,
        Q: np.ndarray,
        bu: np.ndarray,
        bi: np.ndarray,
        offset: np.ndarray | None,
    ) -> None:
        """Solve the rows of users added by this update in closed form against the (fixed) item rows.

        ``offset``: per-user vectors added to ``p_u`` in the prediction (SVD++'s implicit term), or None.
        """
        assert new.ratings is not None
        pick = np.flatnonzero(new.users >= getattr(self, "_n_users_before", P.shape[0]))
        if len(pick) == 0:
            return
        pick = pick[np.argsort(new.users[pick], kind="stable")]
        rows, counts = np.unique(new.users[pick], return_counts=True)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        off = np.zeros((len(rows), P.shape[1])) if offset is None else np.ascontiguousarray(offset[rows])
        with thread_limits(self.num_threads):
            _fold_in(
                indptr, new.items[pick], new.ratings[pick].astype(np.float64), rows.astype(np.int64), Q, bi, off,
                float(self.global_bias_), float(self.reg), float(self.bias_reg), float(self.damping), P, bu,
            )

    def _sgd_new_events(
        self, new: Interactions, P: np.ndarray, Q: np.ndarray, bu: np.ndarray, bi: np.ndarray
    ) -> None:
        """``partial_epochs`` SGD passes over the new events; rows of items known before stay fixed."""
        assert new.ratings is not None
        ratings = new.ratings.astype(np.float64)
        order = np.arange(len(new), dtype=np.int64)
        item_start = int(getattr(self, "_n_items_before", 0))
        bias_reg_u, bias_reg_i = self._bias_penalties(np.bincount(new.users, minlength=len(P)),
                                                      np.bincount(new.items, minlength=len(Q)))
        for epoch in range(self.partial_epochs):
            shuffle_in_place(order, seed_states(self.seed, 10**6 + epoch, 1))
            _funk_epoch(
                new.users, new.items, ratings, order, P, Q, bu, bi, float(self.global_bias_),
                float(self.lr), self.reg, self._lr_bias, bias_reg_u, bias_reg_i, item_start,
            )


@register("funksvd")
class FunkSVD(_SGDRatingModel):
    """Biased matrix factorisation by SGD: ``r̂_ui = μ + b_u + b_i + p_u · q_i``, clamped to the rating range.

    Minimises ``Σ (r_ui - r̂_ui)² + reg (|p_u|² + |q_i|²) + bias_reg (b_u² + b_i²)`` (the penalty applied at
    every visit of a rating, as in Funk's and Surprise's SGD) with ``epochs`` passes over the ratings in a
    seeded random order; the learning rate is multiplied by ``lr_decay`` after every epoch. Factors start
    ``N(0, init_std²)``, biases at zero. ``recommend`` ranks items by predicted rating.

    ``partial_fit`` learns from the new events only: users new to the model first get ``b_u``, ``p_u`` in closed
    form (ridge regression of their ratings on the fixed item rows, with the penalty the SGD objective puts
    on them), then ``partial_epochs`` SGD passes over the new events move the users' rows and the rows of
    items new to the model, while the rows of items the model already knew stay fixed (learned from many
    ratings, a handful of new events would mostly add noise) — so a new user is folded in against the
    learned item space.

    ``lr_bias`` (default: ``lr``) is the learning rate of the biases. SGD epochs are serial (repeatable); ``num_threads``
    (0 = all cores) runs the closed-form fold-in of new users in ``partial_fit`` in parallel.

    ``device``: ``"cuda"`` trains on a GPU with torch, and ``"auto"`` does when one is present and an epoch holds
    5 million ratings or more (below it launching the GPU's blocks costs more than they save, as for BPR): the
    ratings in blocks of simultaneous updates with the CPU kernel's per-rating rule
    (:func:`recforge.neural.block_sgd.funk_epoch_torch`), in another random order than the CPU's; runs repeat bit for
    bit only with ``deterministic=True`` (fixed-order sums, slower).

    Defaults were tuned on a validation split carved from ML-100K ``u1.base`` only (a seeded random 10% of
    its rows held out, the model fitted on the other 90%; the test files were never used), in successive
    grids: lr {0.005, 0.01} x reg {0.02, 0.05, 0.1} x epochs {20, 50, 100}; lr {0.005, 0.01} x reg {0.08,
    0.12, 0.16, 0.2} x epochs {60, 120, 200}; reg {0.1, 0.12, 0.14} x bias_reg {0.005, 0.02, 0.05} x
    n_factors {20, 50, 100, 200}; init_std {0.05, 0.1} x lr_decay {1, 0.97} x epochs {40, 80} x n_factors
    {100, 300}; init_std {0.02, 0.05} x epochs {30, 45, 60} x lr {0.007, 0.01, 0.015} x reg {0.08, 0.1};
    init_std {0.005, 0.01, 0.02} x epochs {60, 90} x lr {0.005, 0.007} x reg {0.06, 0.07, 0.08}. Chosen
    (validation RMSE 0.9022, two seeds within 0.0001): 100 factors, 60 epochs, lr 0.007, reg 0.06, bias_reg
    0.05, init_std 0.005, no decay. Higher reg and small initial factors mattered most; beyond 100 factors the
    gain was under 0.001 for 2-3x the time; lr decay did not help.

    ``damping`` puts a penalty on every bias whatever its row's count (spread over the row's ratings in each
    pass), as if each user and item had that many more ratings at the mean: without it a user or item with one
    or two ratings got a bias fitted almost exactly, and on sparse data FunkSVD fell behind the bias model.
    Chosen on the validation carves (a random 10% of a random 90%) of ML-100K ``u1.base``, ml-latest-small and the
    synthetic generator at density 0.08% (6,000 users, 60,000 ratings) over {0, 1, 3, 5, 10}: 5 gives validation
    RMSE 0.9230 / 0.8551 / 0.9141 against 0.9228 / 0.8578 / 0.9376 without (the bias model: 0.9478 / 0.8787 /
    0.9300). A per-row penalty on the factors as well (BiasedALS's ``prior_reg``) made every one worse.
    """

    def __init__(
        self,
        n_factors: int = 100,
        epochs: int = 60,
        lr: float = 0.007,
        reg: float = 0.06,
        bias_reg: float = 0.05,
        damping: float = 5.0,
        lr_bias: float | None = None,
        lr_decay: float = 1.0,
        init_std: float = 0.005,
        partial_epochs: int = 30,
        seed: int = 0,
        progress: bool = True,
        num_threads: int = 0,
        device: str = "auto",
        deterministic: bool = False,
    ) -> None:
        self.n_factors = n_factors
        self.epochs = epochs
        self.lr = lr
        self.reg = reg
        self.bias_reg = bias_reg
        self.damping = damping
        self.lr_bias = lr_bias
        self.lr_decay = lr_decay
        self.init_std = init_std
        self.partial_epochs = partial_epochs
        self.seed = seed
        self.progress = progress
        self.num_threads = num_threads
        self.device = device
        self.deterministic = deterministic

    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "n_factors": {"low": 16, "high": 256, "log": True, "int": True},
        "lr": {"low": 0.001, "high": 0.03, "log": True},
        "reg": {"low": 0.005, "high": 0.3, "log": True},
    }
    param_constraints: ClassVar[dict[str, Constraint]] = {**_SGD_CONSTRAINTS, "damping": Real(0), "device": DeviceName(),
                                                          "deterministic": Boolean()}

    def _fit(self, interactions: Interactions) -> None:
        self._check_learning_rate()
        self._fit_rating_range(interactions)
        indptr, items, ratings = _rating_arrays(interactions)
        users = np.repeat(np.arange(interactions.n_users, dtype=np.int32), np.diff(indptr))
        mu, ratings = self._standardise(ratings)
        P, Q, _ = self._init_factors(interactions.n_users, interactions.n_items)
        bu = np.zeros(interactions.n_users)
        bi = np.zeros(interactions.n_items)
        bias_reg_u, bias_reg_i = self._bias_penalties(np.diff(indptr), np.bincount(items, minlength=interactions.n_items))
        bar = EpochProgress(self.epochs, "FunkSVD", enabled=self.progress)
        device = device_for_work(self.device, len(ratings), SGD_GPU_MIN_SAMPLES)
        if device is not None:
            self._epochs_on_device((users, items, ratings), (P, Q, bu, bi), (bias_reg_u, bias_reg_i), bar, device)
        else:
            order = np.arange(len(ratings), dtype=np.int64)
            lr, lr_b = float(self.lr), self._lr_bias
            for epoch in bar:
                shuffle_in_place(order, seed_states(self.seed, epoch, 1))
                bar.log(_funk_epoch(users, items, ratings, order, P, Q, bu, bi, 0.0, lr, self.reg, lr_b, bias_reg_u,
                                    bias_reg_i, 0))
                lr *= self.lr_decay
                lr_b *= self.lr_decay
        self.loss_history_ = bar.history
        self.global_bias_ = mu
        self.user_factors_ = np.ascontiguousarray(P, dtype=np.float32)
        self.item_factors_ = np.ascontiguousarray(Q, dtype=np.float32)
        self.user_bias_ = bu.astype(np.float32)
        self.item_bias_ = bi.astype(np.float32)
        self._rescale(self.rating_scale_)

    def _epochs_on_device(self, data: tuple[np.ndarray, ...], params: tuple[np.ndarray, ...],
                          bias_reg: tuple[np.ndarray, np.ndarray], bar: EpochProgress, device: Any) -> None:
        """:meth:`_fit`'s epochs with torch (:func:`recforge.neural.block_sgd.funk_epoch_torch`: blocks of
        simultaneous updates) on ``data`` = (users, items, centred ratings); ``params`` = (P, Q, user bias, item
        bias) are copied there once and back at the end."""
        # torch is imported only when a GPU trains (see recforge.core.accelerator)
        import torch

        from recforge.core.device import deterministic_algorithms
        from recforge.neural.block_sgd import funk_epoch_torch

        generator = torch.Generator(device=device)
        generator.manual_seed(int(self.seed))
        users, items = (torch.from_numpy(a.astype(np.int64)).to(device) for a in data[:2])
        ratings = torch.from_numpy(data[2]).to(device)
        tensors = tuple(torch.from_numpy(a).to(device) for a in params)
        penalties = tuple(torch.from_numpy(a).to(device) for a in bias_reg)
        lr, lr_b = float(self.lr), self._lr_bias
        with deterministic_algorithms(self.deterministic):
            for _ in bar:
                bar.log(funk_epoch_torch(users, items, ratings, generator, tensors, lr=lr, reg=float(self.reg),
                                         lr_bias=lr_b, bias_reg=penalties))
                lr *= self.lr_decay
                lr_b *= self.lr_decay
        for array, tensor in zip(params, tensors):
            array[:] = tensor.cpu().numpy()

    def _partial_fit(self, new: Interactions) -> None:
        with self._unit_scale(new) as unit:
            self._partial_fit_unit(unit)

    def _partial_fit_unit(self, new: Interactions) -> None:
        P = self.user_factors_.astype(np.float64)
        Q = self.item_factors_.astype(np.float64)
        bu = self.user_bias_.astype(np.float64)
        bi = self.item_bias_.astype(np.float64)
        self._fold_in_new_users(new, P, Q, bu, bi, None)
        self._sgd_new_events(new, P, Q, bu, bi)
        self.user_factors_ = np.ascontiguousarray(P, dtype=np.float32)
        self.item_factors_ = np.ascontiguousarray(Q, dtype=np.float32)
        self.user_bias_ = bu.astype(np.float32)
        self.item_bias_ = bi.astype(np.float32)


@register("svdpp")
class SVDpp(_SGDRatingModel):
    """Koren's SVD++: ``r̂_ui = μ + b_u + b_i + q_i · (p_u + |N(u)|^-½ Σ_{j∈N(u)} y_j)``, clamped to the range.

    ``N(u)`` is the set of items the user rated in the training data (implicit feedback: *that* they rated
    them). Trained by SGD user by user: the implicit sum is computed once per user visit, updated in O(k) after
    each of the user's ratings, and the accumulated gradient of the ``y_j`` applied once per visit, so an epoch
    costs O(nnz · k) instead of the O(Σ|N(u)|² · k) of rating-by-rating SVD++. Users are visited in a seeded
    random order and each user's ratings shuffled.

    ``partial_fit``: the implicit sums are recomputed from the grown seen-item pattern; users new to the model
    get ``b_u``, ``p_u`` in closed form (ridge regression against the fixed item rows, their implicit term
    included), then ``partial_epochs`` SGD passes over the new events move the users' ``p_u``, ``b_u`` and the
    rows of items new to the model (the ``y_j`` stay). Parameter checks as for :class:`FunkSVD`, plus
    ``implicit_reg`` >= 0.

    Defaults were tuned like FunkSVD's, on a seeded random 10% of ML-100K ``u1.base`` (never the test files):
    reg {0.05, 0.1} x implicit_reg {0.02, 0.1, 0.3} x epochs {30, 60} x lr {0.005, 0.01}; reg {0.03, 0.05,
    0.07} x implicit_reg {0, 0.005, 0.01, 0.02} x epochs {20, 30, 45}; n_factors {20, 50, 100, 200} x lr
    {0.005, 0.007, 0.01} x epochs {20, 30, 45}; bias_reg {0.01, 0.05, 0.1} x init_std {0.005, 0.01, 0.03} x
    reg {0.06, 0.08, 0.1} x implicit_reg {0.003, 0.005}. Chosen: 50 factors, 30 epochs, lr 0.01, reg 0.07,
    bias_reg 0.05, implicit_reg 0.005, init_std 0.01 (validation RMSE 0.8938; the last grid was flat within
    0.001). 100 / 200 factors reached 0.8932 / 0.8915 at 2x / 4x the time; 50 keeps the fit far inside the
    speed target (a tenth of Surprise's SVD++ time); :class:`~recforge.models.blend.Blend` uses 200.
    """

    state_shapes: ClassVar[dict[str, tuple[Any, ...]]] = {
        **FactorRatingModel.state_shapes, "user_explicit": ("users", "factors"), "item_implicit": ("items", "factors"),
    }

    def __init__(
        self,
        n_factors: int = 50,
        epochs: int = 30,
        lr: float = 0.01,
        reg: float = 0.07,
        bias_reg: float = 0.05,
        implicit_reg: float = 0.005,
        lr_bias: float | None = None,
        lr_decay: float = 1.0,
        init_std: float = 0.01,
        partial_epochs: int = 30,
        seed: int = 0,
        progress: bool = True,
        num_threads: int = 0,
    ) -> None:
        self.n_factors = n_factors
        self.epochs = epochs
        self.lr = lr
        self.reg = reg
        self.bias_reg = bias_reg
        self.implicit_reg = implicit_reg
        self.lr_bias = lr_bias
        self.lr_decay = lr_decay
        self.init_std = init_std
        self.partial_epochs = partial_epochs
        self.seed = seed
        self.progress = progress
        self.num_threads = num_threads

    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "n_factors": {"low": 10, "high": 200, "log": True, "int": True},
        "lr": {"low": 0.001, "high": 0.03, "log": True},
        "reg": {"low": 0.005, "high": 0.3, "log": True},
    }
    param_constraints: ClassVar[dict[str, Constraint]] = {**_SGD_CONSTRAINTS, "implicit_reg": Real(0)}
    _scaled_users: ClassVar[tuple[str, ...]] = (*_SGDRatingModel._scaled_users, "user_explicit_")
    _scaled_items: ClassVar[tuple[str, ...]] = (*_SGDRatingModel._scaled_items, "item_implicit_")

    def _fit(self, interactions: Interactions) -> None:
        self._check_learning_rate()
        self._fit_rating_range(interactions)
        indptr, items, ratings = _rating_arrays(interactions)
        mu, ratings = self._standardise(ratings)
        P, Q, rng = self._init_factors(interactions.n_users, interactions.n_items)
        Y = rng.normal(0.0, self.init_std, (interactions.n_items, self.n_factors))
        bu = np.zeros(interactions.n_users)
        bi = np.zeros(interactions.n_items)
        user_order = np.flatnonzero(np.diff(indptr) > 0).astype(np.int64)
        lr, lr_b = float(self.lr), self._lr_bias
        bar = EpochProgress(self.epochs, "SVD++", enabled=self.progress)
        for epoch in bar:
            states = seed_states(self.seed, epoch, 1)
            shuffle_in_place(user_order, states)
            loss = _svdpp_epoch(
                indptr, items, ratings, user_order, P, Q, Y, bu, bi, 0.0, lr, self.reg, lr_b, self.bias_reg,
                self.implicit_reg, states,
            )
            bar.log(loss)
            lr *= self.lr_decay
            lr_b *= self.lr_decay
        self.loss_history_ = bar.history
        Z = np.empty_like(P)
        with thread_limits(self.num_threads):
            _implicit_sums(indptr, items, Y, Z)
        self.global_bias_ = mu
        self.user_explicit_ = np.ascontiguousarray(P, dtype=np.float32)
        self.item_implicit_ = np.ascontiguousarray(Y, dtype=np.float32)
        self.user_factors_ = np.ascontiguousarray(P + Z, dtype=np.float32)
        self.item_factors_ = np.ascontiguousarray(Q, dtype=np.float32)
        self.user_bias_ = bu.astype(np.float32)
        self.item_bias_ = bi.astype(np.float32)
        self._rescale(self.rating_scale_)

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "user_explicit": self.user_explicit_, "item_implicit": self.item_implicit_}

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.user_explicit_ = state["user_explicit"]
        self.item_implicit_ = state["item_implicit"]

    def _grow(self, n_new_users: int, n_new_items: int) -> None:
        super()._grow(n_new_users, n_new_items)
        k = self.item_factors_.shape[1]
        # A new user's explicit part starts where _grow put its factors; its implicit part is added below.
        self.user_explicit_ = np.ascontiguousarray(
            np.vstack([self.user_explicit_, self.user_factors_[self.user_factors_.shape[0] - n_new_users :]])
        )
        self.item_implicit_ = np.ascontiguousarray(np.vstack([self.item_implicit_, np.zeros((n_new_items, k), np.float32)]))

    def _partial_fit(self, new: Interactions) -> None:
        with self._unit_scale(new) as unit:
            self._partial_fit_unit(unit)

    def _partial_fit_unit(self, new: Interactions) -> None:
        assert new.ratings is not None
        # Only users with new events change; the implicit sums of the others are left exactly as they were.
        touched = np.unique(new.users)
        sub = self.seen_[touched]
        Y = self.item_implicit_.astype(np.float64)
        Z = np.zeros((self.n_users_, Y.shape[1]))
        z_touched = np.zeros((len(touched), Y.shape[1]))
        with thread_limits(self.num_threads):
            _implicit_sums(sub.indptr.astype(np.int64), sub.indices.astype(np.int32), Y, z_touched)
        Z[touched] = z_touched
        P = self.user_explicit_.astype(np.float64)
        Q = self.item_factors_.astype(np.float64)
        bu = self.user_bias_.astype(np.float64)
        bi = self.item_bias_.astype(np.float64)
        self._fold_in_new_users(new, P, Q, bu, bi, Z)
        # FunkSVD steps on the effective vector p_u + z_u keep the implicit part z_u fixed.
        eff = self.user_factors_.astype(np.float64)
        eff[touched] = P[touched] + z_touched
        self._sgd_new_events(new, eff, Q, bu, bi)
        explicit = self.user_explicit_.copy()
        explicit[touched] = eff[touched] - z_touched
        self.user_explicit_ = explicit
        self.user_factors_ = np.ascontiguousarray(eff, dtype=np.float32)
        self.item_factors_ = np.ascontiguousarray(Q, dtype=np.float32)
        self.user_bias_ = bu.astype(np.float32)
        self.item_bias_ = bi.astype(np.float32)
