"""FunkSVD and SVD++: hand-checked SGD steps, the per-user SVD++ epoch against rating-by-rating SGD, learning,
partial_fit and parameter checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from host_reads import host_reads

from recforge import split as S
from recforge.core.rng import seed_states, shuffle_in_place
from recforge.data import Interactions
from recforge.evaluation import evaluate
from recforge.models import Recommender, create_model, sgd_mf
from recforge.models.als import BiasedALS
from recforge.models.sgd_mf import FunkSVD, SVDpp, _funk_epoch, _svdpp_epoch
from recforge.neural import block_sgd
from recforge.neural.block_sgd import funk_epoch_torch


def test_funk_step_by_hand() -> None:
    """One rating, one step: every update is the textbook SGD formula."""
    P = np.array([[0.1, -0.2]])
    Q = np.array([[0.3, 0.4]])
    bu, bi = np.array([0.05]), np.array([-0.1])
    mu, lr, reg, lr_b, reg_b = 3.0, 0.1, 0.2, 0.05, 0.3
    e = 4.0 - (mu + 0.05 - 0.1 + (0.03 - 0.08))
    exp_p = P[0] + lr * (e * Q[0] - reg * P[0])
    exp_q = Q[0] + lr * (e * P[0] - reg * Q[0])
    exp_bu = 0.05 + lr_b * (e - reg_b * 0.05)
    exp_bi = -0.1 + lr_b * (e + reg_b * 0.1)
    one = np.zeros(1, np.int32)
    mse = _funk_epoch(one, one, np.array([4.0]), np.zeros(1, np.int64), P, Q, bu, bi, mu, lr, reg, lr_b,
                      np.array([reg_b]), np.array([reg_b]), 0)
    assert mse == pytest.approx(e * e)
    np.testing.assert_allclose(P[0], exp_p)
    np.testing.assert_allclose(Q[0], exp_q)
    assert bu[0] == pytest.approx(exp_bu) and bi[0] == pytest.approx(exp_bi)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_torch_funk_epoch_in_blocks_of_one_is_the_numba_epoch(device: str) -> None:
    """Below 400 ratings a block holds one rating, so the GPU epoch (run here on ``device``) is the serial SGD of
    the CPU kernel in the same order."""
    rng = np.random.default_rng(4)
    users, items = rng.integers(0, 20, 150).astype(np.int32), rng.integers(0, 15, 150).astype(np.int32)
    ratings = rng.normal(0.0, 1.0, 150)
    P, Q = rng.normal(0, 0.1, (20, 4)), rng.normal(0, 0.1, (15, 4))
    bu, bi = rng.normal(0, 0.1, 20), rng.normal(0, 0.1, 15)
    reg_u, reg_i = rng.uniform(0.01, 0.1, 20), rng.uniform(0.01, 0.1, 15)
    dev = torch.device(device)
    t = lambda a: torch.from_numpy(a).to(dev)
    params = tuple(t(a.copy()) for a in (P, Q, bu, bi))
    mse = funk_epoch_torch(t(users.astype(np.int64)), t(items.astype(np.int64)), t(ratings),
                           torch.Generator(device=dev).manual_seed(3), params, lr=0.05, reg=0.02, lr_bias=0.03,
                           bias_reg=(t(reg_u), t(reg_i)))
    order = torch.randperm(150, device=dev, generator=torch.Generator(device=dev).manual_seed(3)).cpu().numpy()
    expected = _funk_epoch(users, items, ratings, order, P, Q, bu, bi, 0.0, 0.05, 0.02, 0.03, reg_u, reg_i, 0)
    assert mse == pytest.approx(expected, rel=1e-12)
    for got, want in zip(params, (P, Q, bu, bi)):
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-10, atol=1e-12)


def test_a_torch_funk_epoch_reads_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting a block's users and items (for the step cap) waits on no host read: the epoch's one read is its
    error, at the end."""
    rng = np.random.default_rng(5)
    users, items = torch.from_numpy(rng.integers(0, 300, 20_000)), torch.from_numpy(rng.integers(0, 200, 20_000))
    params = tuple(torch.from_numpy(rng.normal(0, 0.1, shape)) for shape in ((300, 4), (200, 4), (300,), (200,)))
    reads = host_reads(monkeypatch)
    mse = funk_epoch_torch(users, items, torch.from_numpy(rng.normal(0, 1, 20_000)), torch.Generator().manual_seed(0),
                           params, lr=0.01, reg=0.02, lr_bias=0.01,
                           bias_reg=(torch.full((300,), 0.02, dtype=torch.float64), torch.full((200,), 0.02, dtype=torch.float64)))
    assert reads == ["__float__"] and 0.5 < mse < 2.0


