"""Tests of the synthetic generator: shapes, determinism and that the planted structure is really there."""

from __future__ import annotations

import numpy as np
import pytest

from recforge.data.datasets.synthetic import MIN_EVENTS_PER_USER, make_synthetic
from recforge.errors import DataError


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


def _consecutive_same_user(d):
    # Rows come ordered by user then time, so neighbouring rows of one user are consecutive events.
    return d.users[1:] == d.users[:-1]


def test_sizes_and_dtypes(data):
    assert len(data) == 50_000
    assert data.n_users == 1000 and data.n_items == 500
    assert data.users.dtype == np.int32 and data.items.dtype == np.int32
    assert data.timestamps.dtype == np.int64
    assert data.ratings.dtype == np.float32
    assert set(np.unique(data.ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert data.weights is None
    assert data.user_map.ids.tolist() == list(range(1000))
    assert data.item_map.ids.tolist() == list(range(500))


@pytest.mark.parametrize("n_users,n_items,n", [(1, 1, 5), (3, 10, 15), (7, 3, 1234), (50, 40, 10_007)])
def test_exact_total_and_min_length(n_users, n_items, n):
    d = make_synthetic(n_users, n_items, n, n_clusters=min(3, n_items))
    assert len(d) == n
    counts = d.user_counts()
    assert counts.sum() == n and counts.min() >= MIN_EVENTS_PER_USER
    assert d.items.min() >= 0 and d.items.max() < n_items


def test_lengths_are_heavy_tailed(data):
    counts = data.user_counts()
    assert counts.min() >= MIN_EVENTS_PER_USER
    assert counts.max() > 5 * np.median(counts)


def test_side_data(data):
    item_data, user_data = data.item_data, data.user_data
    assert len(item_data) == data.n_items and len(user_data) == data.n_users
    assert (item_data.index.to_numpy() == data.item_map.ids).all()
    assert (user_data.index.to_numpy() == data.user_map.ids).all()
    assert item_data["title"].iloc[17] == "Item 17"
    first_genre = item_data["genres"].str.split("|").str[0]
    assert (first_genre == "c" + item_data["cluster"].astype(str)).all()
    assert item_data["genres"].str.contains("|", regex=False).any()  # some items carry a second label
    assert set(user_data["cluster"]) == set(range(8)) == set(item_data["cluster"])
    assert item_data["popularity"].sum() == pytest.approx(1.0)


def test_deterministic_for_a_seed():
    a, b, c = make_synthetic(seed=3), make_synthetic(seed=3), make_synthetic(seed=4)
    for name in ("users", "items", "ratings", "timestamps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.item_data.equals(b.item_data) and a.user_data.equals(b.user_data)
    assert not np.array_equal(a.items, c.items)
    assert not np.array_equal(a.timestamps, c.timestamps)


def test_ratings_off_leaves_the_rest_unchanged():
    a, b = make_synthetic(seed=1), make_synthetic(seed=1, ratings=False)
    assert b.ratings is None
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)


def test_popularity_is_skewed_and_not_aligned_with_ids():
    d = make_synthetic(popularity_alpha=1.0)
    counts = np.sort(d.item_counts())[::-1]
    assert counts[: d.n_items // 10].sum() / len(d) > 0.30
    assert abs(np.corrcoef(np.arange(d.n_items), d.item_counts())[0, 1]) < 0.2

    flat = make_synthetic(popularity_alpha=0.0, sequential_strength=0.0)
    flat_counts = np.sort(flat.item_counts())[::-1]
    assert flat_counts[: flat.n_items // 10].sum() / len(flat) < 0.2


@pytest.mark.parametrize("affinity", [0.0, 0.5, 0.8, 0.95])
def test_users_mostly_pick_their_cluster(affinity):
    d = make_synthetic(cluster_affinity=affinity, seed=2)
    user_cluster = d.user_data["cluster"].to_numpy()
    item_cluster = d.item_data["cluster"].to_numpy()
    measured = np.mean(item_cluster[d.items] == user_cluster[d.users])
    # Off-cluster picks come from the whole catalogue, so they land in the own cluster by its popularity mass.
    mass = d.item_data.groupby("cluster")["popularity"].sum().to_numpy()
    expected = np.mean(affinity + (1 - affinity) * mass[user_cluster[d.users]])
    assert measured == pytest.approx(expected, abs=0.03)
    assert measured >= affinity - 0.03


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.7, 1.0])
def test_sequential_dependence(strength):
    d = make_synthetic(sequential_strength=strength, seed=5)
    successor = d.item_data["successor"].to_numpy()
    same = _consecutive_same_user(d)
    follows = (d.items[1:] == successor[d.items[:-1]])[same].mean()
    # Fresh picks hit the successor by chance now and then, hence the one-sided slack.
    assert strength - 0.02 <= follows <= strength + 0.03


def test_successor_map_is_a_cycle_within_each_cluster(data):
    successor = data.item_data["successor"].to_numpy()
    cluster = data.item_data["cluster"].to_numpy()
    assert (cluster[successor] == cluster).all()
    assert np.array_equal(np.sort(successor), np.arange(data.n_items))  # a permutation
    assert (successor != np.arange(data.n_items)).all()  # no fixed points when clusters have > 1 item


def test_timestamps_strictly_increase_per_user(data):
    same = _consecutive_same_user(data)
    assert (np.diff(data.timestamps)[same] > 0).all()
    seq = data.sequences()
    np.testing.assert_array_equal(seq.items, data.items)  # row order is already (user, time)
    starts = data.timestamps[seq.offsets[:-1]]
    assert starts.min() >= 1_577_836_800  # 2020-01-01
    assert starts.max() - starts.min() > 180 * 86_400  # users join at different times
    assert data.timestamps.max() < 1_735_689_600  # before 2025


def test_ratings_are_higher_in_cluster(data):
    user_cluster = data.user_data["cluster"].to_numpy()
    item_cluster = data.item_data["cluster"].to_numpy()
    in_cluster = item_cluster[data.items] == user_cluster[data.users]
    assert data.ratings[in_cluster].mean() > data.ratings[~in_cluster].mean() + 1.0
    assert data.ratings.min() == 1.0 and data.ratings.max() == 5.0


def test_progress_bar_runs(capsys, monkeypatch):
    from recforge.core import progress

    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)  # stderr is not a terminal here: a line per stage
    d = make_synthetic(20, 10, 200, n_clusters=2, progress=True)
    assert len(d) == 200
    assert "synthetic" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_users": 0}, "n_users"),
        ({"n_items": 0}, "n_items"),
        ({"n_users": 100, "n_interactions": 499}, "at least 5 per user"),
        ({"n_clusters": 501}, "n_clusters"),
        ({"n_clusters": 0}, "n_clusters"),
        ({"sequential_strength": 1.5}, "sequential_strength"),
        ({"sequential_strength": -0.1}, "sequential_strength"),
        ({"sequential_strength": float("nan")}, "sequential_strength"),
        ({"cluster_affinity": 2}, "cluster_affinity"),
        ({"popularity_alpha": -1.0}, "popularity_alpha"),
        ({"n_users": 10.5}, "integer"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(DataError, match=match):
        make_synthetic(**kwargs)
