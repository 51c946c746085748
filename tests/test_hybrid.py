"""Hybrid models (slate mixing, score blending) and the cold-start item protocol."""

from __future__ import annotations

import numpy as np
import pytest

from recforge import split as S
from recforge.data import Interactions
from recforge.errors import DataError, ParameterError
from recforge.evaluation import evaluate
from recforge.evaluation.cold_start import cold_item_split, cold_items, evaluate_cold_items
from recforge.models import create_model
from recforge.models.hybrid import _zscore_rows, simplex_grid

MEMBERS = {"ease": {"reg": 50.0}, "content": {"genre_weight": 0.6}}


def test_simplex_grid() -> None:
    grid = simplex_grid(3, 0.5)
    assert len(grid) == 6 and np.allclose(grid.sum(axis=1), 1.0)
    assert {tuple(r) for r in grid} >= {(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0)}
    assert len(simplex_grid(2, 0.1)) == 11


def test_zscore_rows_ignores_unrankable_fillers() -> None:
    rows = np.array([[1.0, 2.0, 3.0, np.finfo(np.float32).min], [5.0, 5.0, 5.0, 5.0]], np.float32)
    z = _zscore_rows(rows)
    np.testing.assert_allclose(z[0, :3], [-1.2247449, 0.0, 1.2247449], rtol=1e-5)
    assert z[0, 3] < -100 and not z[1].any()


@pytest.fixture(scope="module")
def loo(planted: Interactions) -> S.Split:
    return S.leave_one_out(planted)


def test_slatemix_fills_each_slate_with_its_quotas(loo: S.Split) -> None:
    model = create_model("slatemix", params=MEMBERS, slate_size=5, n_content=3, progress=False).fit(loo.train)
    users = np.arange(30)
    mixed, _ = model.recommend_indices(users, 10, model.seen_)
    cf_scores, content_scores = model.members_[0].score(users), model._content_scores(users)
    for row, u in enumerate(users):
        seen = set(model.seen_[u].indices)
        cf_list = [i for i in np.argsort(-cf_scores[row], kind="stable") if i not in seen]
        ct_list = [i for i in np.argsort(-content_scores[row], kind="stable") if i not in seen]
        expected: list[int] = []
        for pos in range(10):  # 2 collaborative then 3 content picks per slate, skipping items already placed
            source = cf_list if pos % 5 < 2 else ct_list
            expected.append(next(i for i in source if i not in expected))
        assert list(mixed[row]) == expected
    with pytest.raises(ParameterError, match="n_content"):
        create_model("slatemix", n_content=6, slate_size=5).fit(loo.train)


def test_scoreblend_weights_pick_the_best_validation_mix(loo: S.Split) -> None:
    model = create_model("scoreblend", params=MEMBERS, weight_step=0.25, progress=False)
    model.fit(loo.train, valid=loo.valid)
    scores = model.valid_scores_
    assert scores["blend"] >= max(scores["ease"], scores["content"])
    assert np.isclose(model.weights_.sum(), 1.0)
    assert model.member_weights_ == {"ease": model.weights_[0], "content": model.weights_[1]}
    fixed = create_model("scoreblend", params=MEMBERS, weights=[1.0, 0.0]).fit(loo.train)
    ease = fixed.members_[0]
    np.testing.assert_array_equal(fixed.recommend_indices(np.arange(20), 10, fixed.seen_)[0],
                                  ease.recommend_indices(np.arange(20), 10, fixed.seen_)[0])
    with pytest.raises(ParameterError, match="weights"):
        create_model("scoreblend", params=MEMBERS, weights=[1.0]).fit(loo.train)
    with pytest.raises(ParameterError, match="not members"):
        create_model("scoreblend", params={"als": {}}).fit(loo.train)


def test_scoreblend_without_valid_tunes_on_held_out_last_events(loo: S.Split) -> None:
    model = create_model("scoreblend", params=MEMBERS, weight_step=0.5, progress=False).fit(loo.train_valid)
    assert set(model.valid_scores_) == {"ease", "content", "blend"}
    assert model.members_[0].n_users_ == loo.train_valid.n_users and model.members_[0].seen_.nnz == model.seen_.nnz