def test_funk_svd_in_blocks_learns_as_the_serial_kernel(planted: Interactions, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's GPU path (torch on the CPU here): blocks of simultaneous updates reach the serial kernel's error
    and keep the fitted state's types."""
    split = S.random_split(planted, 0.2, seed=1)
    serial = FunkSVD(n_factors=16, progress=False).fit(split.train)
    monkeypatch.setattr(sgd_mf, "device_for_work", lambda *args: torch.device("cpu"))
    blocks = FunkSVD(n_factors=16, progress=False).fit(split.train)
    bias = create_model("bias").fit(split.train)

    def rmse(m: Recommender) -> float:
        return float(np.sqrt(np.mean((m.predict_indices(split.test.users, split.test.items) - split.test.ratings) ** 2)))

    assert rmse(blocks) < rmse(bias)
    assert rmse(blocks) == pytest.approx(rmse(serial), abs=0.005)  # 0.9059 against 0.9057
    assert not np.array_equal(blocks.user_factors_, serial.user_factors_)  # the torch path did run
    assert blocks.user_factors_.dtype == np.float32 and blocks.loss_history_[-1] < blocks.loss_history_[0]


def test_funk_blocks_stay_stable_when_an_item_fills_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """An item with 30% of the ratings appears ~600 times in a block of 2,000: summed, its stale steps overshot and
    the fit went to NaN; averaged, the blocks track the serial kernel."""
    rng = np.random.default_rng(0)
    n = 20_000
    items = np.where(rng.random(n) < 0.3, 0, rng.integers(1, 300, n))
    frame = pd.DataFrame({"user_id": rng.integers(0, 20_000, n), "item_id": items,
                          "rating": np.clip(np.round(3.5 + 0.8 * rng.standard_normal(n) + 0.5 * (items == 0)), 1, 5)})
    data = Interactions.from_frame(frame.drop_duplicates(["user_id", "item_id"]))
    serial = FunkSVD(n_factors=8, epochs=4, progress=False).fit(data)
    monkeypatch.setattr(sgd_mf, "device_for_work", lambda *args: torch.device("cpu"))
    monkeypatch.setattr(block_sgd, "block_size", lambda n_samples: 2_000)
    blocks = FunkSVD(n_factors=8, epochs=4, progress=False).fit(data)
    assert np.isfinite(blocks.loss_history_).all() and blocks.loss_history_[-1] < blocks.loss_history_[0]
    np.testing.assert_allclose(blocks.loss_history_, serial.loss_history_, rtol=0.02)


def test_funk_frozen_items_do_not_move() -> None:
    P, Q = np.full((1, 2), 0.1), np.full((2, 2), 0.2)
    bu, bi = np.zeros(1), np.zeros(2)
    Q0, bi0 = Q.copy(), bi.copy()
    users, items = np.zeros(2, np.int32), np.array([0, 1], np.int32)
    _funk_epoch(users, items, np.array([5.0, 1.0]), np.arange(2), P, Q, bu, bi, 3.0, 0.1, 0.0, 0.1, np.zeros(1),
                np.zeros(2), 1)
    np.testing.assert_array_equal(Q[0], Q0[0])  # item 0 is below item_start: fixed
    assert bi[0] == bi0[0] and not np.array_equal(Q[1], Q0[1]) and bi[1] != 0


def _svdpp_reference(indptr, items, ratings, user_order, P, Q, Y, bu, bi, mu, lr, reg, lr_b, reg_b, reg_y, states):
    """Rating-by-rating SVD++ SGD (every y_j updated after every rating), in the kernel's visiting order."""
    for u in user_order:
        lo, hi = indptr[u], indptr[u + 1]
        if hi == lo:
            continue
        pos = np.arange(lo, hi, dtype=np.int64)
        shuffle_in_place(pos, states)
        N = items[lo:hi]
        norm = 1 / np.sqrt(hi - lo)
        for idx in pos:
            i = items[idx]
            z = norm * Y[N].sum(axis=0)
            e = ratings[idx] - (mu + bu[u] + bi[i] + Q[i] @ (P[u] + z))
            bu[u] += lr_b * (e - reg_b * bu[u])
            bi[i] += lr_b * (e - reg_b * bi[i])
            p, q = P[u].copy(), Q[i].copy()
            P[u] = p + lr * (e * q - reg * p)
            Q[i] = q + lr * (e * (p + z) - reg * q)
            Y[N] += lr * (e * norm * q[None, :] - reg_y * Y[N])


def test_svdpp_epoch_equals_rating_by_rating_sgd() -> None:
    """The O(nnz·k) per-user epoch gives the same parameters as naive SVD++ SGD over the same order."""
    rng = np.random.default_rng(0)
    n_users, n_items, k = 5, 7, 3
    dense = rng.random((n_users, n_items)) < 0.6
    dense[4] = False  # a user without ratings is skipped
    indptr = np.concatenate([[0], np.cumsum(dense.sum(axis=1))]).astype(np.int64)
    items = np.nonzero(dense)[1].astype(np.int32)
    ratings = rng.integers(1, 6, len(items)).astype(np.float64)
    P, Q, Y = (rng.normal(0, 0.3, (n, k)) for n in (n_users, n_items, n_items))
    bu, bi = rng.normal(0, 0.1, n_users), rng.normal(0, 0.1, n_items)
    args = (3.2, 0.05, 0.1, 0.03, 0.2, 0.3)
    ref = [a.copy() for a in (P, Q, Y, bu, bi)]
    order = np.array([3, 0, 4, 2, 1], np.int64)
    _svdpp_reference(indptr, items, ratings, order, *ref[:3], *ref[3:], args[0], *args[1:], seed_states(5, 0, 1))
    _svdpp_epoch(indptr, items, ratings, order, P, Q, Y, bu, bi, *args, seed_states(5, 0, 1))
    for got, want in zip((P, Q, Y, bu, bi), ref):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [FunkSVD, SVDpp])
