"""A continuous-bag-of-words baseline: the next item is predicted from the mean embedding of the last items."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from recforge.core.params import Constraint, Integer, store_params
from recforge.models.registry import register
from recforge.models.sequential.base import (
    SEQUENCE_CONSTRAINTS,
    SequenceNet,
    SequentialRecommender,
)
from recforge.neural.sequences import n_tokens


def window_sums(x: torch.Tensor, window: int, banded: bool = False) -> torch.Tensor:
    """Along dimension 1 of ``x`` (batch × positions × features), the sum of each position's last ``window`` rows,
    its own included (all of them up to it when ``window`` is 0).

    By differences of cumulative sums, or with ``banded`` as one product with a 0/1 band matrix, in float32 (the
    same sums, up to rounding, from kernels that add in a fixed order)."""
    n = x.shape[1]
    if banded:
        lag = torch.arange(n, device=x.device)
        lag = lag[:, None] - lag[None, :]
        band = (lag >= 0) & (lag < window) if window else lag >= 0
        with torch.autocast(x.device.type, enabled=False):
            return torch.matmul(band.float(), x.float())
    total = torch.cumsum(x, dim=1)
    if window and window < n:
        total = total - F.pad(total, (0, 0, window, 0))[:, :n]
    return total


def sums_in_fixed_order(device: torch.device, deterministic: bool) -> bool:
    """Whether :func:`window_sums` must add by the banded product on ``device``: on CUDA when the model was asked
    to be ``deterministic`` (in training and in scoring after it) or deterministic algorithms are on, because
    CUDA's float cumsum has no deterministic kernel (``torch.use_deterministic_algorithms`` lists it)."""
    return device.type == "cuda" and (deterministic or torch.are_deterministic_algorithms_enabled())


class PoolingNet(SequenceNet):
    """Mean of the last ``window`` input embeddings (all earlier ones when 0) → linear layer → dot product with
    output item embeddings plus an item bias; ``deterministic``: windows summed in a fixed order on CUDA."""

    def __init__(self, n_items: int, dim: int, window: int, dropout: float, deterministic: bool = False) -> None:
        super().__init__()
        self.n_items = n_items
        self.window = window
        self.deterministic = deterministic
        self.item_emb = nn.Embedding(n_tokens(n_items), dim, padding_idx=0)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.out_emb = nn.Embedding(n_items, dim)
        self.out_bias = nn.Parameter(torch.zeros(n_items))
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.out_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Causal windowed mean at every position, from windowed sums (:func:`window_sums`; no loop over positions)."""
        emb = self.item_emb(tokens)
        total = window_sums(emb, self.window, sums_in_fixed_order(tokens.device, self.deterministic))
        count = window_sums((tokens > 0).to(torch.int32).unsqueeze(-1), self.window)  # integers: exact either way
        return self.drop(self.proj(total / count.clamp(min=1)))

    def encode_last(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.hidden(tokens)
        return h[torch.arange(len(lengths), device=h.device), lengths - 1]

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.out_emb.weight, self.out_bias

    def position_states(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.hidden(inputs)


@register("pooling")
class Pooling(SequentialRecommender):
    """Order-free baseline over the recent history: how much do the sequential models gain from order?

    ``window``: how many of the latest items are averaged (0 = the whole history seen by the model).
    """

    param_constraints: ClassVar[dict[str, Constraint]] = {**SEQUENCE_CONSTRAINTS, "window": Integer(0)}

    def __init__(
        self,
        n_factors: int = 64,
        window: int = 20,
        max_len: int = 200,
        dropout: float = 0.1,
        epochs: int = 100,
        batch_size: int = 32,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        schedule: str = "constant",
        warmup_steps: int = 0,
        validate_every: int = 0,
        patience: int = 8,
        valid_metric: str = "ndcg@10",
        valid_exclude_seen: bool = True,
        all_windows: bool = True,
        min_item_count: int = 0,
        device: str = "auto",
        amp: bool = True,
        deterministic: bool = False,
        cuda_graphs: bool = True,
        checkpoint_dir: str | None = None,
        resume: bool = False,
        seed: int = 0,
        progress: bool = True,
        num_threads: int = 0,
    ) -> None:
        store_params(self, locals())

    def _build_net(self, n_items: int) -> PoolingNet:
        return PoolingNet(n_items, self.n_factors, self.window, self.dropout, self.deterministic)
