"""ImplicitALS and BiasedALS: closed forms by hand, CG against the exact solve, fold-in, persistence."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import ndcg_of

from recforge import split as S
from recforge.data import Interactions
from recforge.errors import ArtifactError
from recforge.models import Recommender, create_model
from recforge.models import als as als_module
from recforge.models.als import (
    BiasedALS,
    DeviceCSR,
    DeviceRatings,
    ImplicitALS,
    _biased_exact,
    _biased_sse_rows,
    _cholesky_solve,
    biased_half_step_torch,
    implicit_half_step,
    implicit_half_step_torch,
)


def implicit_row_by_hand(r_row: np.ndarray, Y: np.ndarray, reg: float, alpha: float) -> np.ndarray:
    """x_u = (Yᵀ C_u Y + λI)⁻¹ Yᵀ C_u p_u with c = 1 + alpha·r and p = [r > 0]."""
    c = 1.0 + alpha * r_row
    p = (r_row > 0).astype(float)
    A = Y.T @ (c[:, None] * Y) + reg * np.eye(Y.shape[1])
    return np.linalg.solve(A, Y.T @ (c * p))


def test_cholesky_solve_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    M = rng.standard_normal((6, 6))
    A = M @ M.T + 0.5 * np.eye(6)
    b = rng.standard_normal(6)
    expected = np.linalg.solve(A, b)
    work, x = np.tril(A).copy(), b.copy()
    _cholesky_solve(work, x, 6)
    np.testing.assert_allclose(x, expected, rtol=1e-10)


def test_implicit_exact_half_step_on_3x3() -> None:
    R = sp.csr_matrix(np.array([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], np.float32))
    Y = np.array([[1.0, 0.5], [-0.5, 1.0], [0.25, 0.25]], np.float32)
    X = np.zeros((3, 2), np.float32)
    alpha, reg = 3.0, 0.1
    implicit_half_step(R, (1 + alpha * R.data).astype(np.float32), X, Y, reg, "cholesky")
    for u in range(3):
        np.testing.assert_allclose(X[u], implicit_row_by_hand(R.toarray()[u], Y.astype(float), reg, alpha), rtol=1e-5)
    np.testing.assert_array_equal(X[2], 0.0)  # no interactions: the ridge solution is zero


def test_cg_approaches_the_exact_solution() -> None:
    rng = np.random.default_rng(1)
    R = sp.random(60, 40, density=0.2, format="csr", random_state=2, dtype=np.float32)
    R.data[:] = rng.integers(1, 4, R.nnz)
    conf = (1 + 2.0 * R.data).astype(np.float32)
    Y = rng.standard_normal((40, 8)).astype(np.float32) * 0.3
    exact = np.zeros((60, 8), np.float32)
    implicit_half_step(R, conf, exact, Y, 0.5, "cholesky")
    errors = []
    for steps in (1, 2, 4, 8, 16):
        X = np.zeros((60, 8), np.float32)
        implicit_half_step(R, conf, X, Y, 0.5, "cg", cg_steps=steps)
        errors.append(np.abs(X - exact).max())
    assert all(b <= a * 1.01 for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-4, errors
    # Warm starts: repeated 2-step solves from the previous answer converge too.
    X = np.zeros((60, 8), np.float32)
    for _ in range(10):
        implicit_half_step(R, conf, X, Y, 0.5, "cg", cg_steps=2)
    assert np.abs(X - exact).max() < errors[1] / 10


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
@pytest.mark.parametrize("deterministic", [False, True], ids=["cusparse", "fixed-order"])
def test_the_torch_cg_takes_the_same_steps(device: str, deterministic: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path (run here on ``device``) against the numba kernel: same warm start, same steps, an empty row;
    with the sparse products by cuSPARSE or summed in a fixed order."""
    rng = np.random.default_rng(5)
    R = sp.random(70, 45, density=0.15, format="csr", random_state=6, dtype=np.float32)
    R.data[:] = rng.integers(1, 4, R.nnz)
    R = sp.csr_matrix(R.toarray() * (np.arange(70) != 3)[:, None])  # user 3 has no events
    conf = (1 + 2.0 * R.data).astype(np.float32)
    Y = rng.standard_normal((45, 8)).astype(np.float32) * 0.3
    start = rng.standard_normal((70, 8)).astype(np.float32) * 0.1
    monkeypatch.setattr(als_module, "_DOT_CHUNK", 50)  # the products gathered over several chunks
    for steps in (1, 3):
        expected = start.copy()
        implicit_half_step(R, conf, expected, Y, 0.5, "cg", cg_steps=steps)
        X = torch.from_numpy(start.copy()).to(device)
        by_user = DeviceCSR(R, conf, torch.device(device), deterministic)
        implicit_half_step_torch(by_user, X, torch.from_numpy(Y).to(device), 0.5, steps)
        np.testing.assert_allclose(X.cpu().numpy(), expected, atol=2e-5)
    model = ImplicitALS()
    model.reg_ = 0.5
    by_user = DeviceCSR(R, conf, torch.device(device), deterministic)
    assert model._loss_torch(by_user, torch.from_numpy(start).to(device), torch.from_numpy(Y).to(device)) \
        == pytest.approx(model._loss(R, conf, start, Y), rel=1e-5)  # the epoch's loss, computed on the device


