"""The early-stopping validator: held-out targets ranked over the whole catalogue with the kernel, exclusions and
tie-break of the reported test metrics, so the metric a model is tuned on is the metric it is judged by.

Every model that validates while it trains (sequential models, the two-tower, ScoreBlend's weight search) builds
one :class:`RankingValidator` from its validation targets and calls it with a function that scores a block of
validation rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from recforge.core.metrics import per_user_metrics
from recforge.core.ranking import rank_rows

#: What a validator reports (at its ``k``; these names are for the default k = 10) and models may stop on.
VALIDATION_METRICS = ("ndcg@10", "hr@10", "recall@10", "map@10", "mrr")


class RankingValidator:
    """Rank every validation row's targets among all items (minus ``exclude``) and average the ranking metrics.

    ``targets``: CSR, one row per validation row (user or sample), the relevant items; rows without any are
    skipped. ``exclude``: CSR of the same shape, items not to rank (e.g. the user's history), or None. At most
    ``max_rows`` rows are kept (a seeded random subset, fixed for the whole training run) so validation stays
    cheap on large data. Calling the validator with ``score_fn(rows) -> float32 block (len(rows), n_items)``
    (``rows``: some of ``self.rows``; a numpy array or a torch tensor) returns ``{"ndcg@k", "hr@k", "recall@k",
    "map@k", "mrr"}``. With a CUDA ``device`` (where the model scores) the blocks are ranked there.
    """

    def __init__(
        self,
        targets: sp.csr_matrix,
        exclude: sp.csr_matrix | None = None,
        k: int = 10,
        max_rows: int | None = 10_000,
        seed: int = 0,
        device: torch.device | None = None,
    ) -> None:
        targets = sp.csr_matrix(targets)
        rows = np.flatnonzero(np.diff(targets.indptr) > 0)
        if max_rows is not None and len(rows) > max_rows:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
        self.rows = rows.astype(np.int64)
        self.targets = targets[self.rows]
        self.exclude = None if exclude is None else sp.csr_matrix(exclude)[self.rows]
        self.k = int(k)
        self.n_items = targets.shape[1]
        self.device = device if device is not None and device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.rows)

    def of_scores(self, scores: np.ndarray) -> dict[str, float]:
        """The metrics of a score block whose row ``r`` belongs to validation row ``self.rows[r]``."""
        return self(lambda rows: scores[np.searchsorted(self.rows, rows)])

    def __call__(self, score_fn: Callable[[np.ndarray], np.ndarray | torch.Tensor]) -> dict[str, float]:
        out = rank_rows(score_fn, self.n_items, self.rows, self.targets, self.k, self.exclude, device=self.device)
        metrics = per_user_metrics(out.hits, out.n_rel, out.first_rank, [self.k])
        names = (f"ndcg@{self.k}", f"hr@{self.k}", f"recall@{self.k}", f"map@{self.k}", "mrr")
        return {name: float(metrics[name].mean()) for name in names}
