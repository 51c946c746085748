"""Item feature matrices from side data: texts for the encoders, genres/tags as multi-hot, and their mix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recforge.core.vectors import normalize_rows
from recforge.data.sidedata import multi_hot
from recforge.errors import DataError
from recforge.features.text import TextEncoder

#: Columns read as item text when none are named, in this order (those present are used).
DEFAULT_TEXT_COLUMNS = ("title", "genres", "tags", "description", "text", "overview")
#: Columns holding ``|``-separated labels: shown to text encoders as comma lists.
LABEL_COLUMNS = ("genres", "tags")


def _require(item_data: pd.DataFrame | None, what: str) -> pd.DataFrame:
    if item_data is None or len(item_data.columns) == 0:
        raise DataError(f"{what} needs item side data (e.g. titles, genres); the interactions carry none — pass "
                        "item_data= to Interactions.from_frame or load a dataset with item files")
    return item_data


def text_columns_of(item_data: pd.DataFrame, columns: Sequence[str] | None) -> list[str]:
    """The text columns to use: ``columns`` (each must exist) or the default ones present."""
    if columns is None:
        found = [c for c in DEFAULT_TEXT_COLUMNS if c in item_data.columns]
        if not found:
            raise DataError(f"item data has none of the text columns {list(DEFAULT_TEXT_COLUMNS)}; "
                            f"name them with text_columns= (columns: {list(item_data.columns)})")
        return found
    if isinstance(columns, str):
        columns = [columns]
    missing = [c for c in columns if c not in item_data.columns]
    if missing:
        raise DataError(f"item data has no column(s) {missing}; columns: {list(item_data.columns)}")
    return list(columns)


def item_texts(item_data: pd.DataFrame | None, columns: Sequence[str] | None = None) -> list[str]:
    """One text per item row: the chosen columns joined as ``"Toy Story (1995). genres: Adventure, Animation"``.

    Label columns (``genres``, ``tags``) have their ``|`` separators turned into commas and a ``name:`` prefix;
    missing values are skipped.
    """
    data = _require(item_data, "item_texts")
    parts = []
    for col in text_columns_of(data, columns):
        values = data[col].astype("string").fillna("")
        if col in LABEL_COLUMNS:
            values = values.str.replace("(no genres listed)", "", regex=False).str.replace("|", ", ", regex=False)
            values = values.where(values == "", col + ": " + values)
        parts.append(values)
    joined = parts[0]
    for more in parts[1:]:
        joined = joined.str.cat(more, sep=". ").str.strip(". ")
    return joined.fillna("").astype(str).tolist()


def genre_matrix(item_data: pd.DataFrame | None, column: str = "genres", sep: str = "|") -> tuple[sp.csr_matrix, list[str]]:
    """Multi-hot item × label matrix of a ``|``-separated column (genres, tags) and its vocabulary."""
    data = _require(item_data, "genre_matrix")
    if column not in data.columns:
        raise DataError(f"item data has no {column!r} column; columns: {list(data.columns)}")
    return multi_hot(data[column], sep=sep)


def item_feature_matrix(
    item_data: pd.DataFrame | None,
    encoder: TextEncoder | None,
    text_columns: Sequence[str] | None = None,
    genre_column: str | None = "genres",
    genre_weight: float = 0.0,
) -> np.ndarray:
    """Unit-norm item vectors mixing text embeddings and genres: ``cos = (1-w)·cos_text + w·cos_genre``.

    The two blocks are normalised separately and scaled by ``sqrt(1-w)`` and ``sqrt(w)`` before concatenation,
    so ``genre_weight`` (``w`` in [0, 1]) is exactly the share of genre similarity in the cosine (for items that
    have both). ``encoder=None`` uses genres alone. Items without any text or genre get a zero vector.
    """
    data = _require(item_data, "item_feature_matrix")
    if not 0.0 <= genre_weight <= 1.0:
        raise DataError(f"genre_weight must lie in [0, 1], got {genre_weight!r}")
    blocks = []
    if encoder is not None and genre_weight < 1.0:
        text = encoder.encode(item_texts(data, text_columns))
        blocks.append(normalize_rows(text) * np.float32(np.sqrt(1.0 - genre_weight if genre_column else 1.0)))
    use_genres = genre_column is not None and genre_column in data.columns and (genre_weight > 0 or encoder is None)
    if use_genres:
        mat, _ = genre_matrix(data, genre_column)
        weight = 1.0 if encoder is None else genre_weight
        blocks.append(normalize_rows(mat.toarray()) * np.float32(np.sqrt(weight)))
    if not blocks:
        raise DataError("item_feature_matrix has nothing to encode: give an encoder or a genre column")
    out = np.hstack(blocks) if len(blocks) > 1 else blocks[0]
    return normalize_rows(out) if len(blocks) > 1 else np.ascontiguousarray(out, dtype=np.float32)