def test_cg_fit_is_close_to_exact_fit(planted: Interactions) -> None:
    cg = ImplicitALS(n_factors=16, epochs=10, progress=False).fit(planted)
    exact = ImplicitALS(n_factors=16, epochs=10, solver="cholesky", progress=False).fit(planted)
    # Exact alternating minimisation never increases the objective; CG lands within a whisker of it.
    assert np.all(np.diff(exact.loss_history_) <= 1e-9 * exact.loss_history_[0])
    assert cg.loss_history_[-1] == pytest.approx(exact.loss_history_[-1], rel=0.01)
    a = cg.recommend_indices(np.arange(50), 10, cg.seen_)[0]
    b = exact.recommend_indices(np.arange(50), 10, exact.seen_)[0]
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])
    assert overlap > 0.7


def _fitted_confidence(model: ImplicitALS, R: sp.csr_matrix) -> np.ndarray:
    model._set_confidence(R)
    return model._confidence(R.data)


def test_confidence_scalings() -> None:
    R = sp.csr_matrix(np.array([[1.0, 3.0, 10.0, 0.0]], np.float32))
    linear = ImplicitALS(alpha=2.0, reg=7.0, confidence="linear")
    np.testing.assert_allclose(_fitted_confidence(linear, R), [3.0, 7.0, 21.0])
    assert linear.reg_ == 7.0
    log = ImplicitALS(alpha=2.0, confidence="log", eps=2.0)
    np.testing.assert_allclose(_fitted_confidence(log, R), 1 + 2 * np.log1p(R.data / 2), rtol=1e-6)


def test_auto_confidence_follows_density_and_the_median_count() -> None:
    # 3 of 4 cells filled (density 0.75), median count 3: α = 0.3 / 0.75 = 0.4, c = 1 + α·log2(1 + r/3)
    R = sp.csr_matrix(np.array([[1.0, 3.0, 10.0, 0.0]], np.float32))
    model = ImplicitALS(alpha=0.3, reg=2.0)
    np.testing.assert_allclose(_fitted_confidence(model, R), 1 + 0.4 * np.log2([4 / 3, 2.0, 13 / 3]), rtol=1e-6)
    assert model.count_scale_ == 3.0 and model.reg_ == pytest.approx(2.0 * 1.4)
    # The same events counted in other units (seconds instead of plays) weigh the same; without counts c = 1 + α.
    seconds = sp.csr_matrix(R.toarray() * 180)
    np.testing.assert_allclose(_fitted_confidence(ImplicitALS(alpha=0.3), seconds), _fitted_confidence(model, R), rtol=1e-6)
    ones = sp.csr_matrix((R.toarray() > 0).astype(np.float32))
    np.testing.assert_allclose(_fitted_confidence(ImplicitALS(alpha=0.3), ones), 1.4, rtol=1e-6)


def test_counts_feed_the_confidence() -> None:
    # Repeated events sum into r_ui: the duplicated pair gets c = 1 + alpha·2.
    df = pd.DataFrame({"user_id": [0, 0, 0, 1], "item_id": [0, 0, 1, 1]})
    model = ImplicitALS(n_factors=2, epochs=1, progress=False).fit(Interactions.from_frame(df))
    assert model.interactions_.toarray().tolist() == [[2.0, 1.0], [0.0, 1.0]]


def test_thread_count_does_not_change_the_factors(planted: Interactions) -> None:
    # the CPU kernel's rows are independent; on a GPU, deterministic=True is what repeats a run (contract suite)
    one = ImplicitALS(n_factors=8, epochs=3, num_threads=1, progress=False, device="cpu").fit(planted)
    two = ImplicitALS(n_factors=8, epochs=3, num_threads=2, progress=False, device="cpu").fit(planted)
    np.testing.assert_array_equal(one.user_factors_, two.user_factors_)