def test_loss_decreases_and_beats_bias(cls: type, planted: Interactions) -> None:
    split = S.random_split(planted, 0.2, seed=3)
    model = cls(progress=False).fit(split.train)
    hist = np.array(model.loss_history_)
    assert len(hist) == model.epochs and hist[-1] < 0.8 * hist[0] and np.all(np.diff(hist[:10]) < 0)
    ours = evaluate(model, split.test)["rmse"]
    bias = evaluate(create_model("bias").fit(split.train), split.test)["rmse"]
    assert ours < bias - 0.01


def test_damping_shrinks_the_biases_of_rows_with_few_ratings(planted: Interactions) -> None:
    """One pass puts ``bias_reg·n + damping`` on a bias: per visit ``bias_reg + damping/n``, so a user or item
    with a single rating is shrunk hard and one with hundreds barely."""
    model = FunkSVD(bias_reg=0.05, damping=5.0)
    per_user, per_item = model._bias_penalties(np.array([1, 4, 0]), np.array([100]))
    np.testing.assert_allclose(per_user, [5.05, 1.3, 5.05])
    np.testing.assert_allclose(per_item, [0.1])
    frame = planted.to_frame()
    one = frame.groupby("user_id").head(1).assign(user_id=lambda f: f["user_id"] + 10**6, rating=5.0)
    data = Interactions.from_frame(pd.concat([frame, one]))  # every user has a twin with one 5-star rating
    twins = data.user_map.to_index(one["user_id"].to_numpy())
    loose = FunkSVD(damping=0.0, progress=False).fit(data).user_bias_[twins]
    damped = FunkSVD(progress=False).fit(data).user_bias_[twins]
    assert np.abs(damped).mean() < 0.6 * np.abs(loose).mean()


def test_predictions_clamped_and_unknowns(planted: Interactions) -> None:
    model = FunkSVD(epochs=5, progress=False).fit(planted)
    pred = model.predict_indices(np.repeat(np.arange(50), 40), np.tile(np.arange(40), 50))
    assert pred.min() >= 1 and pred.max() <= 5
    # Unknown user: global mean + item bias.
    assert model.predict_indices(np.array([-1]), np.array([0]))[0] == pytest.approx(
        np.clip(model.global_bias_ + model.item_bias_[0], 1, 5), rel=1e-6
    )


def test_svdpp_user_factors_include_implicit_term(planted: Interactions) -> None:
    model = SVDpp(epochs=3, progress=False).fit(planted)
    u = 7
    rated = model.seen_[u].indices
    z = model.item_implicit_[rated].astype(np.float64).sum(axis=0) / np.sqrt(len(rated))
    np.testing.assert_allclose(model.user_factors_[u], model.user_explicit_[u] + z, rtol=1e-4, atol=1e-6)


def _new_user_events(planted: Interactions) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    cluster = planted.item_data["cluster"].to_numpy()
    home = planted.item_map.ids[cluster == 0]
    away = planted.item_map.ids[cluster != 0]
    events = pd.DataFrame(
        {"user_id": 10**6, "item_id": np.concatenate([home[:10], away[:10]]), "rating": [5.0] * 10 + [1.0] * 10}
    )
    return events, home[10:], away[10:]


