"""Bayesian personalised ranking (Rendle et al., 2009): matrix factorisation with item biases trained by SGD on
(user, positive item, sampled negative item) triples."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
from numba import njit, prange

from recforge.core.accelerator import device_for_work
from recforge.core.params import Boolean, Constraint, DeviceName
from recforge.core.progress import EpochProgress
from recforge.core.threads import thread_limits
from recforge.data.interactions import Interactions
from recforge.models.factors import FactorModel
from recforge.models.registry import register
from recforge.models.sampling import (
    SAMPLED_SGD_CONSTRAINTS,
    SGD_GPU_MIN_SAMPLES,
    epoch_streams,
    negative_pool,
    positive_pairs,
    sample_negative,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- kernel
@njit(cache=True, fastmath=True, parallel=True)
def _bpr_epoch(
    users: np.ndarray,
    items: np.ndarray,
    order: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    bq: np.ndarray,
    lr: float,
    reg: float,
    pool: np.ndarray,
    states: np.ndarray,
) -> tuple[float, int]:
    """One pass over ``order`` (indices into users/items). Work splits into ``len(states)`` contiguous chunks,
    each with its own random stream; with one chunk the pass is serial and exactly repeatable, with several the
    chunks update shared factors without locks (Hogwild)."""
    n_chunks = states.shape[0]
    n = order.shape[0]
    n_items = Q.shape[0]
    k = P.shape[1]
    lr32 = np.float32(lr)
    reg32 = np.float32(reg)
    one = np.float32(1.0)
    step = (n + n_chunks - 1) // n_chunks
    losses = np.zeros(n_chunks)
    skipped = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        acc = 0.0
        for t in range(c * step, min(n, (c + 1) * step)):
            s = order[t]
            u = users[s]
            i = items[s]
            j = sample_negative(states, c, n_items, indptr, indices, u, True, pool)
            if j < 0:
                skipped[c] += 1
                continue
            # float32 throughout so the k-loops vectorise without conversions
            x = bq[i] - bq[j]
            for a in range(k):
                x += P[u, a] * (Q[i, a] - Q[j, a])
            # z = σ(-x) is the gradient weight; log(1 + e^-x) the loss, computed stably on both sides
            if x >= 0:
                e = np.exp(-x)
                z = e / (one + e)
                acc += np.log1p(e)
            else:
                e = np.exp(x)
                z = one / (one + e)
                acc += -x + np.log1p(e)
            zl = lr32 * z
            decay = one - lr32 * reg32
            for a in range(k):
                pu = P[u, a]
                qi = Q[i, a]
                qj = Q[j, a]
                P[u, a] = decay * pu + zl * (qi - qj)
                Q[i, a] = decay * qi + zl * pu
                Q[j, a] = decay * qj - zl * pu
            bq[i] = decay * bq[i] + zl
            bq[j] = decay * bq[j] - zl
        losses[c] = acc
    return losses.sum(), skipped.sum()


# ---------------------------------------------------------------------------------------------------- model
@register("bpr")
class BPR(FactorModel):
    """BPR-MF: scores ``b_i + p_u·q_i`` trained to rank each observed item above a uniformly sampled unobserved
    one, maximising ``Σ log σ(x_ui - x_uj) - reg‖θ‖²`` by SGD.

    An epoch visits every distinct (user, item) pair once in a seeded random order; each gets one negative item
    the user has not interacted with, drawn uniformly over items (``neg_sampling="uniform"``) or in proportion
    to item popularity (``"popularity"``: the item of a random interaction, as the ``implicit`` library does). The per-sample update of ``p_u``, ``q_i``,
    ``q_j``, ``b_i``, ``b_j`` uses learning rate ``lr`` and L2 ``reg`` (applied to the touched parameters).

    Threads: ``num_threads=0`` (default: all cores) or ``> 1`` runs Hogwild: chunks of each epoch update the
    shared factors in parallel without locks; faster on many cores and as accurate, but not bit-repeatable.
    ``num_threads=1`` is serial and bit-for-bit repeatable for a seed.

    ``device``: ``"auto"`` (``$RECFORGE_DEVICE``, else CUDA when present, else the CPU), ``"cpu"`` or
    ``"cuda[:N]"``: on a GPU an epoch runs in blocks of simultaneous updates with torch
    (:mod:`recforge.neural.block_sgd`; as accurate on MovieLens, bit-repeatable for a seed only with
    ``deterministic=True``, which sums each block's updates in a fixed order, more slowly).

    ``partial_fit`` runs ``partial_epochs`` SGD epochs over the new (user, item) pairs only, with fresh negatives
    (new users and items start from small random factors).

    Defaults were chosen on the leave-one-out validation event (train → valid) of ML-100K and ml-latest-small,
    NDCG@10, 64 factors: grid lr ∈ {0.01, 0.02, 0.05, 0.1} × reg ∈ {0.001, 0.003, 0.01, 0.03} × epochs ∈ {50,
    100, 200}, then init_std 0.1 and epochs 300/400 (no better), and popularity sampling with lr ∈ {0.005, 0.01,
    0.02, 0.05} × reg ∈ {0.003, 0.01, 0.03} × epochs ∈ {50, 100} (as good as uniform at 50 epochs, i.e. four
    times faster, but no better; worse averaged over 3 seeds). The former defaults (lr 0.02, reg 0.003, 200 epochs)
    had the best mean over both datasets (validation NDCG@10 0.0571 / 0.0344); per dataset the best were lr
    0.01, reg 0.01, 200 epochs (ML-100K, 0.0594) and lr 0.02, reg 0.001, 200 epochs (ml-latest-small, 0.0346).
    On data unlike MovieLens they were too weakly regularised and too slow: on the leave-one-out validation events
    of ``benchmarks/bench_regimes.py``'s regimes (ml-latest-small, ML-100K ``u1.base``, sessions, play counts,
    synthetic data at density 0.06%, five events per user) lr 0.03, reg 0.01 (now the defaults) gave NDCG@10
    0.0277 / 0.0411 / 0.0208 / 0.0911 / 0.0921 / 0.0135 against 0.0278 / 0.0392 / 0.0165 / 0.0832 / 0.0692 /
    0.0135, the best of lr ∈ {0.02, 0.03, 0.05} × reg ∈ {0.0003, 0.003, 0.005, 0.01, 0.02} tried (partly crossed)
    without losing on any regime; popularity sampling, 50 epochs and init_std 0.1 lost on most.
    """

    def __init__(
        self,
        n_factors: int = 64,
        lr: float = 0.03,
        reg: float = 0.01,
        epochs: int = 200,
        neg_sampling: Literal["uniform", "popularity"] = "uniform",
        init_std: float = 0.01,
        partial_epochs: int = 10,
        seed: int = 0,
        progress: bool = True,
        num_threads: int = 0,
        device: str = "auto",
        deterministic: bool = False,
    ) -> None:
        self.n_factors = n_factors
        self.lr = lr
        self.reg = reg
        self.epochs = epochs
        self.neg_sampling = neg_sampling
        self.init_std = init_std
        self.partial_epochs = partial_epochs
        self.seed = seed
        self.progress = progress
        self.num_threads = num_threads
        self.device = device
        self.deterministic = deterministic

    supports_partial_fit = True
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"low": 0.003, "high": 0.1, "log": True},
        "reg": {"low": 1e-05, "high": 0.03, "log": True},
        "epochs": {"low": 20, "high": 400, "log": True, "int": True},
        "neg_sampling": {"choices": ["uniform", "popularity"]},
    }
    param_constraints: ClassVar[dict[str, Constraint]] = {**SAMPLED_SGD_CONSTRAINTS, "device": DeviceName(),
                                                                  "deterministic": Boolean()}

    def _fit(self, interactions: Interactions) -> None:
        seen = self.seen_  # sorted 0/1 pattern of the training pairs
        rng = np.random.default_rng(self.seed)
        k = self.n_factors
        P = (rng.standard_normal((seen.shape[0], k)) * self.init_std).astype(np.float32)
        Q = (rng.standard_normal((seen.shape[1], k)) * self.init_std).astype(np.float32)
        bq = np.zeros(seen.shape[1], np.float32)
        self.n_updates_ = 0
        self.loss_history_ = self._run(seen, seen, P, Q, bq, self.epochs, stream=0)
        self.user_factors_, self.item_factors_, self.item_bias_ = P, Q, bq

    def _run(
        self,
        pairs: sp.csr_matrix,
        seen: sp.csr_matrix,
        P: np.ndarray,
        Q: np.ndarray,
        bq: np.ndarray,
        epochs: int,
        stream: int,
    ) -> list[float]:
        """``epochs`` SGD epochs over the entries of ``pairs``, negatives rejected against ``seen`` (``P``, ``Q``,
        ``bq`` updated in place), on a GPU when ``device`` resolves to one."""
        users, items = positive_pairs(pairs)
        pool = negative_pool(self.neg_sampling, seen)
        bar = EpochProgress(epochs, "BPR", enabled=self.progress)
        device = device_for_work(self.device, len(users), SGD_GPU_MIN_SAMPLES)
        if device is not None:
            return self._run_on_device(users, items, seen, pool, P, Q, bq, bar, stream, device)
        order = np.arange(len(users), dtype=np.int64)
        with thread_limits(self.num_threads) as n_chunks:  # one chunk per thread; one thread = serial
            for epoch in bar:
                states = epoch_streams(self.seed, stream, epoch, order, n_chunks)
                loss, skipped = _bpr_epoch(
                    users, items, order, seen.indptr, seen.indices, P, Q, bq, float(self.lr), float(self.reg),
                    pool, states,
                )
                if skipped:
                    log.debug("BPR: %d samples had no negative item left", skipped)
                bar.log(loss / max(1, len(order) - skipped))
        return bar.history

    def _run_on_device(self, users: np.ndarray, items: np.ndarray, seen: sp.csr_matrix, pool: np.ndarray,
                       P: np.ndarray, Q: np.ndarray, bq: np.ndarray, bar: EpochProgress, stream: int,
                       device: Any) -> list[float]:
        """:meth:`_run` with torch (:func:`recforge.neural.block_sgd.bpr_epoch_torch`: blocks of simultaneous
        updates); the factors are copied there once and back at the end."""
        # torch is imported only when a GPU trains (see recforge.core.accelerator)
        import torch

        from recforge.core.device import deterministic_algorithms
        from recforge.neural.block_sgd import NegativeSampler, bpr_epoch_torch

        generator = torch.Generator(device=device)
        generator.manual_seed(int(self.seed) * 1_000_003 + stream)
        sampler = NegativeSampler(seen, pool, device, generator)
        users_t, items_t = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (users, items))
        Pt, Qt, bqt = (torch.from_numpy(a).to(device) for a in (P, Q, bq))
        with deterministic_algorithms(self.deterministic):
            for _ in bar:
                loss, skipped = bpr_epoch_torch(users_t, items_t, sampler, Pt, Qt, bqt, float(self.lr),
                                                float(self.reg))
                bar.log(loss / max(1, len(users) - skipped))
        P[:], Q[:], bq[:] = Pt.cpu().numpy(), Qt.cpu().numpy(), bqt.cpu().numpy()
        return bar.history

    def _partial_fit(self, new: Interactions) -> None:
        self.n_updates_ = int(getattr(self, "n_updates_", 0)) + 1
        P = np.array(self.user_factors_, dtype=np.float32)
        Q = np.array(self.item_factors_, dtype=np.float32)
        bq = np.array(self.item_bias_, dtype=np.float32)
        self._run(new.csr("ones"), self.seen_, P, Q, bq, self.partial_epochs, stream=self.n_updates_)
        self.user_factors_, self.item_factors_, self.item_bias_ = P, Q, bq

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "n_updates": int(getattr(self, "n_updates_", 0))}

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.n_updates_ = int(state.get("n_updates", 0))
