"""Shared fixtures: small planted-structure data and the location of the real datasets (benchmark-only)."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: -n 2 on 2 cores, not 2 × 2 threads fighting
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

from recforge.core.gpu_environment import fix_cublas_workspace  # torch-free

fix_cublas_workspace()  # before any GPU work, as the recforge command does: deterministic=True tests rely on it

import numpy as np  # after the thread settings, which numpy, numba and torch read when imported
import pandas as pd
import pytest

from recforge.data import Interactions
from recforge.data.datasets import make_synthetic

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def planted() -> Interactions:
    """A planted-structure dataset (taste clusters, popularity skew, sequences, ratings), deduplicated."""
    return make_synthetic(
        n_users=300, n_items=200, n_interactions=12_000, n_clusters=5, sequential_strength=0.2, seed=7
    ).deduplicate("last")


@pytest.fixture(scope="session")
def planted_str(planted: Interactions) -> Interactions:
    """The planted data with string ids, to check the id round-trip."""
    df = planted.to_frame()
    df["user_id"] = "u" + df["user_id"].astype(str)
    df["item_id"] = "i" + df["item_id"].astype(str)
    items = planted.item_data.reset_index(names="item_id")
    items["item_id"] = "i" + items["item_id"].astype(str)
    return Interactions.from_frame(df, item_data=items, item_data_id_col="item_id")


@pytest.fixture()
def tiny_frame() -> pd.DataFrame:
    """Five users, string item ids, ratings and timestamps: small enough to reason about by hand."""
    return pd.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5],
            "item_id": ["a", "b", "c", "a", "d", "b", "c", "d", "e", "a", "a", "e"],
            "rating": [5, 3, 4, 4, 2, 5, 5, 1, 3, 4, 2, 5],
            "timestamp": [10, 30, 20, 5, 6, 1, 2, 3, 4, 7, 8, 9],
        }
    )


@pytest.fixture()
def tiny_items() -> pd.DataFrame:
    """Titles and genres of the five items of ``tiny_frame``."""
    return pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "e"],
            "title": ["Alpha Story", "Beta Story", "Gamma Night", "Delta Night", "Epsilon Day"],
            "genres": ["Drama", "Drama|Comedy", "Horror", "Horror|Thriller", "Comedy"],
        }
    )


def ml100k_path() -> Path:
    """The real ML-100K folder beside the project (tests that need it are skipped without it)."""
    return SHARED_DATA / "ml-100k"


needs_ml100k = pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "u.data").exists(), reason="../shared/data absent")
needs_mlsmall = pytest.mark.skipif(
    not (SHARED_DATA / "ml-latest-small" / "ratings.csv").exists(), reason="../shared/data absent"
)


def ndcg_of(model, train: Interactions, test: Interactions) -> float:
    """NDCG@10 of a model fitted on ``train`` against ``test``."""
    from recforge.evaluation import evaluate

    return evaluate(model.fit(train), test, k=10)["ndcg@10"]


# Surface silent numeric problems (overflow, 0/0, division by zero) in tests. Underflow to zero is not one, and
# third-party code underflows routinely (Optuna's TPE sampler, in a long enough search), so it stays quiet.
np.seterr(all="raise", under="ignore")