def test_fold_in_is_the_exact_solve_from_the_full_history(planted: Interactions) -> None:
    model = ImplicitALS(n_factors=8, epochs=5, progress=False).fit(planted)
    Y_before = model.item_factors_.copy()
    items = planted.item_map.ids[:6]
    model.partial_fit(pd.DataFrame({"user_id": [10**6] * 6, "item_id": items}))
    r_row = np.zeros(model.n_items_)
    r_row[model.item_map_.to_index(items)] = 1.0
    expected = implicit_row_by_hand(r_row, Y_before.astype(float), model.reg_, model.alpha_)
    np.testing.assert_allclose(model.user_factors_[-1], expected, rtol=1e-3, atol=1e-5)
    # The touched items were then re-solved with the user factors fixed; untouched ones kept.
    touched = model.item_map_.to_index(items)
    untouched = np.setdiff1d(np.arange(model.n_items_), touched)
    np.testing.assert_array_equal(model.item_factors_[untouched], Y_before[untouched])
    assert not np.allclose(model.item_factors_[touched], Y_before[touched])


def test_fold_in_after_load_matches(planted: Interactions, tmp_path: Path) -> None:
    events = pd.DataFrame({"user_id": [0, 0, 10**6, 10**6], "item_id": planted.item_map.ids[[3, 4, 3, 5]]})
    model = ImplicitALS(n_factors=8, epochs=3, progress=False).fit(planted)
    loaded = Recommender.load(model.save(tmp_path / "als"))
    model.partial_fit(events)
    loaded.partial_fit(events)
    np.testing.assert_array_equal(model.user_factors_, loaded.user_factors_)
    np.testing.assert_array_equal(model.item_factors_, loaded.item_factors_)
    assert model.interactions_[0].sum() == planted.csr("ones")[0].sum() + 2


