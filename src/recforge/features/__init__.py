"""Item features: text encoders (TF-IDF, sentence-transformers) with an on-disk cache, and item feature matrices."""

from recforge.features.items import genre_matrix, item_feature_matrix, item_texts
from recforge.features.text import (
    EmbeddingCache,
    SentenceEncoder,
    TextEncoder,
    TfidfEncoder,
    make_encoder,
)

__all__ = [
    "EmbeddingCache",
    "SentenceEncoder",
    "TextEncoder",
    "TfidfEncoder",
    "genre_matrix",
    "item_feature_matrix",
    "item_texts",
    "make_encoder",
]
