"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), with four training losses."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from recforge.core.params import Choice, Constraint, Integer, store_params
from recforge.models.registry import register
from recforge.models.sequential.base import (
    SEQUENCE_CONSTRAINTS,
    SequenceNet,
    SequentialRecommender,
    token_log_q,
)
from recforge.neural.layers import TransformerStack, reverse_positions, truncated_normal_init
from recforge.neural.losses import LOSSES, next_item_loss
from recforge.neural.sequences import n_tokens


class SASRecNet(SequenceNet):
    """Item + learned position embeddings, a causal pre-norm transformer, dot-product scores with the item
    embeddings (shared between input and output)."""

    def __init__(self, n_items: int, dim: int, max_len: int, n_layers: int, n_heads: int, dropout: float,
                 loss: str, n_negatives: int, log_q: torch.Tensor, causal: bool = True) -> None:
        super().__init__()
        self.n_items = n_items
        self.loss_name = loss
        self.n_negatives = n_negatives
        self.item_emb = nn.Embedding(n_tokens(n_items), dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len + 1, dim)
        self.drop = nn.Dropout(dropout)
        self.encoder = TransformerStack(dim, n_layers, n_heads, dropout, causal=causal)
        self.register_buffer("log_q", log_q)
        truncated_normal_init(self)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def hidden(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder output at every position (batch × length × dim); a bidirectional encoder masks padding."""
        pos = reverse_positions(lengths, tokens.shape[1])
        x = self.drop(self.item_emb(tokens) + self.pos_emb(pos))
        return self.encoder(x, padding=tokens == 0)

    def encode_last(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.hidden(tokens, lengths)
        return h[torch.arange(len(lengths), device=h.device), lengths - 1]

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.item_emb.weight[1 : self.n_items + 1], None

    def position_states(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Positions count back from the last input that has a target: the place of a history's last event at
        # inference. Counting from the last real input instead (the window's final event, which predicts
        # nothing) shifted every window shorter than its batch's longest by one position.
        return self.hidden(inputs, lengths)

    def target_loss(self, query: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        return next_item_loss(self.loss_name, query, positives, self.item_emb.weight[: self.n_items + 1],
                              self.n_negatives, self.log_q)

    @property
    def has_graph_loss(self) -> bool:
        """The full softmax only: the sampled losses draw their negatives among the selected positions."""
        return self.loss_name == "softmax"


@register("sasrec")
class SASRec(SequentialRecommender):
    """SASRec next-item model.

    ``loss``: ``"softmax"`` (cross-entropy over the whole catalogue; best quality and coverage on MovieLens,
    as in notebook 003 and Klenitskiy & Vasilev 2023), ``"bce"`` (one uniformly sampled negative per positive, the
    original paper), ``"inbatch"`` (sampled softmax over ``n_negatives`` targets of the same batch) or ``"logq"``
    (the same with the logQ popularity correction). Architecture defaults (2 layers, 2 heads, 64 dims, dropout 0.2,
    up to 200 events) follow the paper's MovieLens settings; lr 2e-3 with batches of 32 windows was best on the
    ML-100K leave-one-out validation event among (1e-3, 2e-3, 4e-3) × (32, 64, 128) on the CPU. The same 32 on a
    GPU: batches of 128 (the GPU's default for a while, 2.8× faster an epoch on an H200 before its steps were
    replayed from CUDA graphs) matched 32 on ML-100K with lr 4e-3 (validation NDCG@10, seeds 0 / 1: 0.1133 /
    0.1190 against 0.1169 / 0.1108) but lost 30-60% on ml-latest-small (0.0404 / 0.0238 against 0.0572 / 0.0510;
    with lr 2e-3: 0.0231), whose 892 windows make 7 steps an epoch: early stopping's 8 epochs of patience are 56
    steps there, and with 32 epochs of patience (224 steps, as 8 epochs of 32) 128 reached 0.0582 (CPU,
    ``benchmarks/results/sasrec_batch_valid.json``). A larger ``batch_size`` wants a proportionally larger
    ``patience``. See the base class for the rest.
    """

    losses: ClassVar[tuple[str, ...]] = LOSSES
    param_constraints: ClassVar[dict[str, Constraint]] = {
        **SEQUENCE_CONSTRAINTS,
        "n_layers": Integer(1),
        "n_heads": Integer(1),
        "loss": Choice(*LOSSES),
        "n_negatives": Integer(1),
    }

    def __init__(
        self,
        n_factors: int = 64,
        n_layers: int = 2,
        n_heads: int = 2,
        max_len: int = 200,
        dropout: float = 0.2,
        loss: str = "softmax",
        n_negatives: int = 256,
        epochs: int = 100,
        batch_size: int | None = None,
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

    def _build_net(self, n_items: int) -> SASRecNet:
        log_q = token_log_q(getattr(self, "item_counts_", None), n_items)
        return SASRecNet(n_items, self.n_factors, self.max_len, self.n_layers, self.n_heads, self.dropout,
                         self.loss, self.n_negatives, log_q)