@pytest.mark.parametrize("cls", [FunkSVD, SVDpp])
def test_partial_fit_folds_in_a_new_user(cls: type, planted: Interactions, tmp_path: Path) -> None:
    model = cls(progress=False).fit(planted)
    item_factors = model.item_factors_.copy()
    events, home, away = _new_user_events(planted)
    model.partial_fit(events)
    # Items the model knew keep their rows; the new user likes the unseen items of its home cluster more.
    np.testing.assert_array_equal(model.item_factors_, item_factors)
    p_home = model.predict([10**6] * len(home), home).mean()
    p_away = model.predict([10**6] * len(away), away).mean()
    assert p_home > p_away + 0.5, (p_home, p_away)
    loaded = Recommender.load(model.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.predict([10**6], home[:1]), model.predict([10**6], home[:1]))


def test_partial_fit_new_item_learns_its_bias(planted: Interactions) -> None:
    model = FunkSVD(epochs=10, progress=False).fit(planted)
    users = planted.user_map.ids[:30]
    model.partial_fit(pd.DataFrame({"user_id": users, "item_id": 10**7, "rating": 5.0}))
    assert model.item_bias_[-1] > 0.3
    assert model.predict([users[0]], [10**7])[0] > model.global_bias_ + 0.3


def test_svdpp_state_round_trip_then_partial_fit(planted: Interactions, tmp_path: Path) -> None:
    model = SVDpp(epochs=5, progress=False).fit(planted)
    loaded = Recommender.load(model.save(tmp_path / "svdpp"))
    np.testing.assert_array_equal(loaded.item_implicit_, model.item_implicit_)
    events, _, _ = _new_user_events(planted)
    a = model.partial_fit(events).predict([10**6] * 5, planted.item_map.ids[:5])
    b = loaded.partial_fit(events).predict([10**6] * 5, planted.item_map.ids[:5])
    np.testing.assert_array_equal(a, b)


def test_aliases() -> None:
    assert type(create_model("svd")) is FunkSVD and type(create_model("biasedmf-sgd")) is FunkSVD
    assert type(create_model("svd++")) is SVDpp


def test_svdpp_partial_fit_leaves_other_users_alone(planted: Interactions) -> None:
    model = SVDpp(epochs=5, progress=False).fit(planted)
    before = model.user_factors_.copy()
    events, _, _ = _new_user_events(planted)
    events = pd.concat([events, pd.DataFrame({"user_id": [planted.user_map.ids[3]], "item_id": [10**7], "rating": [4.0]})])
    model.partial_fit(events)
    untouched = np.setdiff1d(np.arange(planted.n_users), [3])
    np.testing.assert_array_equal(model.user_factors_[untouched], before[untouched])
    assert not np.array_equal(model.user_factors_[3], before[3])
    # User 3's implicit term now includes the new item (whose y starts at zero): |N(u)| grew by one.
    rated = model.seen_[3].indices
    z = model.item_implicit_[rated].astype(np.float64).sum(axis=0) / np.sqrt(len(rated))
    np.testing.assert_allclose(model.user_factors_[3], model.user_explicit_[3] + z, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [FunkSVD, SVDpp, BiasedALS])
def test_any_rating_scale_learns_the_same_model(cls: type, planted: Interactions) -> None:
    """Ratings on another scale (a·r + b: −10…10 for jokes, 1–10 for books) give the same model, rescaled: the
    defaults mean the same on any scale, so the model keeps its lead over the bias baseline there too."""
    frame = planted.to_frame()
    stretched = Interactions.from_frame(frame.assign(rating=5.0 * frame["rating"] - 15.0))
    params = {"epochs": 15, "n_factors": 16, "progress": False}
    small = cls(**params).fit(planted)
    wide = cls(**params).fit(stretched)
    assert wide.rating_scale_ == pytest.approx(5 * small.rating_scale_)
    users, items = planted.user_map.ids[planted.users[:500]], planted.item_map.ids[planted.items[:500]]
    np.testing.assert_allclose(wide.predict(users, items), 5 * small.predict(users, items) - 15, atol=2e-3)
    split = S.random_split(stretched, 0.2, seed=3)  # the defaults, as in test_loss_decreases_and_beats_bias
    ours = evaluate(cls(progress=False).fit(split.train), split.test)["rmse"]
    bias = evaluate(create_model("bias").fit(split.train), split.test)["rmse"]
    assert ours < bias - 0.05  # 5× the margin on the 1-5 scale
