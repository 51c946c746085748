"""RP3beta: the random-walk weights by hand, popularity penalty, pruning, learning and updates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import ndcg_of

from recforge import split as S
from recforge.data import Interactions
from recforge.models import MostPopular, Recommender, create_model
from recforge.models.graph import RP3beta

# 3 users x 4 items
X = np.array([[1, 1, 0, 0], [1, 0, 1, 1], [0, 1, 1, 0]], np.float64)


def inter_of(x: np.ndarray) -> Interactions:
    u, i = np.nonzero(x)
    return Interactions.from_frame(pd.DataFrame({"user_id": u, "item_id": i}))


def dense_rp3(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    p_ui = x / x.sum(axis=1, keepdims=True)
    p_iu = (x / x.sum(axis=0, keepdims=True)).T
    w = (p_iu**alpha) @ (p_ui**alpha) / x.sum(axis=0)[None, :] ** beta
    np.fill_diagonal(w, 0.0)
    return w


def test_three_step_walk_by_hand() -> None:
    w = RP3beta(alpha=1.0, beta=0.0, n_neighbors=10).fit(inter_of(X)).weights_.toarray()
    # From item 0 (users 0 and 1, 1/2 each): user 0 -> items {0, 1} 1/2 each; user 1 -> items {0, 2, 3} 1/3 each.
    np.testing.assert_allclose(w[0], [0.0, 1 / 4, 1 / 6, 1 / 6], rtol=1e-6)
    # P3 rows are probabilities: with the return-to-self step removed they sum to 1 - P(i -> i).
    p_self = np.array([1 / 4 + 1 / 6, 1 / 4 + 1 / 4, 1 / 6 + 1 / 4, 1 / 3])
    np.testing.assert_allclose(w.sum(axis=1), 1 - p_self, rtol=1e-6)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.3), (1.0, 0.6), (1.5, 1.0)])
def test_matches_dense_definition(alpha: float, beta: float) -> None:
    w = RP3beta(alpha=alpha, beta=beta, n_neighbors=10).fit(inter_of(X)).weights_.toarray()
    np.testing.assert_allclose(w, dense_rp3(X, alpha, beta), rtol=1e-5)


def test_beta_divides_by_destination_popularity() -> None:
    plain = RP3beta(alpha=1.0, beta=0.0, n_neighbors=10).fit(inter_of(X)).weights_.toarray()
    pen = RP3beta(alpha=1.0, beta=0.5, n_neighbors=10).fit(inter_of(X)).weights_.toarray()
    pop = X.sum(axis=0)
    np.testing.assert_allclose(pen, plain / np.sqrt(pop)[None, :], rtol=1e-6)


def test_top_k_per_row_and_normalize() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random((80, 30)) < 0.25).astype(np.float64)
    x[:, x.sum(axis=0) == 0] = 0
    x = x[:, x.sum(axis=0) > 0]
    x = x[x.sum(axis=1) > 0]
    model = RP3beta(alpha=0.8, beta=0.4, n_neighbors=4).fit(inter_of(x))
    w = model.weights_.toarray()
    full = dense_rp3(x, 0.8, 0.4)
    assert (np.count_nonzero(w, axis=1) <= 4).all()
    for i in range(w.shape[0]):
        np.testing.assert_allclose(np.sort(w[i][w[i] > 0])[::-1], np.sort(full[i])[::-1][:4], rtol=1e-5)
    normed = RP3beta(alpha=0.8, beta=0.4, n_neighbors=4, normalize=True).fit(inter_of(x)).weights_.toarray()
    np.testing.assert_allclose(normed.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.score(np.arange(3)), x[:3] @ w, rtol=1e-5)


def test_learns_planted_structure(planted: Interactions) -> None:
    loo = S.leave_one_out(planted)
    ours = ndcg_of(create_model("rp3"), loo.train_valid, loo.test)
    assert ours > 1.5 * ndcg_of(MostPopular(), loo.train_valid, loo.test)


def test_partial_fit_and_round_trip(tmp_path) -> None:
    model = RP3beta(n_neighbors=10).fit(inter_of(X))
    w = model.weights_.toarray()
    model.partial_fit(pd.DataFrame({"user_id": [5, 5], "item_id": [1, 7]}))
    assert model.weights_.shape == (5, 5)
    u = model.user_map_.to_index(np.array([5]))[0]
    scores = model.score(np.array([u]))[0]
    np.testing.assert_allclose(scores[:4], w[1], rtol=1e-6)
    assert scores[4] < scores[:4].min()
    loaded = Recommender.load(model.save(tmp_path / "rp3"))
    np.testing.assert_array_equal(loaded.score(np.arange(4)), model.score(np.arange(4)))
