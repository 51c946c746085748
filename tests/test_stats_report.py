"""Confidence intervals, paired tests and leaderboard output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recforge import split as S
from recforge.errors import DataError, UnknownNameError
from recforge.evaluation import bootstrap_ci, leaderboard, paired_test, save_leaderboard, to_markdown
from recforge.evaluation.evaluator import EvaluationResult
from recforge.evaluation.protocols import get_protocol
from recforge.experiments import compare


def test_bootstrap_ci_covers_mean_and_shrinks() -> None:
    rng = np.random.default_rng(0)
    small = rng.binomial(1, 0.3, 100).astype(float)
    big = rng.binomial(1, 0.3, 10_000).astype(float)
    lo_s, hi_s = bootstrap_ci(small, seed=1)
    lo_b, hi_b = bootstrap_ci(big, seed=1)
    assert lo_s < small.mean() < hi_s and lo_b < big.mean() < hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 5
    # the normal approximation of a proportion: half-width ~ 1.96 * sqrt(p(1-p)/n)
    assert (hi_b - lo_b) / 2 == pytest.approx(1.96 * np.sqrt(0.3 * 0.7 / 10_000), rel=0.15)
    assert bootstrap_ci(np.array([2.0])) == (2.0, 2.0)
    with pytest.raises(DataError):
        bootstrap_ci(np.array([]))


def test_paired_test() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    assert paired_test(a, a) == 1.0
    assert paired_test(a + 0.5 + rng.normal(scale=0.1, size=500), a) < 1e-6
    assert paired_test(a + rng.normal(scale=1.0, size=500), a) > 0.01


def _result(name: str, values: list[float]) -> EvaluationResult:
    per_user = pd.DataFrame({"user_id": np.arange(len(values)), "ndcg@10": values})
    return EvaluationResult(name, per_user, {"ndcg@10": float(np.mean(values)), "coverage@10": 0.5})


def test_leaderboard_order_ci_and_pvalues(tmp_path) -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(size=300)
    results = {"weak": _result("weak", list(base * 0.5)), "strong": _result("strong", list(base))}
    table = leaderboard(results, metrics=["ndcg@10", "coverage@10"])
    assert table["model"].tolist() == ["strong", "weak"]
    assert table.loc[0, "ndcg@10_lo"] < table.loc[0, "ndcg@10"] < table.loc[0, "ndcg@10_hi"]
    assert np.isnan(table.loc[0, "p_vs_best"]) and table.loc[1, "p_vs_best"] < 1e-10
    md = to_markdown(table)
    assert md.splitlines()[0].startswith("| model | ndcg@10 | coverage@10")
    assert "strong" in md.splitlines()[2]
    paths = save_leaderboard(table, tmp_path / "out")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert pd.read_csv(paths["csv"])["model"].tolist() == ["strong", "weak"]


def test_compare_runs_models(planted) -> None:
    res = compare(planted, ["random", "pop", "bias"], protocol="loo", progress=False)
    assert res.leaderboard["model"].tolist() == ["pop", "random"]  # top-N models
    assert res.ratings["model"].tolist() == ["bias"] and res.ratings.loc[0, "rmse"] > 0  # rating models apart
    assert "recall@10" not in res.leaderboard.columns  # one test item per user: recall@10 would repeat hr@10
    both = compare(planted, ["pop", "bias"], protocol="loo", progress=False, rank_rating_models=True)
    assert set(both.leaderboard["model"]) == {"pop", "bias"}
    with pytest.raises(UnknownNameError, match="available protocols"):
        get_protocol("nope")
    for name in ("loo", "random", "temporal", "last5", "users"):
        (split,) = get_protocol(name).splits(planted, seed=0)
        assert isinstance(split, S.Split) and len(split.test) > 0


def test_the_terminal_leaderboard_fits_and_shows_each_metric_once(capsys) -> None:
    import pandas as pd

    from recforge.evaluation import print_leaderboard

    table = pd.DataFrame({"model": ["ease", "pop"], "ndcg@10": [0.0409, 0.0194], "ndcg@10_lo": [0.0301, 0.012],
                          "ndcg@10_hi": [0.053, 0.028], "map@10": [0.0278, 0.0125], "mrr@10": [0.0278, 0.0125],
                          "hr@10": [0.0852, 0.0426], "coverage@10": [0.07, 0.01], "fit_seconds": [5.37, 0.01],
                          "p_vs_best": [float("nan"), 0.0002]})
    table.attrs["primary"] = "ndcg@10"
    print_leaderboard(table, title="t", kinds={"ease": "binary", "pop": "counts"}, note="what the protocol does")
    text = capsys.readouterr().out
    assert "0.0409 [0.030, 0.053]" in text and "<0.001" in text and "binary" in text
    assert "mrr@10 = map@10" in text and " mrr@10 " not in text.splitlines()[2]  # the repeat is not a column
    assert "[lo, hi]: 95% bootstrap interval" in text and "what the protocol does" in text
    assert max(len(line) for line in text.splitlines()) <= 100 and "\x1b[" not in text
