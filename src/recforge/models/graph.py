"""Random-walk graph models: RP3beta (Paudel, Christoffel, Newell & Bernstein, "Updatable, accurate, diverse, and
scalable recommendations for interactive applications", 2016)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from recforge.core.accelerator import cuda_device
from recforge.core.params import Boolean, Constraint, DeviceName, Integer, Real
from recforge.core.threads import thread_limits
from recforge.data.interactions import Interactions
from recforge.errors import DataError
from recforge.models.neighbors import VALUES, ItemItemModel, Values, item_knn_rows, l1_normalize_rows
from recforge.models.registry import register

log = logging.getLogger(__name__)


def _inv_power(v: np.ndarray, p: float) -> np.ndarray:
    """``v ** -p`` where ``v > 0``, 0 elsewhere (items or users without interactions)."""
    out = np.zeros(len(v), np.float64)
    pos = v > 0
    out[pos] = np.power(v[pos], -p)
    return out


@register("rp3beta")
class RP3beta(ItemItemModel):
    """RP3beta: item-to-item transition probabilities of a 3-step random walk on the user-item graph,
    sharpened by ``alpha`` and penalised by the popularity of the destination item (``beta``).

    With ``P_ui = x_ui / Σ_j x_uj`` (user → item) and ``P_iu = x_ui / Σ_v x_vi`` (item → user)::

        W_ij = Σ_u P_iu^alpha · P_uj^alpha / pop_j^beta        (j ≠ i; pop_j = Σ_u x_uj)

    only the ``n_neighbors`` largest ``W_ij`` of every row ``i`` are kept, optionally l1-normalised (``normalize``), and
    ``score_uj = Σ_i x_ui W_ij``. ``alpha = 1, beta = 0`` is the plain P3 random walk; ``beta > 0`` lifts the
    long tail.

    Parameters:
        alpha: exponent of the transition probabilities (> 0).
        beta: popularity penalty exponent (>= 0).
        n_neighbors: neighbours kept per item (>= 1; called ``k`` before 0.2).
        normalize: divide each item's row of kept weights by its sum.
        values: what ``X`` holds, see :func:`recforge.models.neighbors.interaction_matrix`.
        num_threads: threads for the kernel and scoring (0 = all cores); results do not depend on it.
        device: ``"auto"`` (``$RECFORGE_DEVICE``, else CUDA when present, else the CPU), ``"cpu"`` or
            ``"cuda[:N]"``: on a GPU the transition products are computed with torch (the same neighbours).

    Defaults (alpha=0.75, beta=0.6, n_neighbors=200) had the best mean validation NDCG@10 (relative to each
    dataset's best) over alpha 0.5-1, beta 0-0.6, 10-200 neighbours on leave-last-one-out splits of ML-100K and ml-latest-small
    (``benchmarks/bench_implicit.py``). On those next-item splits RP3beta trails EASE and item-kNN. Cost as
    :class:`~recforge.models.neighbors.ItemKNN`: ``Σ_u n_u²`` multiply-adds, ``O(n_items)`` memory per thread.
    """

    renamed_params: ClassVar[dict[str, str]] = {"k": "n_neighbors"}
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "alpha": {"low": 0.2, "high": 1.5},
        "beta": {"low": 0.0, "high": 1.0},
        "n_neighbors": {"low": 20, "high": 1000, "log": True, "int": True},
    }
    param_constraints: ClassVar[dict[str, Constraint]] = {
        "alpha": Real(0, strict=True),
        "beta": Real(0),
        "n_neighbors": Integer(1),
        "normalize": Boolean(),
        "values": VALUES,
        "num_threads": Integer(0),
        "device": DeviceName(),
    }

    def __init__(
        self,
        alpha: float = 0.75,
        beta: float = 0.6,
        n_neighbors: int = 200,
        normalize: bool = False,
        values: Values = "binary",
        num_threads: int = 0,
        device: str = "auto",
    ) -> None:
        self.alpha = alpha
        self.beta = beta
        self.n_neighbors = n_neighbors
        self.normalize = normalize
        self.values = values
        self.num_threads = num_threads
        self.device = device

    def _fit(self, interactions: Interactions) -> None:
        device = cuda_device(self.device)
        x = self._set_matrix(interactions)
        if (x.data < 0).any():
            raise DataError("RP3beta needs non-negative interaction values (transition probabilities)")
        user_deg = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
        item_deg = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
        # P_iu^a P_uj^a = x_ui^a x_uj^a · item_deg_i^-a · user_deg_u^-a
        xa = x.astype(np.float64)
        xa.data = np.power(xa.data, self.alpha)
        with thread_limits(self.num_threads):
            w = item_knn_rows(
                xa.T.tocsr(), xa, self.n_neighbors,
                user_weight=_inv_power(user_deg, self.alpha),
                row_scale=_inv_power(item_deg, self.alpha),
                col_scale=_inv_power(item_deg, self.beta), device=device,
            )  # fmt: skip
        self.weights_ = l1_normalize_rows(w) if self.normalize else w
