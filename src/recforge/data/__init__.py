"""Data layer: interactions, id maps, side data, filters and file I/O."""

from recforge.data.filters import deduplicate, k_core, min_item_count, min_user_count, rating_threshold
from recforge.data.idmap import IdMap
from recforge.data.interactions import Interactions, Sequences
from recforge.data.io import read_table, write_table
from recforge.data.sidedata import align_side_data, multi_hot

__all__ = [
    "IdMap",
    "Interactions",
    "Sequences",
    "align_side_data",
    "deduplicate",
    "k_core",
    "min_item_count",
    "min_user_count",
    "multi_hot",
    "rating_threshold",
    "read_table",
    "write_table",
]
