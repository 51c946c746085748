"""Interactions, id maps, side data, file formats, filters and bad-input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recforge.data import (
    IdMap,
    Interactions,
    k_core,
    min_item_count,
    min_user_count,
    multi_hot,
    rating_threshold,
)
from recforge.errors import DataError, DuplicateInteractionError, EmptyDatasetError, UnknownIdError


def test_ids_round_trip_and_sorted_indices(tiny_frame: pd.DataFrame) -> None:
    inter = Interactions.from_frame(tiny_frame)
    assert (inter.n_users, inter.n_items, len(inter)) == (5, 5, 12)
    assert inter.users.dtype == np.int32 and inter.items.dtype == np.int32
    assert list(inter.item_map.ids) == ["a", "b", "c", "d", "e"]  # sorted: ties by index == ties by id
    back = inter.to_frame()
    pd.testing.assert_series_equal(back["user_id"], tiny_frame["user_id"], check_dtype=False)
    pd.testing.assert_series_equal(back["item_id"], tiny_frame["item_id"].astype(object), check_dtype=False)
    assert back["rating"].tolist() == tiny_frame["rating"].tolist()


def test_idmap_policies(caplog: pytest.LogCaptureFixture) -> None:
    m = IdMap(["x", "y", "z"])
    assert m.to_index(["z", "x"]).tolist() == [2, 0]
    assert m.to_ids([1]).tolist() == ["y"]
    with pytest.raises(UnknownIdError, match="'w'"):
        m.to_index(["w"])
    assert m.to_index(["w", "y"], on_unknown="ignore").tolist() == [1]
    assert m.to_index(["w", "y"], on_unknown="keep").tolist() == [-1, 1]
    with caplog.at_level("WARNING"):
        assert m.to_index(["w"], on_unknown="warn").tolist() == []
    assert "unknown" in caplog.text
    ints = IdMap([10, 30, 20])
    assert ints.to_index(["20"]).tolist() == [2]  # ids typed on a command line still match
    with pytest.raises(DataError, match="unique"):
        IdMap([1, 1])


def test_polars_and_custom_columns(tiny_frame: pd.DataFrame) -> None:
    pl = pytest.importorskip("polars")
    df = pl.from_pandas(tiny_frame.rename(columns={"user_id": "uid", "item_id": "iid", "timestamp": "ts"}))
    inter = Interactions.from_frame(df, user_col="uid", item_col="iid", timestamp_col="ts")
    assert len(inter) == 12 and inter.timestamps is not None and inter.ratings is not None


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "jsonl"])
def test_file_formats(tiny_frame: pd.DataFrame, tmp_path, ext: str) -> None:
    from recforge.data import write_table

    path = write_table(tiny_frame, tmp_path / f"inter.{ext}")
    inter = Interactions.from_file(path)
    assert len(inter) == 12 and inter.n_items == 5
    assert inter.describe()["rating_max"] == 5.0


def test_datetime_timestamps() -> None:
    df = pd.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": pd.to_datetime(["1970-01-02", "2000-01-01"])})
    inter = Interactions.from_frame(df)
    assert inter.timestamps.tolist() == [86400, 946684800]


@pytest.mark.parametrize(
    ("frame", "kwargs", "match"),
    [
        (pd.DataFrame({"user": [1], "item_id": [2]}), {}, "missing user column 'user_id'.*user_col"),
        (pd.DataFrame({"user_id": [1], "item_id": [2]}), {"rating_col": "stars"}, "missing rating column 'stars'"),
        (pd.DataFrame({"user_id": [1.0, np.nan], "item_id": [1, 2]}), {}, "NaN"),
        (pd.DataFrame({"user_id": ["a", None], "item_id": [1, 2]}), {}, "missing values"),
        (pd.DataFrame({"user_id": ["a", ""], "item_id": [1, 2]}), {}, "empty strings"),
        (pd.DataFrame({"user_id": ["a", "a\x00"], "item_id": [1, 2]}), {}, "NUL characters"),
        (pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "rating": [1.0, np.nan]}), {}, "rating column 'rating' contains missing"),
        (pd.DataFrame({"user_id": [1], "item_id": [1], "rating": ["good"]}), {}, "not numeric"),
        (pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "rating": [1.0, np.inf]}), {}, "rating.*inf.*finite"),
        (pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "rating": [1.0, 1e308]}), {}, "rating.*1e.308.*finite"),
        (pd.DataFrame({"user_id": [1], "item_id": [1], "weight": [-np.inf]}), {"weight_col": "weight"}, "weight.*finite"),
        (pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1.0, 1e29]}), {}, "timestamp.*1e.29.*2\\*\\*62"),
        (pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1.0, np.inf]}), {}, "timestamp.*inf"),
    ],
)
def test_bad_input_names_the_problem(frame: pd.DataFrame, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        Interactions.from_frame(frame, **kwargs)


def test_empty_and_missing_file(tmp_path) -> None:
    with pytest.raises(EmptyDatasetError):
        Interactions.from_frame(pd.DataFrame({"user_id": [], "item_id": []}))
    with pytest.raises(DataError, match="file not found"):
        Interactions.from_file(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match="cannot tell the format"):
        Interactions.from_file(tmp_path / "x.xlsx")


def test_duplicate_policies() -> None:
    df = pd.DataFrame(
        {"user_id": [1, 1, 1, 2], "item_id": [7, 7, 8, 7], "rating": [1.0, 5.0, 3.0, 2.0], "timestamp": [2, 1, 3, 4]}
    )
    assert len(Interactions.from_frame(df)) == 4  # "keep" is the default
    with pytest.raises(DuplicateInteractionError, match="1 duplicate"):
        Interactions.from_frame(df, duplicates="raise")
    first = Interactions.from_frame(df, duplicates="first").to_frame()
    assert first.query("user_id == 1 and item_id == 7")["rating"].tolist() == [5.0]  # earliest by time
    last = Interactions.from_frame(df, duplicates="last").to_frame()
    assert last.query("user_id == 1 and item_id == 7")["rating"].tolist() == [1.0]
    mean = Interactions.from_frame(df, duplicates="mean").to_frame()
    assert mean.query("user_id == 1 and item_id == 7")["rating"].tolist() == [3.0]
    summed = Interactions.from_frame(df.drop(columns="rating"), duplicates="sum")
    assert sorted(summed.weights.tolist()) == [1.0, 1.0, 2.0]
    # csr of ratings keeps the latest rating of a repeated pair instead of adding them up
    assert Interactions.from_frame(df).csr("rating")[0, 0] == 1.0
    assert Interactions.from_frame(df).csr("ones")[0, 0] == 2.0


def test_csr_and_sequences(tiny_frame: pd.DataFrame) -> None:
    inter = Interactions.from_frame(tiny_frame)
    mat = inter.csr()
    assert mat.shape == (5, 5) and mat.nnz == 12 and mat[0, 1] == 1.0
    assert inter.csr("rating")[0, 2] == 4.0
    seq = inter.sequences()
    assert seq.offsets.tolist() == [0, 3, 5, 9, 10, 12]
    ids = inter.item_map.ids
    assert ids[seq[0]].tolist() == ["a", "c", "b"]  # user 1 by time: 10, 20, 30
    assert ids[seq[2]].tolist() == ["b", "c", "d", "e"]
    np.testing.assert_array_equal(inter.items[seq.positions], seq.items)


def test_side_data_alignment(tiny_frame: pd.DataFrame) -> None:
    items = pd.DataFrame({"item_id": ["e", "a", "zz"], "title": ["E", "A", "unused"], "genres": ["X|Y", "Y", "Z"]})
    inter = Interactions.from_frame(tiny_frame, item_data=items)
    assert inter.item_data.loc["a", "title"] == "A" and inter.item_data.loc["e", "title"] == "E"
    assert inter.item_data["title"].isna().sum() == 3  # b, c, d have no row
    assert list(inter.item_data.index) == ["a", "b", "c", "d", "e"]
    mat, vocab = multi_hot(inter.item_data["genres"])
    assert vocab == ["X", "Y"] and mat.toarray().tolist() == [[0, 1], [0, 0], [0, 0], [0, 0], [1, 1]]


def test_k_core_is_iterative() -> None:
    # Item "z" has 2 users; dropping user 3 (1 event) makes item "y" fall below 2, which drops user 2 too.
    df = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 3, 4, 4], "item_id": ["x", "z", "w", "y", "z", "y", "x", "w"]})
    core = k_core(Interactions.from_frame(df), user_k=2, item_k=2)
    f = core.to_frame()
    assert sorted(f["user_id"].unique()) == [1, 4]
    assert sorted(f["item_id"].unique()) == ["w", "x"]
    assert core.n_users == 2 and core.n_items == 2  # ids are compacted
    assert (core.user_counts() >= 2).all() and (core.item_counts() >= 2).all()
    with pytest.raises(EmptyDatasetError, match="5/5-core"):
        k_core(Interactions.from_frame(df), 5)


def test_min_counts_and_threshold(tiny_frame: pd.DataFrame) -> None:
    inter = Interactions.from_frame(tiny_frame)
    assert set(min_item_count(inter, 3).to_frame()["item_id"]) == {"a"}
    assert set(min_user_count(inter, 3).to_frame()["user_id"]) == {1, 3}
    liked = rating_threshold(inter, 4)
    assert liked.ratings is None and len(liked) == 7
    with pytest.raises(DataError, match="rating"):
        rating_threshold(Interactions.from_frame(tiny_frame.drop(columns="rating")), 4)


def test_side_data_items_join_the_item_map() -> None:
    events = pd.DataFrame({"user_id": [1, 2], "item_id": ["a", "b"]})
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"]})
    plain = Interactions.from_frame(events, item_data=items)
    assert list(plain.item_map.ids) == ["a", "b"] and len(plain.item_data) == 2
    cold = Interactions.from_frame(events, item_data=items, side_data_items=True)
    assert list(cold.item_map.ids) == ["a", "b", "c"]
    assert cold.item_data["title"].tolist() == ["A", "B", "C"] and cold.item_counts().tolist() == [1, 1, 0]
    with pytest.raises(DataError, match="side_data_items"):
        Interactions.from_frame(events, side_data_items=True)


def test_ids_beyond_int64_come_back_exactly(tmp_path) -> None:
    big = [2**63, 2**64 - 1, 5]
    (tmp_path / "big.csv").write_text("user_id,item_id\n" + "".join(f"{u},1\n" for u in big))
    inter = Interactions.from_file(tmp_path / "big.csv")
    assert sorted(inter.to_frame()["user_id"].tolist()) == sorted(str(u) for u in big)
    frame = pd.DataFrame({"user_id": [2.0**60, 1.0], "item_id": [1, 2]})
    with pytest.raises(DataError, match="beyond 2\\*\\*53"):
        Interactions.from_frame(frame)


def test_regime_says_what_kind_of_data_it_is() -> None:
    frame = pd.DataFrame({"user_id": [1, 1, 1, 2, 2], "item_id": [1, 1, 2, 1, 3], "rating": [1.0, 2, 3, 4, 10],
                          "timestamp": [0, 60, 120, 0, 30]})
    line = Interactions.from_frame(frame).regime()
    assert line.startswith("2 users × 3 items, 5 events (density 66.667%)")  # 4 distinct pairs of 6
    assert "20.0% repeated user-item pairs" in line and "ratings 1–10" in line
    assert "session-like histories (median 2.5 events within 0.0 days)" in line
    frame["timestamp"] = frame["timestamp"] * 86_400
    assert "user-like" in Interactions.from_frame(frame).regime()
    assert "no timestamps" in Interactions.from_frame(frame.drop(columns=["timestamp", "rating"])).regime()
    plays = Interactions.from_frame(frame.assign(plays=[3, 1, 20, 2, 4000]), weight_col="plays").regime()
    assert "weights (counts) median 3, max 4,000" in plays
