"""Building blocks shared by the transformer models (SASRec, BERT4Rec)."""

from __future__ import annotations

import torch
from torch import nn


class TransformerStack(nn.Module):
    """Pre-norm transformer encoder layers (torch's own) plus a final LayerNorm.

    ``causal=True`` lets position t attend to positions <= t only. Sequences are right-padded (real events
    first), so under a causal mask a real position never sees padding and no key mask is needed; bidirectional
    stacks get a key-padding mask instead.
    """

    def __init__(self, dim: int, n_layers: int, n_heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, n_heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (batch, length, dim); ``padding``: (batch, length) True at padded positions."""
        length = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype) if self.causal else None
        for layer in self.layers:
            if self.causal:
                x = layer(x, src_mask=mask, is_causal=True)
            else:
                x = layer(x, src_key_padding_mask=padding)
        return self.norm(x)


def truncated_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """Weights ~ N(0, std²) truncated at ±2 std, biases 0, LayerNorm weights 1 (the SASRec/BERT recipe)."""
    for name, param in module.named_parameters():
        if "norm" in name and name.endswith("weight"):
            nn.init.ones_(param)
        elif name.endswith("bias"):
            nn.init.zeros_(param)
        elif param.dim() >= 1:
            nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std)


def reverse_positions(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Position ids counted from each sequence's last real event (0) backwards; padding gets 0.

    Counting from the end gives the position that predicts the next item the same embedding in every sequence,
    whatever its length.
    """
    t = torch.arange(width, device=lengths.device).unsqueeze(0)
    return (lengths.unsqueeze(1) - 1 - t).clamp(min=0)