# ------------------------------------------------------------------------------------------ BiasedALS
def test_biased_row_solve_is_the_augmented_ridge() -> None:
    # one user, three rated items; solve [x_u, b_u] by hand
    R = sp.csr_matrix(np.array([[5.0, 3.0, 4.0]], np.float32))
    Y = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    yb = np.array([0.5, -0.5, 0.0], np.float32)
    X, xb = np.zeros((1, 2), np.float32), np.zeros(1, np.float32)
    mu, reg, breg, reg0, breg0 = 4.0, 0.2, 0.1, 0.7, 2.0
    _biased_exact(R.indptr, R.indices, R.data, np.array([0]), X, xb, Y, yb, mu, reg, breg, True, reg0, breg0, 1)
    Z = np.hstack([Y, np.ones((3, 1))]).astype(float)
    t = R.toarray()[0] - mu - yb
    # weighted: λ times the 3 ratings, plus the per-row priors whatever the count
    A = Z.T @ Z + 3 * np.diag([reg, reg, breg]) + np.diag([reg0, reg0, breg0])
    w = np.linalg.solve(A, Z.T @ t)
    np.testing.assert_allclose(np.r_[X[0], xb[0]], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
@pytest.mark.parametrize("weighted", [True, False])
def test_the_torch_biased_solve_is_the_numba_one(device: str, weighted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path (run here on ``device``) against the numba kernel: rows in several blocks of different widths,
    an empty row, and the training error the epochs log."""
    rng = np.random.default_rng(3)
    dense = rng.integers(1, 6, (60, 40)) * (rng.random((60, 40)) < np.linspace(0.02, 0.6, 60)[:, None])
    dense[7] = 0  # a user without ratings
    R = sp.csr_matrix(dense.astype(np.float32))
    Y = rng.standard_normal((40, 5)).astype(np.float32)
    yb = rng.standard_normal(40).astype(np.float32) * 0.3
    X = np.full((60, 5), 0.5, np.float32)
    xb = np.ones(60, np.float32)
    monkeypatch.setattr(als_module, "_SOLVE_BLOCK", 400)
    monkeypatch.setattr(als_module, "_DOT_CHUNK", 97)
    by_user = DeviceRatings(R, 6, torch.device(device))
    assert len(by_user.blocks) > 3
    args = (3.2, 0.15, 0.05, weighted, 1.0, 2.0)
    Xd, xbd = torch.from_numpy(X.copy()).to(device), torch.from_numpy(xb.copy()).to(device)
    Yd, ybd = torch.from_numpy(Y).to(device), torch.from_numpy(yb).to(device)
    biased_half_step_torch(by_user, Xd, xbd, Yd, ybd, *args)
    _biased_exact(R.indptr, R.indices, R.data, np.arange(60), X, xb, Y, yb, *args, 2)
    np.testing.assert_allclose(Xd.cpu().numpy(), X, atol=1e-5)
    np.testing.assert_allclose(xbd.cpu().numpy(), xb, atol=1e-5)
    assert not X[7].any() and xb[7] == 0
    sse = _biased_sse_rows(R.indptr, R.indices, R.data, X, xb, Y, yb, 3.2).sum()
    assert by_user.sse(Xd, xbd, Yd, ybd, 3.2) == pytest.approx(sse, rel=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_biased_als_fits_on_the_gpu_path_as_with_numba(device: str, planted: Interactions,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's GPU path (run here on ``device``) against the numba fit: the same epochs' training errors and
    factors, fitted arrays back on the CPU in float32."""
    numba_fit = BiasedALS(n_factors=8, progress=False, device="cpu").fit(planted)
    monkeypatch.setattr(als_module, "cuda_device", lambda name: torch.device(device))
    torch_fit = BiasedALS(n_factors=8, progress=False).fit(planted)
    np.testing.assert_allclose(torch_fit.loss_history_, numba_fit.loss_history_, rtol=1e-4)
    np.testing.assert_allclose(torch_fit.user_factors_, numba_fit.user_factors_, atol=1e-3)
    np.testing.assert_allclose(torch_fit.item_bias_, numba_fit.item_bias_, atol=1e-3)
    assert isinstance(torch_fit.user_factors_, np.ndarray) and torch_fit.user_factors_.dtype == np.float32


def test_biased_als_learns_and_beats_biases(planted: Interactions) -> None:
    split = S.random_split(planted, 0.2, seed=1)
    model = BiasedALS(n_factors=10, progress=False).fit(split.train)
    bias = create_model("bias").fit(split.train)

    def err(m: Recommender) -> float:
        return float(np.sqrt(np.mean((m.predict_indices(split.test.users, split.test.items) - split.test.ratings) ** 2)))

    assert err(model) < err(bias)
    assert model.loss_history_[-1] < model.loss_history_[0]
    pred = model.predict_indices(split.test.users, split.test.items)
    assert pred.min() >= planted.ratings.min() and pred.max() <= planted.ratings.max()
    # no factors: only the damped biases, then biases re-fitted jointly by ALS
    zero = BiasedALS(n_factors=1, epochs=0, progress=False).fit(split.train)
    assert np.isfinite(zero.predict_indices(split.test.users, split.test.items)).all()


def test_biased_partial_fit_replaces_ratings_and_resolves(planted: Interactions, tmp_path: Path) -> None:
    model = BiasedALS(n_factors=6, progress=False).fit(planted)
    # an existing (user, item) pair gets a new, low rating
    row = int(np.flatnonzero(planted.ratings >= 4)[0])
    ui, ii = int(planted.users[row]), int(planted.items[row])
    u, i = planted.user_map.ids[ui], planted.item_map.ids[ii]
    before = model.predict([u], [i])[0]
    loaded = Recommender.load(model.save(tmp_path / "biased"))
    events = pd.DataFrame({"user_id": [u, 10**6, 10**6], "item_id": [i, i, planted.item_map.ids[1]], "rating": [1.0, 5.0, 5.0]})
    model.partial_fit(events)
    loaded.partial_fit(events)
    r = model.ratings_
    assert r[ui, ii] == 1.0 and r.nnz == planted.csr("rating").nnz + 2  # replaced, not added
    assert model.predict([u], [i])[0] < before  # the new low rating pulls the prediction down
    assert model.predict([10**6], [planted.item_map.ids[2]])[0] > model.global_bias_  # a generous new user
    np.testing.assert_array_equal(model.user_factors_, loaded.user_factors_)


def test_implicit_als_learns_planted(planted: Interactions) -> None:
    loo = S.leave_one_out(planted)
    ours = ndcg_of(ImplicitALS(n_factors=16, progress=False), loo.train_valid, loo.test)
    pop = ndcg_of(create_model("pop"), loo.train_valid, loo.test)
    assert ours > 1.5 * pop


@pytest.mark.parametrize("key, value", [("count_scale", 0.0), ("alpha", float("nan")), ("reg", -1.0)])
def test_saved_confidence_terms_are_checked_on_load(planted: Interactions, key: str, value: float) -> None:
    """The fitted confidence terms come from an artifact: a zero unit, a NaN or a negative penalty is one
    ArtifactError, never a model that folds events in with them."""
    model = ImplicitALS(n_factors=4, epochs=1, progress=False).fit(planted)
    state = {**model._state(), key: value}
    with pytest.raises(ArtifactError, match=key):
        ImplicitALS()._load_state(state)
