"""PointwiseMF: loss gradients checked numerically, class weights, learning, online click updates."""

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
from recforge.models import pointwise as pointwise_module
from recforge.models.pointwise import PointwiseMF, _pointwise_epoch, loss_and_grad
from recforge.neural import block_sgd
from recforge.neural.block_sgd import NegativeSampler, focal_loss_and_grad, pointwise_epoch_torch


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("y", [0.0, 0.1, 0.75, 1.0])
def test_gradient_matches_finite_differences(gamma: float, y: float) -> None:
    for s in (-6.0, -1.3, 0.0, 0.4, 3.0, 25.0):
        loss, grad = loss_and_grad(s, y, gamma)
        h = 1e-5
        numeric = (loss_and_grad(s + h, y, gamma)[0] - loss_and_grad(s - h, y, gamma)[0]) / (2 * h)
        assert grad == pytest.approx(numeric, rel=1e-4, abs=1e-7), (s, y, gamma)
        assert np.isfinite(loss) and loss >= 0


def test_bce_and_focal_by_hand() -> None:
    s, p = 0.8, 1 / (1 + np.exp(-0.8))
    loss, grad = loss_and_grad(s, 1.0, 0.0)
    assert loss == pytest.approx(-np.log(p)) and grad == pytest.approx(p - 1)
    loss, grad = loss_and_grad(s, 0.25, 0.0)  # soft label: BCE gradient stays p - y
    assert grad == pytest.approx(p - 0.25)
    focal, _ = loss_and_grad(s, 1.0, 2.0)
    assert focal == pytest.approx(-((1 - p) ** 2) * np.log(p))  # easy positives are down-weighted
    assert loss_and_grad(-40.0, 1.0, 0.0)[0] == pytest.approx(40.0)  # no overflow far out


def test_learns_planted_and_loss_decreases(planted: Interactions) -> None:
    loo = S.leave_one_out(planted)
    pop = ndcg_of(create_model("pop"), loo.train_valid, loo.test)
    model = PointwiseMF(n_factors=16, epochs=10, progress=False)
    assert ndcg_of(model, loo.train_valid, loo.test) > 1.5 * pop
    assert model.loss_history_[-1] < model.loss_history_[0]
    # the notebook's recipe: focal loss, label smoothing, balanced classes, plain SGD
    notebook = PointwiseMF(n_factors=16, epochs=10, loss="focal", label_smoothing=0.5, pos_weight=None,
                           optimizer="sgd", lr=0.05, progress=False)
    assert ndcg_of(notebook, loo.train_valid, loo.test) > 1.5 * pop


def test_seed_and_threads(planted: Interactions) -> None:
    params = {"n_factors": 8, "epochs": 2, "progress": False, "device": "cpu"}  # the CPU kernel
    a = PointwiseMF(**params, num_threads=1).fit(planted).item_factors_
    b = PointwiseMF(**params, num_threads=1).fit(planted).item_factors_
    np.testing.assert_array_equal(a, b)  # one thread: serial and exactly repeatable
    c = PointwiseMF(**params, seed=5, num_threads=1).fit(planted).item_factors_
    assert not np.array_equal(a, c)
    hog = PointwiseMF(**params, num_threads=2).fit(planted)
    assert np.isfinite(hog.item_factors_).all()


def test_class_weight_shifts_the_global_bias(planted: Interactions) -> None:
    # With balanced classes the model's base rate sits near 1/2; unweighted, near the 1/(1+n_neg) prior.
    balanced = PointwiseMF(n_factors=4, epochs=5, n_negatives=4, pos_weight=None, progress=False).fit(planted)
    plain = PointwiseMF(n_factors=4, epochs=5, n_negatives=4, pos_weight=1.0, progress=False).fit(planted)
    assert balanced.global_bias_ > plain.global_bias_ + 0.5


def test_online_click_updates(planted: Interactions, tmp_path: Path) -> None:
    model = PointwiseMF(n_factors=16, epochs=5, progress=False).fit(planted)
    scores = model.score(np.array([0]))[0]
    unseen = np.flatnonzero(model.seen_[0].toarray()[0] == 0)
    clicked = unseen[np.argmin(scores[unseen])]
    loaded = Recommender.load(model.save(tmp_path / "pw"))
    np.testing.assert_array_equal(loaded.grad_sq_item_, model.grad_sq_item_)  # Adagrad state persists
    click = pd.DataFrame({"user_id": [planted.user_map.ids[0]], "item_id": [planted.item_map.ids[clicked]]})
    model.partial_fit(click)
    after = model.score(np.array([0]))[0]
    assert after[clicked] - np.median(after[unseen]) > scores[clicked] - np.median(scores[unseen])
    loaded.partial_fit(click)
    np.testing.assert_array_equal(loaded.item_factors_, model.item_factors_)
    # a brand-new user and item grow every array, accumulators included
    model.partial_fit(pd.DataFrame({"user_id": [10**6], "item_id": [10**7]}))
    assert model.grad_sq_user_.shape == model.user_factors_.shape
    assert model.grad_sq_item_bias_.shape == model.item_bias_.shape