def test_hybrid_beats_both_members_on_planted_data(loo: S.Split) -> None:
    blend = create_model("scoreblend", params=MEMBERS, weight_step=0.25, progress=False).fit(loo.train, valid=loo.valid)
    final = create_model("scoreblend", params=MEMBERS, weights=list(blend.weights_)).fit(loo.train_valid)
    ours = evaluate(final, loo.test)["ndcg@10"]
    content = evaluate(create_model("content", **MEMBERS["content"]).fit(loo.train_valid), loo.test)["ndcg@10"]
    pop = evaluate(create_model("pop").fit(loo.train_valid), loo.test)["ndcg@10"]
    assert ours > content and ours > pop


# ---------------------------------------------------------------------------------------------------- cold start
@pytest.fixture(scope="module")
def cold(planted: Interactions) -> S.Split:
    return cold_item_split(planted, fraction=0.2, seed=3)


def test_cold_item_split_keeps_held_out_items_out_of_train(planted: Interactions, cold: S.Split) -> None:
    held = cold_items(cold)
    assert len(held) == round(0.2 * len(np.flatnonzero(planted.item_counts() > 0)))
    assert not np.isin(cold.train.items, held).any()
    assert np.isin(cold.test.items, held).all()
    assert np.isin(cold.test.users, cold.train.users).all()  # every test user has training history
    assert len(cold.train) + len(cold.test) <= len(planted)
    with pytest.raises(DataError, match="fraction"):
        cold_item_split(planted, fraction=1.0)


def test_content_and_hybrids_beat_popularity_on_cold_items(cold: S.Split) -> None:
    pop = evaluate_cold_items(create_model("pop").fit(cold.train), cold)
    content = evaluate_cold_items(create_model("content", **MEMBERS["content"]).fit(cold.train), cold)
    mix = evaluate_cold_items(create_model("slatemix", params=MEMBERS, progress=False).fit(cold.train), cold)
    blend = evaluate_cold_items(
        create_model("scoreblend", params=MEMBERS, weights=[0.5, 0.5]).fit(cold.train), cold)
    assert pop["cold_share@10"] == 0.0  # popularity never shows an item without events
    for res in (content, mix, blend):
        assert res["ndcg@10"] > 1.5 * pop["ndcg@10"]
        assert res["cold_share@10"] > 0.0


def test_cold_ranking_breaks_ties_at_random_not_by_index(cold: S.Split) -> None:
    """A model blind to cold items must score like chance, whatever the item order."""
    model = create_model("pop").fit(cold.train)
    n_cold = len(cold_items(cold))
    hits = [evaluate_cold_items(model, cold, k=10, seed=s)["hr@10"] for s in range(3)]
    per_user = cold.test.csr("ones")
    n_rel = np.diff(per_user.indptr)[np.diff(per_user.indptr) > 0]
    chance = np.mean(1 - np.prod([(n_cold - n_rel - j) / (n_cold - j) for j in range(10)], axis=0))
    assert abs(np.mean(hits) - chance) < 0.03


def test_random_tiebreak_keeps_order_and_shuffles_ties() -> None:
    from recforge.evaluation.cold_start import random_tiebreak

    rows = np.array([[3.0, 1.0, 1.0, 1.0, -np.inf, 2.0]] * 400, np.float32)
    out = random_tiebreak(rows, np.random.default_rng(0))
    order = np.argsort(-out, axis=1)
    assert (order[:, 0] == 0).all() and (order[:, 1] == 5).all() and (order[:, 5] == 4).all()
    firsts = np.bincount(order[:, 2], minlength=6)[[1, 2, 3]]
    assert firsts.min() > 100  # each tied item comes first among the ties about a third of the time


def test_slatemix_needs_a_content_member(loo: S.Split) -> None:
    with pytest.raises(DataError, match="content model"):
        create_model("slatemix", content="pop", params={"ease": {"reg": 50.0}}).fit(loo.train)


def test_scoreblend_takes_rating_members_and_validation(loo: S.Split) -> None:
    """The call that used to fail (RatingPredictor.fit took no validation set)."""
    model = create_model("scoreblend", models=["ease", "funksvd"], weight_step=0.5,
                         params={"funksvd": {"n_factors": 4, "epochs": 3, "progress": False}})
    model.fit(loo.train, valid=loo.valid)
    assert [m.name for m in model.members_] == ["ease", "funksvd"]
    assert model.tuned_params_["weights"] == [float(w) for w in model.weights_]
    refit = create_model("scoreblend", models=["ease", "funksvd"], **model.tuned_params_).fit(loo.train_valid)
    np.testing.assert_array_equal(refit.weights_, model.weights_)
