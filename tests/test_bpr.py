"""BPR: the SGD step by hand, negative sampling, determinism, Hogwild, online updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import ndcg_of
from host_reads import host_reads

from recforge import split as S
from recforge.core.rng import seed_states
from recforge.data import Interactions
from recforge.models import Recommender, create_model
from recforge.models import bpr as bpr_module
from recforge.models.bpr import BPR, _bpr_epoch
from recforge.models.sampling import row_contains, sample_negative
from recforge.neural import block_sgd
from recforge.neural.block_sgd import NegativeSampler, bpr_epoch_torch

NO_POOL = np.empty(0, np.int32)  # uniform negatives


def test_one_sgd_step_by_hand() -> None:
    # user 0 has item 0 of two items, so the negative must be item 1
    seen = sp.csr_matrix(np.array([[1.0, 0.0]], np.float32))
    P = np.array([[0.5, -1.0]], np.float32)
    Q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    bq = np.array([0.2, -0.1], np.float32)
    lr, reg = 0.1, 0.01
    x = 0.2 + 0.1 + 0.5 * 1.0 - 1.0 * -1.0  # b_i - b_j + p·(q_i - q_j) = 1.8
    z = 1 / (1 + np.exp(x))
    exp_P = P[0] + lr * (z * (Q[0] - Q[1]) - reg * P[0])
    exp_Qi = Q[0] + lr * (z * P[0] - reg * Q[0])
    exp_Qj = Q[1] + lr * (-z * P[0] - reg * Q[1])
    exp_b = [bq[0] + lr * (z - reg * bq[0]), bq[1] + lr * (-z - reg * bq[1])]
    loss, skipped = _bpr_epoch(
        np.array([0], np.int32), np.array([0], np.int32), np.array([0], np.int64), seen.indptr, seen.indices,
        P, Q, bq, lr, reg, NO_POOL, seed_states(0, 0, 1),
    )
    assert skipped == 0
    assert loss == pytest.approx(np.log1p(np.exp(-x)), rel=1e-5)
    np.testing.assert_allclose(P[0], exp_P, rtol=1e-5)
    np.testing.assert_allclose(Q[0], exp_Qi, rtol=1e-5)
    np.testing.assert_allclose(Q[1], exp_Qj, rtol=1e-5)
    np.testing.assert_allclose(bq, exp_b, rtol=1e-5)


def test_no_negative_left_is_skipped() -> None:
    seen = sp.csr_matrix(np.ones((1, 3), np.float32))
    P, Q, bq = np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), np.zeros(3, np.float32)
    _, skipped = _bpr_epoch(
        np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int64), seen.indptr, seen.indices,
        P, Q, bq, 0.1, 0.0, NO_POOL, seed_states(0, 0, 1),
    )
    assert skipped == 1 and (P == 1).all()


def test_negative_sampling_is_uniform_over_unseen_items() -> None:
    seen = sp.csr_matrix(np.array([[1, 0, 1, 0, 0, 1, 0, 0]], np.float32))
    states = seed_states(3, 0, 1)
    draws = np.array([sample_negative(states, 0, 8, seen.indptr, seen.indices, 0, True, NO_POOL) for _ in range(5000)])
    counts = np.bincount(draws, minlength=8)
    assert counts[[0, 2, 5]].sum() == 0
    assert np.all(np.abs(counts[[1, 3, 4, 6, 7]] / 5000 - 0.2) < 0.03)
    assert [row_contains(seen.indptr, seen.indices, 0, j) for j in range(8)] == [bool(v) for v in seen.toarray()[0]]
    # without rejection every item can come up
    free = {sample_negative(states, 0, 8, seen.indptr, seen.indices, 0, False, NO_POOL) for _ in range(500)}
    assert free == set(range(8))


def test_loss_decreases_and_learns(planted: Interactions) -> None:
    loo = S.leave_one_out(planted)
    model = BPR(n_factors=16, epochs=30, lr=0.05, progress=False)
    ours = ndcg_of(model, loo.train_valid, loo.test)
    assert model.loss_history_[-1] < 0.6 * model.loss_history_[0]
    assert ours > 1.5 * ndcg_of(create_model("pop"), loo.train_valid, loo.test)


def test_seed_controls_the_result(planted: Interactions) -> None:
    # the CPU kernel: one thread is serial and exactly repeatable (more threads run Hogwild)
    params = {"n_factors": 8, "epochs": 3, "num_threads": 1, "progress": False, "device": "cpu"}
    a = BPR(**params).fit(planted).item_factors_
    b = BPR(**params).fit(planted).item_factors_
    c = BPR(**params, seed=1).fit(planted).item_factors_
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_hogwild_learns_too(planted: Interactions) -> None:
    loo = S.leave_one_out(planted)
    ours = ndcg_of(BPR(n_factors=16, epochs=30, lr=0.05, num_threads=2, progress=False), loo.train_valid, loo.test)
    assert ours > 1.5 * ndcg_of(create_model("pop"), loo.train_valid, loo.test)


def test_partial_fit_moves_towards_the_new_item(planted: Interactions, tmp_path: Path) -> None:
    model = BPR(n_factors=16, epochs=20, lr=0.05, num_threads=1, progress=False).fit(planted)
    user = planted.user_map.ids[0]
    scores = model.score(np.array([0]))[0]
    unseen = np.flatnonzero(model.seen_[0].toarray()[0] == 0)
    target = unseen[np.argmin(scores[unseen])]  # the least liked unseen item
    loaded = Recommender.load(model.save(tmp_path / "bpr"))
    events = pd.DataFrame({"user_id": [user], "item_id": [planted.item_map.ids[target]]})
    model.partial_fit(events)
    after = model.score(np.array([0]))[0]
    assert (after[unseen] > after[target]).mean() < (scores[unseen] > scores[target]).mean()
    assert model.n_updates_ == 1
    # the update is seeded by (seed, update count), which is saved: a loaded model updates identically
    loaded.partial_fit(events)
    np.testing.assert_array_equal(loaded.user_factors_, model.user_factors_)


# ---------------------------------------------------------------------------------------------------- on a device
DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_one_step_on_a_device_is_the_cpu_kernels_step(device: torch.device) -> None:
    seen = sp.csr_matrix(np.array([[1.0, 0.0]], np.float32))
    P = np.array([[0.5, -1.0]], np.float32)
    Q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    bq = np.array([0.2, -0.1], np.float32)
    tensors = [torch.from_numpy(a.copy()).to(device) for a in (P, Q, bq)]
    sampler = NegativeSampler(seen, NO_POOL, device, torch.Generator(device=device).manual_seed(0))
    one = torch.zeros(1, dtype=torch.int64, device=device)
    loss, skipped = bpr_epoch_torch(one, one, sampler, *tensors, 0.1, 0.01)
    want_loss, _ = _bpr_epoch(np.array([0], np.int32), np.array([0], np.int32), np.array([0], np.int64), seen.indptr,
                              seen.indices, P, Q, bq, 0.1, 0.01, NO_POOL, seed_states(0, 0, 1))
    assert skipped == 0 and loss == pytest.approx(want_loss, rel=1e-5)
    for got, want in zip(tensors, (P, Q, bq)):
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_device_negatives_are_uniform_over_unseen_items_or_none(device: torch.device) -> None:
    seen = sp.csr_matrix(np.array([[1, 0, 1, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.float32))
    sampler = NegativeSampler(seen, NO_POOL, device, torch.Generator(device=device).manual_seed(1))
    draws = sampler(torch.zeros(5000, dtype=torch.int64, device=device)).cpu().numpy()
    counts = np.bincount(draws, minlength=8)
    assert counts[[0, 2, 5]].sum() == 0 and np.all(np.abs(counts[[1, 3, 4, 6, 7]] / 5000 - 0.2) < 0.03)
    assert (sampler(torch.ones(3, dtype=torch.int64, device=device)).cpu().numpy() == -1).all()  # has every item


def test_the_device_sampler_reads_back_once_a_sparse_block_and_redraws_a_dense_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A host read makes a GPU wait: a block of sparse users needs one, however many samples; a user who has every
    item but one still gets that one, after a few more reads."""
    reads = host_reads(monkeypatch)
    rng = np.random.default_rng(0)
    sparse = sp.csr_matrix((np.ones(3000), (np.repeat(np.arange(1000), 3), rng.integers(0, 5000, 3000))), shape=(1000, 5000))
    sampler = NegativeSampler(sparse, NO_POOL, torch.device("cpu"), torch.Generator().manual_seed(0))
    users = rng.integers(0, 1000, 4096)
    draws = sampler(torch.from_numpy(users))
    assert reads == ["__bool__"]
    assert not sparse[users, draws.numpy().copy()].any()
    reads.clear()
    dense = sp.csr_matrix(np.array([[1] * 7 + [0]], np.float32))
    sampler = NegativeSampler(dense, NO_POOL, torch.device("cpu"), torch.Generator().manual_seed(0))
    draws = sampler(torch.zeros(64, dtype=torch.int64))
    assert 1 <= len(reads) <= 5 and (draws.numpy() == 7).all()


