"""Embedding matrices: unit-norm rows, so inner products are cosine similarities."""

from __future__ import annotations

import numpy as np


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as C-contiguous float32."""
    x = np.array(x, dtype=np.float32, order="C")  # a copy: callers' arrays stay untouched
    with np.errstate(under="ignore"):  # squares of tiny components underflow harmlessly
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norms, out=x, where=norms > 0)
    return x
