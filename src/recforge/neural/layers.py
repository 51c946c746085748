"""Building blocks shared by the transformer models (SASRec, BERT4Rec)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerLayer(nn.Module):
    """A pre-norm transformer encoder layer: multi-head self-attention (torch's fused
    ``scaled_dot_product_attention``) and a GELU feed-forward block, each added back through dropout.

    Unlike ``nn.TransformerEncoderLayer`` there is no dropout on the attention probabilities: on a CPU that
    dropout costs more than the attention itself and blocks the fused kernel, and dropout on the residual
    branches regularises as well for these small models.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: bool, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask``: (batch, 1, 1, length) True where attention is allowed (bidirectional layers)."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=causal)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff2(F.gelu(self.ff1(self.norm2(x)))))


class TransformerStack(nn.Module):
    """Pre-norm transformer layers plus a final LayerNorm.

    ``causal=True`` lets position t attend to positions <= t only. Sequences are right-padded (real events
    first), so under a causal mask a real position never sees padding and no key mask is needed; bidirectional
    stacks get a key-padding mask instead.
    """

    def __init__(self, dim: int, n_layers: int, n_heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.layers = nn.ModuleList(TransformerLayer(dim, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (batch, length, dim); ``padding``: (batch, length) True at padded positions."""
        key_mask = None if self.causal or padding is None else (~padding)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, self.causal, key_mask)
        return self.norm(x)


def truncated_normal_init(module: nn.Module, std: float | None = None) -> None:
    """Weights ~ truncated normal (cut at ±2 std), biases 0, LayerNorm weights 1.

    ``std=None`` scales each weight matrix like Glorot/Xavier, std = sqrt(2 / (fan_in + fan_out)); a number uses
    that std everywhere (BERT's 0.02). The Xavier scale trains these shallow recommenders markedly faster: with
    0.02 everywhere the attention and feed-forward blocks start as near-identity maps and take many epochs to
    grow (measured on ML-100K: validation NDCG@10 after 20 epochs 0.04 vs 0.06).
    """
    for name, param in module.named_parameters():
        if "norm" in name and name.endswith("weight"):
            nn.init.ones_(param)
        elif name.endswith("bias"):
            nn.init.zeros_(param)
        elif param.dim() >= 2:
            s = std if std is not None else (2.0 / (param.shape[0] + param.shape[1])) ** 0.5
            nn.init.trunc_normal_(param, std=s, a=-2 * s, b=2 * s)
        else:
            s = std if std is not None else 0.02
            nn.init.trunc_normal_(param, std=s, a=-2 * s, b=2 * s)


def reverse_positions(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Position ids counted from each sequence's last real event (0) backwards; padding gets 0.

    Counting from the end gives the position that predicts the next item the same embedding in every sequence,
    whatever its length.
    """
    t = torch.arange(width, device=lengths.device).unsqueeze(0)
    return (lengths.unsqueeze(1) - 1 - t).clamp(min=0)
