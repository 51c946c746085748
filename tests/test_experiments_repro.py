"""Protocols and metrics behind the notebook reproduction configs (examples/nb00*): user folds with the last 5
ratings as test (001), the warm temporal session split with MAP@20 and P@k (002), the next-event protocol (003),
sequence MRR and rating metrics with user-level RMSE intervals (004), all through ``recforge run``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recforge.data import Interactions
from recforge.errors import DataError
from recforge.evaluation import get_protocol
from recforge.evaluation.rating import rating_gain_ndcg, user_bootstrap_rmse
from recforge.experiments import ExperimentConfig, run_experiment
from recforge.experiments.trials import load_data
from recforge.models import create_model


def make_splits(data: Interactions, protocol: str, seed: int = 0) -> list:
    return get_protocol(protocol).splits(data, seed=seed)

SYNTH = {"name": "synthetic", "options": {"n_users": 150, "n_items": 80, "n_interactions": 4000, "n_clusters": 4,
                                          "seed": 5}}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def config(protocol: str, models: list, **extra) -> ExperimentConfig:
    raw = {"name": "r", "dataset": SYNTH, "filters": {"deduplicate": "last"}, "protocol": protocol, "models": models,
           **extra}
    return ExperimentConfig.from_dict(raw)


def test_rating_gain_ndcg_by_hand() -> None:
    # user 0: true ratings 5, 3, 1 predicted in reverse order; user 1: perfect order; user 2: one item
    users = np.array([0, 0, 0, 1, 1, 2])
    ratings = np.array([5.0, 3.0, 1.0, 4.0, 2.0, 3.0])
    preds = np.array([1.0, 2.0, 3.0, 4.5, 1.5, 2.0])
    uniq, ndcg = rating_gain_ndcg(users, ratings, preds)
    # LensKit's discount: ranks 1 and 2 count fully, rank 3 is divided by log2(3)
    expected0 = (1 + 3 + 5 / np.log2(3)) / (5 + 3 + 1 / np.log2(3))
    np.testing.assert_array_equal(uniq, [0, 1, 2])
    np.testing.assert_allclose(ndcg, [expected0, 1.0, 1.0])


def test_user_bootstrap_rmse_brackets_the_pooled_value() -> None:
    rng = np.random.default_rng(0)
    n = rng.integers(1, 6, 300).astype(float)
    frame = pd.DataFrame({"rating_sse": n * rng.uniform(0.5, 1.5, 300), "rating_n": n})
    pooled = np.sqrt(frame["rating_sse"].sum() / frame["rating_n"].sum())
    lo, hi = user_bootstrap_rmse(frame, seed=1)
    assert lo < pooled < hi and hi - lo < 0.2
    same = pd.DataFrame({"rating_sse": [4.0] * 10, "rating_n": [1.0] * 10})  # every user has error 2
    assert user_bootstrap_rmse(same) == pytest.approx((2.0, 2.0))


def test_user_folds_protocol_tests_each_users_last_five_once(planted: Interactions) -> None:
    splits = make_splits(planted, "user-folds", seed=42)
    assert len(splits) == 5
    tested = np.concatenate([np.unique(s.test.users) for s in splits])
    eligible = np.flatnonzero(planted.user_counts() > 5)
    np.testing.assert_array_equal(np.sort(tested), eligible)  # every eligible user in exactly one fold
    first = splits[0]
    seq = planted.sequences()
    for u in np.unique(first.test.users)[:10]:
        last5 = np.sort(seq.items[seq.offsets[u + 1] - 5 : seq.offsets[u + 1]])
        np.testing.assert_array_equal(np.sort(first.test.items[first.test.users == u]), last5)
        assert len(first.train.items[first.train.users == u]) == planted.user_counts()[u] - 5


def test_session_protocol_keeps_only_warm_users() -> None:
    # times 1..12: the 90% cut is at 10 (test: 10, 11, 12), the 80% cut at 9 (validation: 9); user 3 is new at 12
    frame = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 3, 4, 4, 4, 4, 4, 4],
                          "item_id": [1, 2, 3, 1, 4, 5, 2, 3, 4, 5, 6, 7],
                          "timestamp": [1, 2, 10, 3, 11, 12, 4, 5, 6, 7, 8, 9]})
    inter = Interactions.from_frame(frame, rating_col=None)
    warm = make_splits(inter, "session")[0]
    ids = inter.user_map.to_ids
    assert sorted(ids(warm.test.users).tolist()) == [1, 2]  # user 3's only event is dropped
    assert ids(warm.valid.users).tolist() == [4] and len(warm.train) == 8


@pytest.mark.parametrize("protocol", ["next-event", "sequence-mrr"])
def test_run_next_item_protocols_match_the_protocol(tmp_path: Path, protocol: str) -> None:
    cfg = config(protocol, ["pop"], k=[5, 10, 20], metrics=["mrr", "hr@10"])
    table = run_experiment(cfg, tmp_path / protocol, progress=False).leaderboard
    proto = get_protocol(protocol)
    (split,) = proto.splits(load_data(cfg))
    ref = proto.evaluate(create_model("pop").fit(split.train_valid), split.train_valid, split.test, k=[5, 10, 20])
    assert table.loc[0, "mrr"] == pytest.approx(ref["mrr"])
    assert table.loc[0, "hr@10"] == pytest.approx(ref["hr@10"])


def test_run_rating_models_report_rmse_with_user_intervals(tmp_path: Path) -> None:
    cfg = config("random", ["globalmean", {"name": "funksvd", "params": {"n_factors": 8, "epochs": 5}}],
                 metrics=["rmse", "rating_ndcg", "mae"])
    table = run_experiment(cfg, tmp_path / "rating", progress=False).leaderboard.set_index("model")
    split = make_splits(load_data(cfg), "random", seed=0)[0]
    mean_rmse = np.sqrt(np.mean((split.test.ratings - split.train.ratings.mean()) ** 2))
    assert table.loc["globalmean", "rmse"] == pytest.approx(mean_rmse, rel=1e-5)
    for model in ("globalmean", "funksvd"):
        row = table.loc[model]
        assert row["rmse_lo"] < row["rmse"] < row["rmse_hi"]
        assert 0 < row["rating_ndcg"] <= 1 and row["rating_ndcg_lo"] <= row["rating_ndcg"] <= row["rating_ndcg_hi"]
    assert table.loc["funksvd", "rmse"] < table.loc["globalmean", "rmse"]


def test_run_session_protocol_map_matches_the_notebook_definition(tmp_path: Path) -> None:
    cfg = config("session", ["pop"], k=[1, 5, 20], metrics=["map@20", "precision@1", "precision@5"])
    table = run_experiment(cfg, tmp_path / "session", progress=False).leaderboard
    split = make_splits(load_data(cfg), "session")[0]
    model = create_model("pop").fit(split.train_valid)
    users = np.unique(split.test.users)
    top, _ = model.recommend_indices(users, 20, model.seen_)
    aps, p5 = [], []
    for u, rec in zip(users, top):
        actual = set(split.test.items[split.test.users == u].tolist())
        hits, score = 0, 0.0
        for i, item in enumerate(rec.tolist()):  # ml_metrics.apk
            if item in actual:
                hits += 1
                score += hits / (i + 1)
        aps.append(score / min(len(actual), 20))
        p5.append(len(actual & set(rec[:5].tolist())) / 5)
    assert table.loc[0, "map@20"] == pytest.approx(np.mean(aps))
    assert table.loc[0, "precision@5"] == pytest.approx(np.mean(p5))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("nb00*.yaml")), ids=lambda p: p.name)
def test_reproduction_configs_are_valid(path: Path) -> None:
    cfg = ExperimentConfig.from_file(path)
    assert cfg.name.startswith("nb00") and cfg.metrics


def test_error_metrics_are_tuned_downwards(tmp_path: Path) -> None:
    # a huge regulariser pulls every prediction to the global mean: the worse RMSE, which must not be kept
    grid = {"name": "bias", "grid": {"item_reg": [1.0, 1e6], "user_reg": [1.0, 1e6]}}
    cfg = config("loo", [grid], metrics=["rmse"], select_metric="rmse")
    run_experiment(cfg, tmp_path / "rmse", progress=False)
    trials = pd.read_csv(tmp_path / "rmse" / "trials.csv")
    select = trials[trials["part"] == "select"].set_index("params")["rmse"]
    chosen = json.loads((tmp_path / "rmse" / "selected_params.json").read_text())["bias"]
    assert json.dumps(chosen, sort_keys=True) == select.idxmin() != select.idxmax()


def test_select_metric_that_is_never_computed_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cut-off in k"):
        config("loo", [{"name": "ease", "grid": {"reg": [1.0, 10.0]}}], k=[20])  # the default is ndcg@10
    config("loo", ["pop"], k=[20])  # nothing to tune: select_metric is not used
    cfg = config("loo", [{"name": "ease", "grid": {"reg": [1.0, 10.0]}}], select_metric="nonsense")
    with pytest.raises(DataError, match="'nonsense' was not computed.*ndcg@10"):
        run_experiment(cfg, tmp_path / "bad", progress=False)


def test_official_folds_protocol_refuses_filters(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({"name": "f", "dataset": str(tmp_path / "ml-100k"), "protocol": "folds",
                                      "filters": {"deduplicate": "last"}, "models": ["pop"]})
    with pytest.raises(DataError, match="official u1..u5 files as they are"):
        run_experiment(cfg, tmp_path / "f", progress=False)
