"""Two-tower retrieval model: preprocessing by hand, learning on planted data, cold items via genres, artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ndcg_of

from recforge import split as S
from recforge.data import Interactions
from recforge.errors import DataError, UnsupportedError
from recforge.models import Recommender, create_model
from recforge.models.two_tower import (
    TwoTower,
    time_bucket_edges,
    time_buckets,
    title_tokens,
    user_feature_table,
)

FAST = {"epochs": 8, "batch_size": 256, "num_threads": 1, "progress": False}


@pytest.fixture(scope="module")
def loo(planted: Interactions) -> S.Split:
    return S.leave_one_out(planted)


def test_time_bucket_edges_by_hand() -> None:
    ts = np.array([8, 1, 2, 3, 4, 5, 6, 7])
    # quartiles of 1..8 with linear interpolation: positions 1.75, 3.5, 5.25 → 2.75, 4.5, 6.25
    edges = time_bucket_edges(ts, 4)
    np.testing.assert_allclose(edges, [2.75, 4.5, 6.25])
    np.testing.assert_array_equal(time_buckets(ts, edges), [3, 0, 0, 1, 1, 2, 2, 3])
    # an edge is inclusive on the left: a timestamp equal to an edge goes to the upper bucket
    np.testing.assert_array_equal(time_buckets([4.5, 100, -5], edges), [2, 3, 0])
    # ties collapse repeated edges: fewer buckets, never empty ones in the middle
    np.testing.assert_array_equal(time_bucket_edges(np.array([5, 5, 5, 5, 9]), 4), [5.0])
    assert time_bucket_edges(ts, 1).size == 0


def test_title_tokens_and_user_features_by_hand() -> None:
    titles = pd.Series(["Toy Story (1995)", "toy soldiers", None, "Heat"])
    codes, vocab = title_tokens(titles, np.array([True, True, True, False]), max_tokens=2)
    assert vocab == ["1995", "soldiers", "story", "toy"]  # "heat" belongs to an item without events
    np.testing.assert_array_equal(codes, [[4, 3], [4, 2], [0, 0], [0, 0]])
    users = pd.DataFrame({"user_id": ["a", "b", "c"], "age": [20.0, np.nan, 40.0], "sex": ["F", "M", None]})
    num, cat, num_names, cat_names = user_feature_table(users, "auto")
    assert (num_names, cat_names) == (["age"], ["sex"])  # the id column is left out
    np.testing.assert_allclose(num[:, 0], [-1.0, 0.0, 1.0, 0.0])  # NaN → mean; last row = unknown user
    np.testing.assert_array_equal(cat[:, 0], [1, 2, 0, 0])


def test_learns_planted_structure(loo: S.Split) -> None:
    ours = ndcg_of(create_model("twotower", **FAST), loo.train_valid, loo.test)
    pop = ndcg_of(create_model("pop"), loo.train_valid, loo.test)
    assert ours > 1.3 * pop, f"two-tower NDCG@10 {ours:.4f} vs pop {pop:.4f}"


def test_early_stopping_on_validation(loo: S.Split) -> None:
    model = TwoTower(**{**FAST, "epochs": 12, "patience": 2}).fit(loo.train, valid=loo.valid)
    hist = model.training_history_
    assert "valid_ndcg@10" in hist.columns and model.best_score_ == hist["valid_ndcg@10"].max()
    assert model.best_epoch_ is not None and len(model.loss_history_) == len(hist)
    assert model.loss_history_[-1] < model.loss_history_[0]


def test_cold_items_scored_through_genres(planted: Interactions) -> None:
    """Items whose every interaction was removed keep a vector from their genre label (the planted cluster):
    a user ranks the cold items of its own cluster above the other cold items."""
    cluster = planted.item_data["cluster"].to_numpy()
    rng = np.random.default_rng(0)
    cold = np.sort(rng.choice(planted.n_items, 25, replace=False))
    train = planted.subset(np.flatnonzero(~np.isin(planted.items, cold)))
    model = TwoTower(**{**FAST, "epochs": 10}).fit(train)
    user_cluster = planted.user_data["cluster"].to_numpy()
    scores = model.score(np.arange(planted.n_users))[:, cold]
    same = cluster[cold][None, :] == user_cluster[:, None]
    # AUC of own-cluster cold items against other cold items, averaged over users
    auc = []
    for s, m in zip(scores, same):
        if m.any() and (~m).any():
            auc.append((s[m][:, None] > s[~m][None, :]).mean())
    assert np.mean(auc) > 0.75, f"cold-item AUC {np.mean(auc):.3f}"
    # without side data the cold items are indistinguishable (all share the zero out-of-vocabulary row)
    bare = Interactions(train.users, train.items, train.user_map, train.item_map, timestamps=train.timestamps)
    flat = TwoTower(**FAST).fit(bare).score(np.arange(3))[:, cold]
    np.testing.assert_allclose(flat, flat[:, :1].repeat(len(cold), 1), rtol=1e-5)


def test_save_load_identical(planted: Interactions, tmp_path: Path) -> None:
    model = TwoTower(**FAST, user_features="auto").fit(planted)
    loaded = Recommender.load(model.save(tmp_path / "tt"))
    assert isinstance(loaded, TwoTower)
    np.testing.assert_array_equal(model.score(np.arange(planted.n_users)), loaded.score(np.arange(planted.n_users)))
    np.testing.assert_array_equal(model.item_vectors(), loaded.item_vectors())
    # the rebuilt network reproduces the cached vectors
    np.testing.assert_allclose(loaded._encode(loaded.net_, None, np.arange(planted.n_items)), model.item_vectors(),
                               atol=1e-6)
    np.testing.assert_allclose(model.user_vectors() @ model.item_vectors().T, model.score(np.arange(planted.n_users)),
                               rtol=1e-5, atol=1e-5)


def test_no_item_data_no_timestamps(planted: Interactions) -> None:
    bare = Interactions(planted.users, planted.items, planted.user_map, planted.item_map)
    model = TwoTower(**FAST).fit(bare)
    assert "time_edges" not in model.prep_ and "titles" not in model.prep_
    recs = model.recommend(planted.user_map.ids[:3], k=5)
    assert len(recs) == 15
    with pytest.raises(UnsupportedError):
        model.score_histories([[0, 1]])


@pytest.mark.parametrize(("loss", "rival"), [("softmax", "pop"), ("inbatch", "random")])
def test_other_losses_learn(loo: S.Split, loss: str, rival: str) -> None:
    # In-batch softmax without the logQ correction over-penalises popular items (they are the most frequent
    # negatives), so on this popularity-skewed data it only has to beat random; the full softmax has no such bias.
    ours = ndcg_of(TwoTower(**FAST, loss=loss), loo.train_valid, loo.test)
    theirs = ndcg_of(create_model(rival), loo.train_valid, loo.test)
    assert ours > theirs


def test_unknown_user_feature_column(planted: Interactions) -> None:
    with pytest.raises(DataError, match="nope"):
        TwoTower(**FAST, user_features=["nope"]).fit(planted)


def test_text_encoder_embeddings_are_frozen(planted: Interactions, tmp_path: Path) -> None:
    model = TwoTower(**{**FAST, "epochs": 2}, text_encoder="tfidf").fit(planted)
    text = model.prep_["text"]
    assert text.shape[0] == planted.n_items
    norms = np.linalg.norm(text, axis=1)
    assert np.all(np.isclose(norms, 1.0, atol=1e-5) | (norms == 0))  # unit rows (or empty ones)
    np.testing.assert_array_equal(model.net_.item.text.cpu().numpy(), text)  # a buffer: never trained
    loaded = Recommender.load(model.save(tmp_path / "text"))
    np.testing.assert_array_equal(model.score(np.arange(5)), loaded.score(np.arange(5)))


def test_retrieval_through_an_ann_index_matches_exact_scores(planted) -> None:
    """The towers' vectors go into the shared index: HNSW retrieval finds what exact scoring ranks first."""
    import importlib.util

    from recforge.models import create_model
    from recforge.retrieval import make_index

    model = create_model("twotower", epochs=5, num_threads=1, progress=False).fit(planted)
    users = np.arange(50)
    exact, _ = model.recommend_indices(users, 10)
    found, _ = make_index(model.item_vectors(), "exact").search(model.user_vectors()[users], 10)
    np.testing.assert_array_equal(found, exact)
    if importlib.util.find_spec("usearch") is not None:
        approx, _ = make_index(model.item_vectors(), "hnsw", num_threads=1).search(model.user_vectors()[users], 10)
        recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(approx, exact)])
        assert recall > 0.9
    sim = model.similar_items(planted.item_map.ids[:3], k=5)
    assert len(sim) == 15 and not (sim["item_id"] == sim["similar_item_id"]).any()
