"""BERT4Rec: a bidirectional transformer trained to recover masked items (Sun et al., CIKM 2019)."""

from __future__ import annotations

from typing import ClassVar

import torch

from recforge.core.params import Choice, Constraint, Integer, Real, store_params
from recforge.models.registry import register
from recforge.models.sequential.base import SEQUENCE_CONSTRAINTS, SequentialRecommender, token_log_q
from recforge.models.sequential.sasrec import SASRecNet
from recforge.neural.losses import LOSSES, next_item_loss


class BERT4RecNet(SASRecNet):
    """SASRec's embeddings and layers without the causal mask; a mask token marks what to predict."""

    def __init__(self, n_items: int, dim: int, max_len: int, n_layers: int, n_heads: int, dropout: float,
                 mask_prob: float, loss: str, n_negatives: int, log_q: torch.Tensor) -> None:
        super().__init__(n_items, dim, max_len, n_layers, n_heads, dropout, loss, n_negatives, log_q, causal=False)
        self.mask_token = n_items + 2
        self.mask_prob = mask_prob

    def encode_last(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Append the mask token after each history and read the prediction at its place.
        rows = torch.arange(len(lengths), device=tokens.device)
        ext = torch.cat([tokens, tokens.new_zeros(len(lengths), 1)], dim=1)
        ext[rows, lengths] = self.mask_token
        return self.hidden(ext, lengths + 1)[rows, lengths]

    @property
    def has_graph_loss(self) -> bool:
        """Never: the masked positions are drawn anew for every batch, so their number changes."""
        return False

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seq = batch["seq"]
        real = seq > 0
        lengths = real.sum(1)
        masked = (torch.rand(seq.shape, device=seq.device) < self.mask_prob) & real
        # Every window also predicts its last event, the task inference asks for.
        rows = torch.arange(len(seq), device=seq.device)
        masked[rows, lengths - 1] |= torch.rand(len(seq), device=seq.device) < 0.5
        none = ~masked.any(1)
        masked[rows[none], lengths[none] - 1] = True
        targets = seq[masked]
        inputs = seq.masked_fill(masked, self.mask_token)
        h = self.hidden(inputs, lengths)[masked]
        keep = targets <= self.n_items  # an out-of-vocabulary item is never a target
        return next_item_loss(self.loss_name, h[keep], targets[keep], self.item_emb.weight[: self.n_items + 1],
                              self.n_negatives, self.log_q)


@register("bert4rec")
class BERT4Rec(SequentialRecommender):
    """BERT4Rec next-item model: ``mask_prob`` of each window's events are replaced by a mask token and
    recovered from both sides; the last event is masked in half of the windows so training matches inference
    (predict what follows the history). ``loss`` as in :class:`SASRec` (full softmax by default)."""

    param_constraints: ClassVar[dict[str, Constraint]] = {
        **SEQUENCE_CONSTRAINTS,
        "n_layers": Integer(1),
        "n_heads": Integer(1),
        "mask_prob": Real(0, 1.0, strict=True),
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
        mask_prob: float = 0.2,
        loss: str = "softmax",
        n_negatives: int = 256,
        epochs: int = 200,
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

    def _window_len(self) -> int:
        return self.max_len - 1  # windows of max_len tokens; no shifted target

    def _history_len(self) -> int:
        return self.max_len - 1  # room for the appended mask token

    def _build_net(self, n_items: int) -> BERT4RecNet:
        log_q = token_log_q(getattr(self, "item_counts_", None), n_items)
        return BERT4RecNet(n_items, self.n_factors, self.max_len, self.n_layers, self.n_heads, self.dropout,
                           self.mask_prob, self.loss, self.n_negatives, log_q)
