"""Item and user side data (titles, text, genres, numeric features) aligned with an id map."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recforge.data.idmap import IdMap, _as_id_array
from recforge.errors import DataError


def align_side_data(df: Any, id_map: IdMap, id_col: str | None = None) -> pd.DataFrame:
    """Reorder a side-data table so that row ``i`` describes index ``i`` of ``id_map``.

    The ids come from ``id_col`` when that column exists, otherwise from the frame's index. Rows for ids outside
    the map are dropped; ids of the map without a row get missing values. The result is indexed by the ids.
    """
    frame = df if isinstance(df, pd.DataFrame) else df.to_pandas()
    if id_col is not None and id_col in frame.columns:
        keys = frame[id_col]
        frame = frame.drop(columns=[id_col])
    else:
        keys = frame.index.to_series()
    keys = _as_id_array(keys, "side-data ids")
    if pd.Index(keys).has_duplicates:
        raise DataError("side data has duplicate ids; keep one row per id")
    idx = id_map.to_index(keys, on_unknown="keep")
    out = frame.iloc[np.flatnonzero(idx >= 0)].copy()
    out.index = pd.Index(idx[idx >= 0])
    out = out.reindex(np.arange(len(id_map)))
    out.index = pd.Index(id_map.ids, name="id")
    return out


def multi_hot(
    values: pd.Series, sep: str = "|", missing: tuple[str, ...] = ("(no genres listed)",)
) -> tuple[sp.csr_matrix, list[str]]:
    """Multi-hot encode delimiter-separated labels (e.g. ``"Action|Comedy"``); returns (matrix, vocabulary)."""
    lists = values.fillna("").astype(str).str.split(sep)
    rows = np.repeat(np.arange(len(values)), lists.str.len().to_numpy())
    labels = np.asarray([lab for labs in lists for lab in labs], dtype=object)
    keep = (labels != "") & ~np.isin(labels, list(missing))
    codes, vocab = pd.factorize(labels[keep], sort=True)
    mat = sp.csr_matrix(
        (np.ones(len(codes), np.float32), (rows[keep], codes)), shape=(len(values), len(vocab))
    )
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat, [str(v) for v in vocab]
