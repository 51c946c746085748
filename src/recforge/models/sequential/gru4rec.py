"""GRU4Rec-style session model: a GRU over the item sequence with cross-entropy over the catalogue at every
position ("Improved Recurrent Neural Networks for Session-based Recommendations", Tan et al., DLRS 2016)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from recforge.core.params import Constraint, Integer, store_params
from recforge.models.registry import register
from recforge.models.sequential.base import (
    SEQUENCE_CONSTRAINTS,
    SequenceNet,
    SequentialRecommender,
)
from recforge.neural.sequences import n_tokens


class GRUNet(SequenceNet):
    """Embedding → dropout → GRU → an output layer over the catalogue (own weights and biases)."""

    def __init__(self, n_items: int, dim: int, hidden: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_tokens(n_items), dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, hidden, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0)
        self.out = nn.Linear(hidden, n_items)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        # Right padding keeps every real step's state independent of the padding after it: no packing needed.
        x = self.drop(self.item_emb(tokens))
        # Under autocast cuDNN's GRU runs in float16 whatever type autocast asks for (bfloat16 too), and without a
        # loss scaler float16 loses the small gradients of a mean over thousands of positions: float32 it is.
        with torch.autocast(tokens.device.type, enabled=False):
            out, _ = self.gru(x.float())
        return self.drop(out)

    def encode_last(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.hidden(tokens)
        return h[torch.arange(len(lengths), device=h.device), lengths - 1]

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.out.weight, self.out.bias

    def position_states(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.hidden(inputs)

    @property
    def has_graph_loss(self) -> bool:
        """Not with dropout between GRU layers: cuDNN keeps that dropout's random state apart from torch's
        generator, so a graph's replays would not follow the epochs' seeds."""
        return self.gru.dropout == 0


@register("gru4rec")
class GRU4Rec(SequentialRecommender):
    """GRU next-item model trained with full cross-entropy at every position.

    Defaults: 128-dim embeddings and GRU state, one layer (the paper found more layers add little), dropout
    0.1, Adam lr 1e-3; see :class:`SequentialRecommender` for the shared parameters.
    """

    param_constraints: ClassVar[dict[str, Constraint]] = {
        **SEQUENCE_CONSTRAINTS,
        "hidden_size": Integer(1),
        "n_layers": Integer(1),
    }

    def __init__(
        self,
        n_factors: int = 128,
        hidden_size: int = 128,
        n_layers: int = 1,
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

    def _build_net(self, n_items: int) -> GRUNet:
        return GRUNet(n_items, self.n_factors, self.hidden_size, self.n_layers, self.dropout)
