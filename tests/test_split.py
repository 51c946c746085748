"""Splitters: partition properties, per-user ordering, temporal cuts and next-event samples."""

from __future__ import annotations

import pandas as pd
import pytest

from recforge import split as S
from recforge.data import Interactions
from recforge.errors import DataError, EmptyDatasetError


def rows(inter: Interactions) -> set[tuple]:
    f = inter.to_frame()
    return set(map(tuple, f[["user_id", "item_id", "timestamp"]].to_numpy().tolist()))


def assert_partition(full: Interactions, *parts: Interactions | None) -> None:
    present = [p for p in parts if p is not None]
    assert sum(len(p) for p in present) == len(full)
    union: set = set()
    for p in present:
        assert p.user_map is full.user_map and p.item_map is full.item_map
        assert not (union & rows(p))
        union |= rows(p)
    assert union == rows(full)


def test_random_split_is_seeded_partition(planted: Interactions) -> None:
    a = S.random_split(planted, 0.2, 0.1, seed=3)
    b = S.random_split(planted, 0.2, 0.1, seed=3)
    c = S.random_split(planted, 0.2, 0.1, seed=4)
    assert_partition(planted, a.train, a.valid, a.test)
    assert len(a.test) == round(0.2 * len(planted)) and len(a.valid) == round(0.1 * len(planted))
    assert rows(a.test) == rows(b.test) and rows(a.test) != rows(c.test)
    with pytest.raises(DataError):
        S.random_split(planted, 1.2)


def test_kfold_tests_every_row_once(planted: Interactions) -> None:
    folds = list(S.kfold(planted, 4, seed=0))
    assert len(folds) == 4
    tested = [rows(f.test) for f in folds]
    assert sum(len(t) for t in tested) == len(planted)
    assert set().union(*tested) == rows(planted)
    for f in folds:
        assert_partition(planted, f.train, f.test)


def test_leave_one_out_takes_last_events(tiny_frame: pd.DataFrame) -> None:
    inter = Interactions.from_frame(tiny_frame)
    split = S.leave_one_out(inter)  # users 1 and 3 have >= 3 events
    assert_partition(inter, split.train, split.valid, split.test)
    test = split.test.to_frame().sort_values("user_id")
    valid = split.valid.to_frame().sort_values("user_id")
    assert test[["user_id", "item_id"]].values.tolist() == [[1, "b"], [3, "e"]]
    assert valid[["user_id", "item_id"]].values.tolist() == [[1, "c"], [3, "d"]]
    assert set(split.train.to_frame()["user_id"]) == {1, 2, 3, 4, 5}  # short users stay in train


def test_last_n_tie_break_by_item() -> None:
    df = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [9, 3, 5], "timestamp": [1, 7, 7]})
    split = S.last_n(Interactions.from_frame(df), n=1)
    assert split.test.to_frame()["item_id"].tolist() == [5]  # (7, 5) sorts after (7, 3)


def test_user_folds_last_n(planted: Interactions) -> None:
    folds = list(S.user_folds_last_n(planted, n_folds=3, n=5, seed=1))
    tested_users = [set(f.test.to_frame()["user_id"]) for f in folds]
    assert all(not (a & b) for i, a in enumerate(tested_users) for b in tested_users[i + 1 :])
    eligible = set(planted.user_map.ids[planted.user_counts() > 5])
    assert set().union(*tested_users) == eligible
    for f in folds:
        assert_partition(planted, f.train, f.test)
        assert (f.test.user_counts()[f.test.user_counts() > 0] == 5).all()
        # the test events are the latest of each tested user
        last_train = pd.Series(f.train.timestamps).groupby(f.train.users).max()
        first_test = pd.Series(f.test.timestamps).groupby(f.test.users).min()
        common = first_test.index.intersection(last_train.index)
        assert (first_test[common] >= last_train[common]).all()


def test_user_split_fold_in(planted: Interactions) -> None:
    split = S.user_split(planted, test_users=30, fold_in=0.5, seed=0, fold_in_to_train=False)
    assert_partition(planted, split.train, split.history, split.test)
    held = set(split.test.to_frame()["user_id"])
    assert len(held) == 30
    assert held.isdisjoint(set(split.train.to_frame()["user_id"]))
    assert set(split.history.to_frame()["user_id"]) == held
    joined = S.user_split(planted, test_users=30, fold_in=0.5, seed=0)
    assert joined.history is None and len(joined.train) == len(split.train) + len(split.history)


def test_temporal_split_cuts(planted: Interactions) -> None:
    t_valid, t_test = S.temporal_cut_points(planted, 0.1, 0.1)
    split = S.temporal_split(planted, 0.1, 0.1)
    assert_partition(planted, split.train, split.valid, split.test)
    assert split.train.timestamps.max() < t_valid <= split.valid.timestamps.min()
    assert split.valid.timestamps.max() < t_test <= split.test.timestamps.min()
    assert abs(len(split.test) / len(planted) - 0.1) < 0.01
    by_date = S.temporal_split(planted, 0.0, test_start="2020-06-01")
    assert by_date.test.timestamps.min() >= pd.Timestamp("2020-06-01").timestamp()
    with pytest.raises(DataError, match="timestamps"):
        S.temporal_split(Interactions.from_frame(pd.DataFrame({"user_id": [1], "item_id": [1]})))


def test_next_event_samples_history(tiny_frame: pd.DataFrame) -> None:
    inter = Interactions.from_frame(tiny_frame)
    late = inter.timestamps >= 9  # scored events: (5,e,9), (1,a,10), (1,c,20), (1,b,30)
    samples = S.next_event_samples(inter.subset(~late), inter.subset(late))
    ids = inter.item_map.ids
    got = sorted(
        (int(inter.user_map.ids[u]), ids[i], "".join(ids[samples.history(s)]))
        for s, (u, i) in enumerate(zip(samples.users, samples.items))
    )
    assert got == [(1, "b", "ac"), (1, "c", "a"), (5, "e", "a")]  # (1, a) has no earlier event: dropped


def test_split_errors() -> None:
    one = Interactions.from_frame(pd.DataFrame({"user_id": [1, 2], "item_id": [1, 1], "timestamp": [1, 2]}))
    with pytest.raises(EmptyDatasetError, match="no test"):
        S.leave_one_out(one)
    with pytest.raises(DataError):
        list(S.kfold(one, 5))
    with pytest.raises(DataError):
        list(S.user_folds_last_n(one, 2, 5))


def test_holdout_one_takes_the_last_event_by_time_else_a_random_one() -> None:
    frame = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 3, 3, 3, 3], "item_id": [5, 6, 7, 5, 6, 7, 8, 9, 5],
                          "timestamp": [30, 10, 20, 1, 2, 4, 3, 2, 1]})
    timed = S.holdout_one(Interactions.from_frame(frame))
    held = timed.test.to_frame()
    assert sorted(zip(held["user_id"], held["item_id"])) == [(1, 5), (3, 7)]  # user 2 has too few events
    assert len(timed.train) == 7 and timed.name == "holdout-last"
    untimed = Interactions.from_frame(frame.drop(columns="timestamp"))
    picks = {tuple(S.holdout_one(untimed, seed=s).test.to_frame()["item_id"]) for s in range(20)}
    assert len(picks) > 3  # random per seed (file order is not time) ...
    again = S.holdout_one(untimed, seed=4).test.to_frame()
    assert again.equals(S.holdout_one(untimed, seed=4).test.to_frame())  # ... and repeatable
    assert sorted(again["user_id"]) == [1, 3]
