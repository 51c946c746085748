"""Blend: the stacking weights, refitting on all data, composite persistence, partial_fit and parameter checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from recforge import split as S
from recforge.data import Interactions
from recforge.errors import ParameterError, UnsupportedError
from recforge.evaluation import evaluate
from recforge.models import Recommender, create_model
from recforge.models.blend import Blend, _nonneg_least_squares

FAST = {"funksvd": {"epochs": 30, "n_factors": 20}, "svdpp": {"epochs": 20, "n_factors": 20}}


def test_nonneg_least_squares_by_hand() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(3, 1, (200, 3))
    w, b = _nonneg_least_squares(X[:, :2], 0.5 + 0.3 * X[:, 0] + 0.7 * X[:, 1])
    np.testing.assert_allclose(w, [0.3, 0.7], atol=1e-10)
    assert b == pytest.approx(0.5)
    w, _ = _nonneg_least_squares(X, 0.5 + 0.3 * X[:, 0] + 0.7 * X[:, 1] - 0.4 * X[:, 2])
    assert w[2] == 0 and np.all(w >= 0)  # the negative weight is clipped to zero


@pytest.fixture(scope="module")
def split(planted: Interactions) -> S.Split:
    return S.random_split(planted, 0.2, seed=1)


@pytest.fixture(scope="module")
def blend(split: S.Split) -> Blend:
    return Blend(models=["svdpp", "funksvd", "bias"], params=FAST, progress=False).fit(split.train)


def test_blend_learns_weights_and_beats_members(blend: Blend, split: S.Split) -> None:
    assert blend.weights_.shape == (3,) and np.all(blend.weights_ >= 0) and blend.weights_.sum() > 0.5
    # Least squares with a free intercept can always pick one member alone, so on the validation rows the
    # blend is at least as good as its best member.
    members = {k: v for k, v in blend.valid_rmse_.items() if k != "blend"}
    assert blend.valid_rmse_["blend"] <= min(members.values()) + 1e-9
    ours = evaluate(blend, split.test)["rmse"]
    for member in blend.members_:
        assert ours < evaluate(member, split.test)["rmse"] + 0.005
    assert ours < evaluate(create_model("bias").fit(split.train), split.test)["rmse"] - 0.02


def test_members_are_refitted_on_all_data(blend: Blend, split: S.Split) -> None:
    alone = create_model("funksvd", **FAST["funksvd"], progress=False).fit(split.train)
    member = blend.members_[1]
    assert member.name == "funksvd" and member.get_params() == alone.get_params()
    np.testing.assert_array_equal(member.item_factors_, alone.item_factors_)
    pred = blend.predict_indices(split.test.users, split.test.items)
    by_hand = blend.intercept_ + sum(
        w * m.predict_indices(split.test.users, split.test.items).astype(np.float64)
        for w, m in zip(blend.weights_, blend.members_)
    )
    np.testing.assert_allclose(pred, np.clip(by_hand, 1, 5), rtol=1e-6)


def test_save_load_composite(blend: Blend, split: S.Split, tmp_path: Path) -> None:
    path = blend.save(tmp_path / "blend")
    arrays = load_file(str(path / "arrays.safetensors"))
    assert {"m0.user_factors", "m0.item_implicit", "m1.item_factors", "m2.user_bias", "weights"} <= set(arrays)
    meta = json.loads((path / "model.json").read_text())
    assert [m["name"] for m in json.loads(meta["scalars"]["members"])] == ["svdpp", "funksvd", "bias"]
    loaded = Recommender.load(path)
    assert isinstance(loaded, Blend) and [m.name for m in loaded.members_] == ["svdpp", "funksvd", "bias"]
    np.testing.assert_array_equal(
        loaded.predict_indices(split.test.users, split.test.items), blend.predict_indices(split.test.users, split.test.items)
    )
    np.testing.assert_array_equal(loaded.score(np.arange(10)), blend.score(np.arange(10)))
    assert loaded.members_[0].seen_ is loaded.seen_


def test_partial_fit_when_every_member_supports_it(planted: Interactions, tmp_path: Path) -> None:
    model = Blend(models=["funksvd", "svdpp"], params=FAST, progress=False).fit(planted)
    assert model.supports_partial_fit
    cluster = planted.item_data["cluster"].to_numpy()
    home, away = planted.item_map.ids[cluster == 0], planted.item_map.ids[cluster != 0]
    events = pd.DataFrame({"user_id": 10**6, "item_id": np.r_[home[:10], away[:10]], "rating": [5.0] * 10 + [1.0] * 10})
    model.partial_fit(events)
    assert all(m.n_users_ == planted.n_users + 1 for m in model.members_)
    assert model.predict([10**6] * 20, home[10:30]).mean() > model.predict([10**6] * 20, away[10:30]).mean() + 0.3
    loaded = Recommender.load(model.save(tmp_path / "grown"))
    np.testing.assert_array_equal(loaded.predict([10**6] * 5, home[:5]), model.predict([10**6] * 5, home[:5]))
    with_bias = Blend(models=["funksvd", "bias"], params={"funksvd": FAST["funksvd"]}, progress=False).fit(planted)
    assert not with_bias.supports_partial_fit
    with pytest.raises(UnsupportedError):
        with_bias.partial_fit(events)


def test_unregistered_members_are_skipped(planted: Interactions, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        model = Blend(models=["bias", "no-such-model"], progress=False).fit(planted)
    assert "no-such-model" in caplog.text and [m.name for m in model.members_] == ["bias"]


def test_tiny_data_averages_members(tiny_frame: pd.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        model = Blend(models=["bias", "globalmean"]).fit(Interactions.from_frame(tiny_frame))
    np.testing.assert_array_equal(model.weights_, [0.5, 0.5])
    assert model.member_weights_ == {"bias": 0.5, "globalmean": 0.5}
    assert model.intercept_ == 0 and "averaging" in caplog.text


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"models": ["no-such-model"]}, "no registered rating model"),
        ({"models": ["pop"]}, "rating models"),
        ({"models": ["blend"]}, "rating models"),
        ({"models": "bias"}, "list of"),
        ({"valid_fraction": 1.0}, "valid_fraction"),
        ({"valid_fraction": 0}, "valid_fraction"),
        ({"models": ["bias"], "params": {"funksvd": {}}}, "not members"),
        ({"models": ["bias"], "params": {"bias": {"n_factors": 3}}}, "no parameter"),
    ],
)
def test_bad_parameters(params: dict, match: str, planted: Interactions) -> None:
    with pytest.raises(ParameterError, match=match):
        Blend(progress=False, **params).fit(planted)


def test_default_member_params_and_overrides() -> None:
    blend = Blend()
    assert blend._make_member("svdpp").n_factors == 200  # DEFAULT_PARAMS
    blend = Blend(params={"svdpp": {"n_factors": 8, "seed": 3}}, seed=5, progress=False)
    member = blend._make_member("svdpp")
    assert (member.n_factors, member.seed, member.progress) == (8, 3, False)
    assert blend._make_member("funksvd").seed == 5
