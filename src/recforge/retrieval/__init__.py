"""Nearest-neighbour search over item vectors: exact (BLAS, batched) and approximate (HNSW via usearch)."""

from recforge.retrieval.index import (
    ANN_MIN_ITEMS,
    ExactIndex,
    HNSWIndex,
    VectorIndex,
    all_neighbors,
    has_ann,
    make_index,
    similar_by_vectors,
)

__all__ = ["ANN_MIN_ITEMS", "ExactIndex", "HNSWIndex", "VectorIndex", "all_neighbors", "has_ann", "make_index", "similar_by_vectors"]
