"""Sparse-matrix helpers for incremental updates and artifacts: grow a CSR matrix, merge new entries into it,
and store it as flat arrays.

Merging works on coordinates rather than sparse arithmetic, so explicit zero entries (a rating of 0) survive.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from recforge.errors import ArtifactError

Merge = Literal["sum", "replace", "ones"]


def pad_csr(mat: sp.csr_matrix, n_rows: int, n_cols: int) -> sp.csr_matrix:
    """The same matrix with empty rows and columns appended up to ``(n_rows, n_cols)``."""
    extra = n_rows - mat.shape[0]
    indptr = np.concatenate([mat.indptr, np.full(extra, mat.indptr[-1], dtype=mat.indptr.dtype)])
    return sp.csr_matrix((mat.data, mat.indices, indptr), shape=(n_rows, n_cols))


def merge_csr(old: sp.csr_matrix, new: sp.csr_matrix, how: Merge) -> sp.csr_matrix:
    """``old`` grown to ``new``'s shape with ``new``'s entries merged in: added (``"sum"``), overwriting
    (``"replace"``: the newest value of a cell wins) or as a 0/1 pattern (``"ones"``). float32, sorted indices."""
    n_rows, n_cols = new.shape
    o, n = old.tocoo(), new.tocoo()
    keys = np.concatenate([o.row.astype(np.int64) * n_cols + o.col, n.row.astype(np.int64) * n_cols + n.col])
    vals = np.concatenate([o.data, n.data]).astype(np.float64)
    # A stable sort (radix for integers) keeps each cell's entries oldest first; np.unique's hashing is many
    # times slower here, and this runs on every batch of served feedback.
    order = np.argsort(keys, kind="stable")
    keys, vals = keys[order], vals[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    uniq = keys[starts]
    if how == "sum":
        data = np.add.reduceat(vals, starts) if len(keys) else vals
    elif how == "replace":
        data = vals[np.r_[starts[1:], len(keys)] - 1]  # the newest entry of each cell
    else:
        data = np.ones(len(uniq))
    out = sp.csr_matrix(
        (data.astype(np.float32), (uniq // n_cols, uniq % n_cols)), shape=(n_rows, n_cols), dtype=np.float32
    )
    out.sort_indices()
    return out


def pattern(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """The 0/1 float32 CSR pattern of (row, col) pairs (repeats count once), sorted indices."""
    out = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    out.sum_duplicates()
    out.data[:] = 1.0
    return out


def csr_to_state(prefix: str, mat: sp.csr_matrix, sep: str = ".") -> dict[str, np.ndarray]:
    """A CSR matrix as three flat arrays named ``<prefix><sep>indptr/indices/data`` (for safetensors)."""
    return {
        f"{prefix}{sep}indptr": mat.indptr.astype(np.int64),
        f"{prefix}{sep}indices": mat.indices.astype(np.int32),
        f"{prefix}{sep}data": mat.data.astype(np.float32),
    }


def csr_from_state(prefix: str, state: dict[str, Any], shape: tuple[int, int], sep: str = ".") -> sp.csr_matrix:
    """The inverse of :func:`csr_to_state` (without a ``data`` array: a pattern of ones). The arrays come from an
    artifact, so they are checked first: :class:`ArtifactError` names a missing array, row pointers that do not
    start at 0, decrease or miss the end, or column indices outside ``shape``."""
    name = f"{prefix}{sep}"
    try:
        indptr, indices = np.asarray(state[f"{name}indptr"]), np.asarray(state[f"{name}indices"])
    except KeyError as exc:
        raise ArtifactError(f"the saved state lacks {exc.args[0]!r}") from None
    data = state.get(f"{name}data")
    data = np.ones(len(indices), np.float32) if data is None else np.asarray(data)
    if indptr.ndim != 1 or len(indptr) != shape[0] + 1 or indptr.dtype.kind not in "iu":
        raise ArtifactError(f"{prefix} row pointers have shape {indptr.shape}, expected ({shape[0] + 1},)")
    if indices.ndim != 1 or indices.dtype.kind not in "iu" or data.shape != indices.shape:
        raise ArtifactError(f"{prefix} needs one-dimensional integer column indices and one value per index")
    if indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        raise ArtifactError(f"{prefix} row pointers must start at 0, never decrease and end at {len(indices)}")
    if len(indices) and (indices.min() < 0 or indices.max() >= shape[1]):
        raise ArtifactError(f"{prefix} column indices fall outside 0..{shape[1] - 1}")
    return sp.csr_matrix((data, indices, indptr), shape=shape)
