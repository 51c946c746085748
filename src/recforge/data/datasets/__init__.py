"""Datasets: the embedded MovieLens latest-small, MovieLens readers and downloads, and synthetic data."""

from recforge.data.datasets.download import fetch
from recforge.data.datasets.movielens import load_movielens, load_movielens_folds
from recforge.data.datasets.registry import describe_dataset, list_datasets, load
from recforge.data.datasets.synthetic import make_synthetic

__all__ = ["describe_dataset", "fetch", "list_datasets", "load", "load_movielens", "load_movielens_folds", "make_synthetic"]