def test_a_device_epoch_reads_back_once_a_block_on_sparse_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block loop queues its work without waiting on the device, but for the sampler's one look a block; a
    sample left without a negative steps by zero and is counted."""
    rng = np.random.default_rng(1)
    n_users, n_items, n = 2000, 3000, 40_000
    users, items = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    seen = sp.csr_matrix((np.ones(n), (users, items)), shape=(n_users, n_items))
    seen.data[:] = 1
    full = sp.vstack([seen, sp.csr_matrix(np.ones((1, n_items)))]).tocsr()  # one more user, who has every item
    sampler = NegativeSampler(full, NO_POOL, torch.device("cpu"), torch.Generator().manual_seed(0))
    factors = [torch.from_numpy(rng.normal(0, 0.1, shape).astype(np.float32)) for shape in
               ((n_users + 1, 8), (n_items, 8), (n_items,))]
    reads = host_reads(monkeypatch)
    t_users = torch.from_numpy(np.append(users, n_users))
    loss, skipped = bpr_epoch_torch(t_users, torch.from_numpy(np.append(items, 0)), sampler, *factors, 0.05, 0.01)
    blocks = -(-(n + 1) // block_sgd.block_size(n + 1))
    assert skipped == 1 and np.isfinite(loss)
    # a look a block, four more in the block of the user who has every item; then the epoch's two totals
    assert blocks <= reads.count("__bool__") <= blocks + 4 and len(reads) - reads.count("__bool__") == 2


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_bpr_on_a_device_learns_as_well_as_on_the_cpu(planted: Interactions, device: torch.device,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path (blocks of simultaneous updates; torch on ``device``) reaches the CPU kernel's accuracy."""
    loo = S.leave_one_out(planted)
    params = {"n_factors": 16, "epochs": 30, "lr": 0.05, "progress": False}
    cpu = ndcg_of(BPR(**params, num_threads=1, device="cpu"), loo.train_valid, loo.test)
    monkeypatch.setattr(bpr_module, "device_for_work", lambda *args: device)
    model = BPR(**params)
    ours = ndcg_of(model, loo.train_valid, loo.test)
    assert model.loss_history_[-1] < 0.6 * model.loss_history_[0]
    assert ours > 0.9 * cpu, (ours, cpu)


def test_an_epoch_takes_200_to_1000_blocks_of_at_most_4096_samples_between() -> None:
    assert [block_sgd.block_size(n) for n in (50, 5_670, 819_200, 2_000_000, 10_000_000)] == [1, 28, 4096, 4096,
                                                                                                   10_000]