# ---------------------------------------------------------------------------------------------------- on a device
DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def test_device_loss_and_gradient_equal_the_cpu_kernels() -> None:
    s = torch.tensor([-30.0, -6.0, -1.3, 0.0, 0.4, 3.0, 25.0], dtype=torch.float64)
    for gamma in (0.0, 0.5, 2.0):
        for y in (0.0, 0.1, 1.0):
            loss, grad = focal_loss_and_grad(s, torch.full_like(s, y), gamma)
            want = np.array([loss_and_grad(float(v), y, gamma) for v in s])
            np.testing.assert_allclose(loss.numpy(), want[:, 0], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(grad.numpy(), want[:, 1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_one_step_on_a_device_is_the_cpu_kernels_step(device: torch.device, optimizer: str) -> None:
    rng = np.random.default_rng(0)
    host = [rng.normal(size=(1, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32),
            np.array([0.1], np.float32), np.array([0.2, -0.3], np.float32), np.array([0.05], np.float32)]
    squares = [np.full_like(a, 0.5) for a in host]
    seen = sp.csr_matrix(np.array([[0.0, 1.0]], np.float32))
    tensors = [torch.from_numpy(a.copy()).to(device) for a in host]
    t_squares = [torch.from_numpy(a.copy()).to(device) for a in squares] if optimizer == "adagrad" else None
    sampler = NegativeSampler(seen, np.empty(0, np.int32), device, torch.Generator(device=device).manual_seed(0))
    one = torch.ones(1, dtype=torch.int64, device=device)
    got = pointwise_epoch_torch(torch.zeros_like(one), one, sampler, tuple(tensors),
                                None if t_squares is None else tuple(t_squares), lr=0.1, reg=0.01, bias_reg=0.02,
                                n_negatives=0, labels=(0.9, 0.1), pos_weight=2.0, gamma=0.5, reject_seen=True)
    want = _pointwise_epoch(np.zeros(1, np.int32), np.ones(1, np.int32), np.zeros(1, np.int64), seen.indptr,
                            seen.indices, *host, *squares, 0.1, 0.01, 0.02, 0, 0.9, 0.1, 2.0, 0.5,
                            optimizer == "adagrad", True, np.empty(0, np.int32), seed_states(0, 0, 1))
    assert got == pytest.approx(want, rel=1e-5)
    for tensor, array in zip(tensors, host):
        np.testing.assert_allclose(tensor.cpu().numpy(), array, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_a_device_epoch_reads_back_once_a_block_and_masks_missing_negatives(monkeypatch: pytest.MonkeyPatch,
                                                                          optimizer: str) -> None:
    """Sparse users: one host read a block (the sampler's look). A user who has every item gets no negatives, and
    its step is that of its positives alone, as when the block holds no negative samples at all."""
    rng = np.random.default_rng(2)
    n_users, n_items, n = 1000, 2000, 20_000
    users, items = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    seen = sp.csr_matrix((np.ones(n), (users, items)), shape=(n_users, n_items))
    host = [rng.normal(0, 0.1, shape).astype(np.float32) for shape in ((n_users, 4), (n_items, 4), (n_users,),
                                                                      (n_items,), (1,))]
    params = tuple(torch.from_numpy(a.copy()) for a in host)
    squares = tuple(torch.full_like(a, 0.1) for a in params) if optimizer == "adagrad" else None
    sampler = NegativeSampler(seen, np.empty(0, np.int32), torch.device("cpu"), torch.Generator().manual_seed(0))
    kwargs = {"lr": 0.05, "reg": 0.01, "bias_reg": 0.01, "labels": (1.0, 0.0), "pos_weight": 1.0, "gamma": 0.0,
              "reject_seen": True}
    reads = host_reads(monkeypatch)
    loss = pointwise_epoch_torch(torch.from_numpy(users), torch.from_numpy(items), sampler, params, squares,
                                 n_negatives=2, **kwargs)
    blocks = -(-n // block_sgd.block_size(n))
    assert np.isfinite(loss) and reads.count("__bool__") == blocks and len(reads) == blocks + 1
    full = sp.csr_matrix(np.ones((1, 3), np.float32))
    one = torch.zeros(1, dtype=torch.int64)
    for n_negatives in (3, 0):  # every negative missing, or none asked for: the same epoch
        got = [torch.from_numpy(a.copy()) for a in (host[0][:1], host[1][:3], host[2][:1], host[3][:3], host[4])]
        sampler = NegativeSampler(full, np.empty(0, np.int32), torch.device("cpu"), torch.Generator().manual_seed(0))
        acc = tuple(torch.full_like(a, 0.1) for a in got) if optimizer == "adagrad" else ()
        result = (pointwise_epoch_torch(one, one + 1, sampler, tuple(got), acc or None, n_negatives=n_negatives,
                                        **kwargs), *[a.clone() for a in (*got, *acc)])  # Adagrad's sums too
        if n_negatives:
            masked = result
        else:
            assert result[0] == pytest.approx(masked[0], rel=1e-6)
            for a, b in zip(result[1:], masked[1:]):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_pointwise_on_a_device_learns_as_well_as_on_the_cpu(planted: Interactions, device: torch.device,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path (torch on ``device``) reaches the CPU kernel's accuracy with Adagrad and with the notebook's
    plain-SGD recipe, whose shared global bias once overshot when a block summed its steps."""
    loo = S.leave_one_out(planted)
    recipe = {"loss": "focal", "label_smoothing": 0.5, "pos_weight": None, "optimizer": "sgd", "lr": 0.05}
    for extra in ({}, recipe):
        params = {"n_factors": 16, "epochs": 10, "progress": False, **extra}
        cpu = ndcg_of(PointwiseMF(**params, num_threads=1, device="cpu"), loo.train_valid, loo.test)
        with monkeypatch.context() as patch:
            patch.setattr(pointwise_module, "device_for_work", lambda *args: device)
            model = PointwiseMF(**params)
            ours = ndcg_of(model, loo.train_valid, loo.test)
        # label smoothing 0.5 leaves a high floor under the recipe's loss
        assert model.loss_history_[-1] < (0.95 if extra else 0.8) * model.loss_history_[0]
        assert ours > 0.9 * cpu, (extra, ours, cpu)
    assert model.grad_sq_item_.sum() == 0  # plain SGD leaves the Adagrad accumulators alone
