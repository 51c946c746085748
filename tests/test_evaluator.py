"""Evaluation end to end: hand-made score matrices, exclusion, tie-breaks, batching, and the issue's reference
values on the real datasets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import ml100k_path, needs_ml100k

from recforge import split as S
from recforge.core.topk import mask_and_topk
from recforge.data import Interactions
from recforge.errors import DataError, EmptyDatasetError
from recforge.evaluation import evaluate, evaluate_next_event, evaluate_scores
from recforge.models import create_model

SCORES = np.array([[0.5, 0.9, 0.9, 0.1, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
TEST = sp.csr_matrix(([1, 1, 1], ([0, 0, 1], [2, 4, 3])), shape=(2, 5))
SEEN = sp.csr_matrix(([1], ([0], [1])), shape=(2, 5))


def test_topk_ties_and_exclusion() -> None:
    idx, sc = mask_and_topk(SCORES.copy(), 3, SEEN.indptr, SEEN.indices)
    assert idx.tolist() == [[2, 0, 4], [0, 1, 2]]  # item 1 excluded; equal scores -> smaller index first
    assert sc[0].tolist() == pytest.approx([0.9, 0.5, 0.3])
    idx, sc = mask_and_topk(np.array([[np.nan, 1.0, -np.inf]], np.float32), 3)
    assert idx.tolist() == [[1, -1, -1]] and sc[0, 1] == -np.inf


def test_evaluate_scores_by_hand() -> None:
    # user 0 (item 1 excluded): ranking 2, 0, 4, 3 -> hits at ranks 1 and 3 of 2 relevant items
    # user 1 (all tied): ranking 0, 1, 2, 3, 4 -> its relevant item 3 is at rank 4
    res = evaluate_scores(SCORES, TEST, k=3, exclude=SEEN)
    log3 = 1 / np.log2(3)
    assert res["hr@3"] == pytest.approx(0.5)
    assert res["ndcg@3"] == pytest.approx((1.5 / (1 + log3)) / 2)
    assert res["mrr"] == pytest.approx((1 + 0.25) / 2)
    assert res["mrr@3"] == pytest.approx(0.5)
    assert res["precision@3"] == pytest.approx((2 / 3) / 2)
    assert res["recall@3"] == pytest.approx(0.5)
    assert res["map@3"] == pytest.approx(((1 + 2 / 3) / 2) / 2)
    assert res["coverage@3"] == pytest.approx(4 / 5)  # {2, 0, 4} and {0, 1, 2}
    # without exclusion item 1 ties item 2 at 0.9 and wins by index, pushing item 2 to rank 2
    res = evaluate_scores(SCORES, TEST, k=3)
    assert res["mrr"] == pytest.approx((0.5 + 0.25) / 2)


def test_excluded_target_counts_as_miss() -> None:
    test = sp.csr_matrix(([1], ([0], [1])), shape=(2, 5))
    res = evaluate_scores(SCORES, test, k=5, exclude=SEEN)
    assert res["hr@5"] == 0.0 and res["mrr"] == 0.0


def test_batching_does_not_change_results(planted: Interactions) -> None:
    split = S.leave_one_out(planted)
    model = create_model("random", seed=3).fit(split.train_valid)
    a = evaluate(model, split.test, k=[5, 10])
    b = evaluate(model, split.test, k=[5, 10], batch_size=7)
    pd.testing.assert_frame_equal(a.per_user, b.per_user)
    assert a.summary == b.summary


def test_exclude_seen_switch(planted: Interactions) -> None:
    split = S.random_split(planted, 0.2, seed=0)
    model = create_model("pop").fit(split.train)
    on = evaluate(model, split.test, k=10)
    off = evaluate(model, split.test, k=10, exclude_seen=False)
    assert on["ndcg@10"] > off["ndcg@10"]  # popular items the user already has crowd the list otherwise
    assert on["users"] == off["users"] == len(np.unique(split.test.users))


def test_evaluate_errors(planted: Interactions, tiny_frame: pd.DataFrame) -> None:
    split = S.leave_one_out(planted)
    model = create_model("pop").fit(split.train)
    with pytest.raises(DataError, match="different"):
        evaluate(model, Interactions.from_frame(tiny_frame), k=10)
    with pytest.raises(DataError, match="k must be"):
        evaluate(model, split.test, k=0)
    with pytest.raises(EmptyDatasetError):
        evaluate(model, split.test.subset(np.zeros(len(split.test), bool)))


def test_rating_metrics_reported(planted: Interactions) -> None:
    split = S.random_split(planted, 0.2, seed=0)
    res = evaluate(create_model("globalmean").fit(split.train), split.test)
    truth = split.test.ratings.astype(float)
    expected = np.sqrt(np.mean((truth - split.train.ratings.astype(float).mean()) ** 2))
    assert res["rmse"] == pytest.approx(expected, rel=1e-6)
    assert len(res.squared_errors) == len(split.test)


def test_next_event_protocol(tiny_frame: pd.DataFrame) -> None:
    inter = Interactions.from_frame(tiny_frame)
    late = inter.timestamps >= 9
    samples = S.next_event_samples(inter.subset(~late), inter.subset(late))
    model = create_model("pop").fit(inter)
    res = evaluate_next_event(model, samples, k=[1, 5])
    # popularity on all data: a (4) > b, c, d, e (2 each) -> ranks a1 b2 c3 d4 e5; seen items are not excluded
    expected_rr = {"b": 1 / 2, "c": 1 / 3, "e": 1 / 5}
    want = np.mean([expected_rr[inter.item_map.ids[i]] for i in samples.items])
    assert res["mrr"] == pytest.approx(want)
    excl = evaluate_next_event(model, samples, k=5, exclude_seen=True)
    assert excl["mrr"] > res["mrr"]


@needs_ml100k
def test_reference_values_ml100k_leave_one_out() -> None:
    from recforge.data.datasets import load

    split = S.leave_one_out(load(ml100k_path()))
    res = evaluate(create_model("pop").fit(split.train_valid), split.test, k=10)
    assert res["users"] == 943
    assert round(res["hr@10"], 4) == 0.0498
    assert round(res["ndcg@10"], 4) == 0.0253
    assert round(res["mrr"], 4) == 0.0256
    assert round(res["coverage@10"], 4) == 0.0541


def test_reference_values_embedded_latest_small() -> None:
    from recforge.datasets import load

    split = S.leave_one_out(load("ml-latest-small"))
    res = evaluate(create_model("pop").fit(split.train_valid), split.test, k=10)
    assert res["users"] == 610
    assert (round(res["hr@10"], 4), round(res["ndcg@10"], 4)) == (0.0426, 0.0194)
    assert (round(res["mrr"], 4), round(res["coverage@10"], 4)) == (0.0183, 0.0125)


@needs_ml100k
def test_reference_global_mean_official_folds() -> None:
    from recforge.evaluation import get_protocol
    from recforge.experiments import compare

    splits = get_protocol("folds").splits(ml100k_path())
    assert [len(s.test) for s in splits] == [20_000] * 5
    res = compare(str(ml100k_path()), ["globalmean"], protocol="folds", progress=False).results["globalmean"]
    assert round(res["rmse"], 4) == 1.1256  # mean of the five per-fold RMSEs
    per_fold = [evaluate(create_model("globalmean").fit(s.train), s.test)["rmse"] for s in splits]
    assert res["rmse"] == pytest.approx(np.mean(per_fold))
    assert len(res.per_user) == sum(len(np.unique(s.test.users)) for s in splits)


def test_folds_protocol_needs_a_folder(planted: Interactions) -> None:
    from recforge.evaluation import get_protocol

    with pytest.raises(DataError, match="ml-100k folder"):
        get_protocol("folds").splits(planted)


def test_factorized_top_k_counts_events_not_users() -> None:
    from recforge.evaluation import factorized_top_k

    frame = pd.DataFrame({"user_id": [1, 1, 2, 2, 2, 3], "item_id": [1, 2, 1, 2, 3, 4]})
    train = Interactions.from_frame(frame)
    model = create_model("pop").fit(train)  # ranking: 1, 2 (2 events each), then 3, 4; ties by index
    test = Interactions.from_frame(pd.DataFrame({"user_id": [1, 1, 3], "item_id": [3, 1, 4]}),
                                   user_map=train.user_map, item_map=train.item_map)
    acc = factorized_top_k(model, test, ks=(1, 3, 4))
    assert acc == {"top1_accuracy": 1 / 3, "top3_accuracy": 2 / 3, "top4_accuracy": 1.0}
    excl = factorized_top_k(model, test, ks=(1,), exclude_seen=True)
    # seen items removed: user 1 sees 3 first (1 and 2 are seen), user 3's list starts with 1
    assert excl == {"top1_accuracy": 1 / 3}
