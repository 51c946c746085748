"""Item-kNN: shrunk cosine by hand, top-k pruning, TF-IDF/BM25 weights, scoring, updates, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import ndcg_of

from recforge import split as S
from recforge.core import device_sparse
from recforge.data import Interactions
from recforge.errors import DataError
from recforge.models import MostPopular, Recommender, create_model
from recforge.models.neighbors import ItemKNN, bm25_weight, interaction_matrix, item_knn_rows, tfidf_weight

# users x items, binary
X = np.array(
    [
        [1, 1, 0, 0, 1],
        [1, 0, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [1, 1, 0, 1, 0],
        [0, 0, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ],
    np.float64,
)


def to_inter(x: np.ndarray) -> Interactions:
    u, i = np.nonzero(x)
    return Interactions.from_frame(pd.DataFrame({"user_id": u, "item_id": i}))


def dense_cosine(y: np.ndarray, shrink: float) -> np.ndarray:
    """Shrunk cosine between the columns of y, diagonal zeroed, straight from the definition."""
    n = y.shape[1]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = y[:, i] @ y[:, j] / (np.linalg.norm(y[:, i]) * np.linalg.norm(y[:, j]) + shrink)
    return out


def test_shrunk_cosine_by_hand() -> None:
    model = ItemKNN(n_neighbors=10, shrink=2.0).fit(to_inter(X))
    expected = dense_cosine(X, 2.0)
    np.testing.assert_allclose(model.weights_.toarray(), expected, rtol=1e-6)
    # one entry written out: items 0 and 1 share users 0, 3, 5; both have 4 users -> 3 / (2 * 2 + 2)
    assert model.weights_[0, 1] == pytest.approx(3 / 6)


def test_top_k_per_target_item() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((60, 40)) < 0.2).astype(np.float64)
    model = ItemKNN(n_neighbors=3, shrink=0.0).fit(to_inter(x))
    w = model.weights_.toarray()
    full = dense_cosine(x[:, np.flatnonzero(x.sum(0))], 0.0)  # items of the map: those with interactions
    assert w.shape == full.shape
    assert (np.count_nonzero(w, axis=0) <= 3).all()  # column j: target item j's neighbourhood
    for j in range(w.shape[1]):
        kept = np.sort(w[:, j][w[:, j] > 0])[::-1]
        best = np.sort(full[:, j])[::-1][: len(kept)]
        np.testing.assert_allclose(kept, best, rtol=1e-6)
    assert np.all(np.diag(w) == 0)


def test_ties_go_to_smaller_index() -> None:
    # item 0 co-occurs equally (once, same norms) with items 1, 2 and 3
    x = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], np.float64)
    rows = item_knn_rows(sp.csr_matrix(x.T), sp.csr_matrix(x), k=2)
    assert list(rows[0].indices) == [1, 2]


def test_tfidf_and_bm25_values_by_hand() -> None:
    # items x users; user 0 has 2 items, user 1 has 1, user 2 has 3 (all items)
    m = sp.csr_matrix(np.array([[1.0, 0, 1], [2.0, 1, 1], [0, 0, 1]]))
    n_items = 3
    idf = np.log(n_items) - np.log1p(np.array([2.0, 1.0, 3.0]))
    tf = tfidf_weight(m).toarray()
    np.testing.assert_allclose(tf, np.sqrt(m.toarray()) * idf[None, :])
    K1, B = 1.2, 0.75
    length = np.array([2.0, 4.0, 1.0])
    norm = 1 - B + B * length / length.mean()
    dense = m.toarray()
    expected = np.where(dense > 0, dense * (K1 + 1) / (K1 * norm[:, None] + dense) * idf[None, :], 0)
    np.testing.assert_allclose(bm25_weight(m, K1, B).toarray(), expected)
    # entry (1, 1) written out: x = 1, item 1 has length 4 against a mean of 7/3, user 1 has df 1
    n1 = 1 - B + B * 4 / (7 / 3)
    assert bm25_weight(m, K1, B)[1, 1] == pytest.approx(1 * (K1 + 1) / (K1 * n1 + 1) * (np.log(3) - np.log(2)))


def test_bm25_dot_similarity_is_weighted_gram() -> None:
    model = ItemKNN(n_neighbors=10, weighting="bm25", similarity="dot", K1=1.5, B=0.5).fit(to_inter(X))
    y = bm25_weight(sp.csr_matrix(X.T), 1.5, 0.5).toarray().T
    gram = y.T @ y
    np.fill_diagonal(gram, 0)
    np.testing.assert_allclose(model.weights_.toarray(), np.where(gram > 0, gram, 0), rtol=1e-5)


def test_scores_are_x_times_w_and_normalize() -> None:
    inter = to_inter(X)
    model = ItemKNN(n_neighbors=2, shrink=1.0).fit(inter)
    np.testing.assert_allclose(model.score(np.arange(6)), X @ model.weights_.toarray(), rtol=1e-6)
    norm = ItemKNN(n_neighbors=2, shrink=1.0, normalize=True).fit(inter).weights_.toarray()
    sums = norm.sum(axis=1)
    np.testing.assert_allclose(sums[sums > 0], 1.0, rtol=1e-6)


def test_values_count_and_interaction_matrix() -> None:
    frame = pd.DataFrame({"user_id": [0, 0, 1], "item_id": [0, 0, 1], "rating": [3.0, 5.0, 2.0], "timestamp": [1, 2, 3]})
    inter = Interactions.from_frame(frame)
    assert interaction_matrix(inter, "binary").toarray().tolist() == [[1, 0], [0, 1]]
    assert interaction_matrix(inter, "count").toarray().tolist() == [[2, 0], [0, 1]]
    assert interaction_matrix(inter, "rating").toarray().tolist() == [[5, 0], [0, 2]]
    with pytest.raises(DataError, match="weight"):
        interaction_matrix(inter, "weight")


def test_same_result_with_any_thread_count(planted: Interactions) -> None:
    one = ItemKNN(n_neighbors=20, num_threads=1).fit(planted).weights_
    two = ItemKNN(n_neighbors=20, num_threads=2).fit(planted).weights_
    assert (one != two).nnz == 0


@pytest.mark.parametrize("weighting", ["none", "tfidf", "bm25"])
def test_learns_planted_structure(planted: Interactions, weighting: str) -> None:
    loo = S.leave_one_out(planted)
    ours = ndcg_of(ItemKNN(weighting=weighting), loo.train_valid, loo.test)
    assert ours > 1.5 * ndcg_of(MostPopular(), loo.train_valid, loo.test)


def test_partial_fit_new_user_new_item(tmp_path) -> None:
    inter = to_inter(X)
    model = create_model("knn", n_neighbors=3).fit(inter)
    w_before = model.weights_.toarray()
    model.partial_fit(pd.DataFrame({"user_id": [77, 77, 2], "item_id": [0, 4, 50]}))
    assert model.weights_.shape == (6, 6) and model.weights_[5].nnz == 0 and model.weights_[:, 5].nnz == 0
    new_user = model.user_map_.to_index(np.array([77]))[0]
    scores = model.score(np.array([new_user]))[0]
    np.testing.assert_allclose(scores[:5], w_before[0] + w_before[4], rtol=1e-6)
    assert scores[5] < scores[:5].min()
    # user 2 keeps their history and gains item 50 in X
    assert model.X_[2].toarray().ravel().tolist() == [0, 1, 1, 1, 0, 1]
    loaded = Recommender.load(model.save(tmp_path / "knn"))
    np.testing.assert_array_equal(loaded.score(np.arange(model.n_users_)), model.score(np.arange(model.n_users_)))


def test_partial_fit_rating_values_replace() -> None:
    frame = pd.DataFrame({"user_id": [0, 0, 1, 1], "item_id": [0, 1, 0, 1], "rating": [1.0, 2.0, 3.0, 4.0]})
    model = ItemKNN(values="rating").fit(Interactions.from_frame(frame))
    model.partial_fit(pd.DataFrame({"user_id": [0], "item_id": [1], "rating": [5.0]}))
    assert model.X_.toarray().tolist() == [[1, 5], [3, 4]]


DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_similarities_on_a_device_equal_the_cpu_kernel(planted: Interactions, device: torch.device,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch products (the GPU path, small blocks so several run) keep the same neighbours: cosine with
    shrink and ties (binary data) exactly, RP3beta's weighted walk to float rounding."""
    monkeypatch.setattr(device_sparse, "_BLOCK_BYTES", 8 * 40 * (planted.n_users + planted.n_items))
    x = interaction_matrix(planted)
    it = x.T.tocsr()
    norm = np.sqrt(np.asarray(it.multiply(it).sum(axis=1), dtype=np.float64).ravel())
    args = (it, x.T.T.tocsr(), 7)
    want = item_knn_rows(*args, row_norm=norm, col_norm=norm, shrink=3.0)
    got = item_knn_rows(*args, row_norm=norm, col_norm=norm, shrink=3.0, device=device)
    assert want.nnz > 7 * planted.n_items // 2
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)
    rng = np.random.default_rng(0)
    weights = {"user_weight": rng.random(planted.n_users), "row_scale": rng.random(planted.n_items),
               "col_scale": rng.random(planted.n_items)}
    want = item_knn_rows(*args, **weights)
    got = item_knn_rows(*args, **weights, device=device)
    np.testing.assert_array_equal(got.indptr, want.indptr)
    assert (got.indices == want.indices).mean() > 0.99
    np.testing.assert_allclose(got.data, want.data, rtol=1e-5)
