"""The command line: exit codes, stdout and stderr of ``recforge.cli.main`` run in this process (the entry point
itself runs as a real process in tests/test_cli_usage.py)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recforge.cli import main
from recforge.data.datasets import make_synthetic
from recforge.data.impressions import read_impressions


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``recforge ARGS`` as a process would run it (numpy's default error handling, not the suite's ``raise``),
    without paying a process start per call."""
    out, err, here, argv = io.StringIO(), io.StringIO(), Path.cwd(), sys.argv
    sys.argv = ["recforge", *args]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), np.errstate(all="warn", under="ignore"):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        os.chdir(here)
        sys.argv = argv
    return subprocess.CompletedProcess(["recforge", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """TRAIN/TEST CSVs made outside recforge's splitters: last event per user is test."""
    d = tmp_path_factory.mktemp("files")
    df = make_synthetic(n_users=150, n_items=80, n_interactions=4000, seed=2).to_frame()
    df = df.sort_values(["user_id", "timestamp"])
    last = df.groupby("user_id").tail(1)
    train = df.drop(last.index)
    train.to_csv(d / "train.csv", index=False)
    last.to_parquet(d / "test.parquet", index=False)
    return d / "train.csv", d / "test.parquet"


def test_evaluate_files_json(files: tuple[Path, Path]) -> None:
    train, test = files
    out = run("evaluate", "--train", str(train), "--test", str(test), "--model", "bias", "--set", "item_reg=2", "--json",
              "--no-tune")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert {"rmse", "mae", "rating_ndcg", "fit_seconds"} <= set(res) and "ndcg@10" not in res  # judged on ratings
    assert res["users"] == 150 and res["rmse"] > 0
    from typer.testing import CliRunner

    from recforge.cli import app

    ranked = json.loads(CliRunner().invoke(app, ["evaluate", "--train", str(train), "--test", str(test), "--model",
                                                 "bias", "--json", "--no-tune", "--rank-rating-models"]).stdout)
    assert 0 <= ranked["hr@10"] <= 1 and ranked["rmse"] == pytest.approx(res["rmse"])


def test_evaluate_tunes_on_validation_carved_from_train(files: tuple[Path, Path]) -> None:
    from typer.testing import CliRunner

    from recforge.cli import _tune_budget, app
    from recforge.errors import ParameterError

    train, test = files
    out = CliRunner().invoke(app, ["evaluate", "--train", str(train), "--test", str(test), "--model", "ease",
                                   "--tune-budget", "3", "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert res["notes"]["validation"].startswith("carved from TRAIN: the last event of each user")
    assert 1 <= res["params"]["reg"] <= 20000  # chosen in EASE's search space
    assert _tune_budget("8") == (8, None) and _tune_budget("90s") == (None, 90.0) and _tune_budget("2m") == (None, 120.0)
    for bad in ("-2", "0", "x", "", "5h"):
        with pytest.raises(ParameterError, match="--tune-budget must be"):
            _tune_budget(bad)


def test_evaluate_matches_python_api(files: tuple[Path, Path]) -> None:
    from recforge.evaluation import evaluate
    from recforge.experiments.trials import read_split_files
    from recforge.models import create_model

    train, test = files
    out = run("evaluate", "--train", str(train), "--test", str(test), "--model", "pop", "--k", "5", "--json")
    split = read_split_files({"train": train, "test": test})
    api = evaluate(create_model("pop").fit(split.train), split.test, k=5)
    assert json.loads(out.stdout)["ndcg@5"] == pytest.approx(api["ndcg@5"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "--train", "missing.csv", "--test", "missing.csv", "--model", "pop"], "file not found"),
        (["evaluate", "--train", "{bad}", "--test", "{test}", "--model", "pop"], "lacks the column(s)"),
        (["evaluate", "--train", "{train}", "--test", "{test}", "--model", "nosuch"], "unknown model 'nosuch'"),
        (["evaluate", "--train", "{train}", "--test", "{test}", "--model", "pop", "--set", "alpha=1"], "no parameter"),
        (["evaluate", "--train", "{train}", "--model", "pop"], "give both --train and --test"),
        (["compare", "--dataset", "nosuch-dataset"], "unknown dataset"),
        (["evaluate", "--dataset", "ml-latest-small", "--protocol", "nope", "--model", "pop"], "unknown protocol"),
    ],
)
def test_bad_input_one_line_error(files: tuple[Path, Path], tmp_path: Path, args: list[str], message: str,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from recforge.cli import main

    train, test = files
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"user": [1], "item_id": [2]}).to_csv(bad, index=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["recforge", *(a.format(train=train, test=test, bad=bad) for a in args)])
    with pytest.raises(SystemExit) as exited:  # in this process: the entry point itself is tested in test_cli_usage
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_recommend_split(tmp_path: Path) -> None:
    art = tmp_path / "pop-model"
    out = run("train", "--model", "pop", "--out", str(art))
    assert out.returncode == 0, out.stderr
    out = run("recommend", str(art), "--user", "1", "--user", "2", "--k", "3", "--format", "csv")
    assert out.returncode == 0, out.stderr
    recs = pd.read_csv(pd.io.common.StringIO(out.stdout))
    assert list(recs.columns) == ["user_id", "item_id", "score", "rank", "title"]
    assert len(recs) == 6 and recs["title"].notna().all()
    out = run("recommend", str(art), "--user", "999999")
    assert out.returncode == 2 and "unknown users" in out.stderr
    out = run("split", "--protocol", "temporal", "--out", str(tmp_path / "split"), "--format", "parquet")
    assert out.returncode == 0, out.stderr
    parts = {p: pd.read_parquet(tmp_path / "split" / f"{p}.parquet") for p in ("train", "valid", "test")}
    assert sum(len(v) for v in parts.values()) == 100_836
    assert parts["train"]["timestamp"].max() <= parts["test"]["timestamp"].min()


def test_compare_writes_report(tmp_path: Path) -> None:
    out = run("compare", "--models", "pop,random", "--out", str(tmp_path / "cmp"), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "pop" in out.stdout and "ndcg@10 [95% CI]" in out.stdout and "\x1b[" not in out.stdout  # no escapes
    assert max(len(line) for line in out.stdout.split("\ndata:")[0].splitlines()) <= 100  # the tables fit
    winner = tmp_path / "cmp" / "winner"  # the best model refitted on all the data, ready to serve
    assert f"next: recforge recommend {winner} --user 1" in out.stdout and (winner / "model.json").is_file()
    table = pd.read_csv(tmp_path / "cmp" / "leaderboard.csv")
    assert table["model"].tolist() == ["pop", "random"]
    assert (tmp_path / "cmp" / "leaderboard.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "leaderboard.md").read_text().startswith("| model |")


def test_datasets_commands() -> None:
    out = run("datasets", "describe", "ml-latest-small", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["interactions"] == 100_836 and info["users"] == 610
    out = run("models")
    assert "pop" in out.stdout and "bias" in out.stdout


def test_train_content_similar_and_cold_items_compare(tmp_path: Path) -> None:
    art = tmp_path / "content"
    out = run("train", "--model", "content", "--out", str(art), "--quiet")
    assert out.returncode == 0, out.stderr
    out = run("similar", str(art), "--item", "1", "--item", "260", "--k", "3", "--format", "csv")
    assert out.returncode == 0, out.stderr
    sim = pd.read_csv(pd.io.common.StringIO(out.stdout))
    assert list(sim.columns) == ["item_id", "similar_item_id", "score", "rank", "title"]
    assert sim.query("item_id == 1")["title"].iloc[0] == "Toy Story 2 (1999)"
    assert sim.query("item_id == 260")["title"].str.startswith("Star Wars").all()
    out = run("similar", str(art), "--item", "not-a-number")
    assert out.returncode == 2 and "integers" in out.stderr
    out = run("compare", "--models", "pop,content", "--protocol", "cold-items", "--out", str(tmp_path / "cmp"), "--quiet")
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "cmp" / "leaderboard.csv").set_index("model")
    assert table.loc["content", "ndcg@10"] > 2 * table.loc["pop", "ndcg@10"]
    assert table.loc["pop", "cold_share@10"] == 0.0


def test_simulate_writes_results_and_scores(tmp_path: Path) -> None:
    out = run("simulate", "--policies", "random,greedy-static,linucb", "--test-episodes", "2", "--quiet",
              "--train-users", "100", "--test-users", "100",
              "--set", "linucb.alpha=0.2", "--out", str(tmp_path / "sim"))
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "sim" / "results.csv").set_index("policy")
    assert table.loc["linucb", "test ctr"] > table.loc["greedy-static", "test ctr"] > table.loc["random", "test ctr"]
    scores = pd.read_csv(tmp_path / "sim" / "scores_linucb.csv")
    assert list(scores.columns) == ["user_id", "avg_score"]
    out = run("simulate", "--policies", "nope", "--quiet", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "unknown policy" in out.stderr
    out = run("simulate", "--set", "alpha=3", "--quiet", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "name the policy" in out.stderr


def simulate_small(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``recforge simulate`` on 20 training and 30 test users, one test episode."""
    return run("simulate", *args, "--train-episodes", "0", "--test-episodes", "1", "--train-users", "20",
               "--test-users", "30", "--out", str(tmp_path / "sim"))


def test_simulate_logs_impressions_of_exploring_policies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "log.parquet"
    out = simulate_small(tmp_path, "--policies", "greedy-static,random", "--explore", "epsilon:0.3", "--log", str(log),
                         "--quiet")
    assert out.returncode == 0, out.stderr
    frame = read_impressions(log)
    assert set(frame["policy"]) == {"greedy-static+epsilon:0.3", "random"}
    greedy = frame[frame["policy"] != "random"]
    # about 70% of the exploring policy's slates are its own (probability 0.7 + a tiny uniform share)
    assert 0.55 < (greedy["slate_propensity"] > 0.5).mean() < 0.85
    with caplog.at_level(logging.WARNING, logger="recforge"):
        mixed = simulate_small(tmp_path, "--policies", "hybrid,pop", "--log", str(log))
    assert mixed.returncode == 0 and "hybrid draw slates with probabilities they do not know" in caplog.text
    assert set(read_impressions(log)["policy"]) == {"pop"}
    out = simulate_small(tmp_path, "--policies", "pop", "--mix", "greedy-static=0.6,pop=0.4", "--log", str(log), "--quiet")
    assert out.returncode == 0, out.stderr
    mixture = read_impressions(log).query("policy == 'mix(greedy-static=0.6,pop=0.4)'")
    assert len(mixture) and (mixture["slate_propensity"] >= 0.4 - 1e-9).all()
    for args, message in ((["--log", str(tmp_path / "log.csv")], "Parquet"),
                          (["--mix", "pop=0.5,greedy-static=0.4"], "sum to 1"),
                          (["--mix", "pop=1,random=0"], "draw slates at random"),
                          (["--mix", "pop"], "policy=weight pairs"),
                          (["--policies", "hybrid,thompson", "--log", str(log)], "probabilities they do not know"),
                          (["--explore", "maybe"], "exploration must be")):
        bad = run("simulate", *args, "--quiet", "--out", str(tmp_path / "x"))
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_ope_estimates_targets_from_a_simulated_log(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    assert simulate_small(tmp_path, "--policies", "pop", "--log", str(log), "--quiet").returncode == 0

    def ope(*args: str, out: str = "ope") -> subprocess.CompletedProcess:
        return run("ope", str(log), *args, "--sizes", "100", "--train-users", "20", "--test-users", "30", "--quiet",
                   "--out", str(tmp_path / out))

    table = ope("--policies", "greedy-static,pop,linucb")
    assert table.returncode == 0, table.stderr
    assert "| greedy-static | iips |" in table.stdout and "100 impressions" in table.stdout
    assert "| linucb | iips |" in table.stdout  # trained one episode, then frozen
    saved = pd.read_csv(tmp_path / "ope" / "ope.csv")
    assert set(saved["estimator"]) == {"ips", "snips", "iips", "rips"} and (tmp_path / "ope" / "ope.png").exists()
    dr = ope("--policies", "greedy-static", "--estimators", "dm,dr", "--reward-model", "pop", out="ope-dr")
    assert dr.returncode == 0, dr.stderr
    assert pd.read_csv(tmp_path / "ope-dr" / "ope.csv")["value"].between(0, 5).all()
    explored = tmp_path / "explored.parquet"
    assert simulate_small(tmp_path, "--policies", "greedy-static", "--explore", "epsilon:0.5", "--log", str(explored),
                          "--quiet").returncode == 0
    pi = run("ope", str(explored), "--policies", "greedy-static,random", "--estimators", "iips,pi", "--sizes", "100",
             "--train-users", "20", "--test-users", "30", "--quiet", "--out", str(tmp_path / "ope-pi"))
    assert pi.returncode == 0, pi.stderr
    pi_rows = pd.read_csv(tmp_path / "ope-pi" / "ope.csv").query("estimator == 'pi' and impressions == 100").set_index("target")
    assert np.isfinite(pi_rows.loc["greedy-static", "value"]) and np.isnan(pi_rows.loc["random", "value"])
    mixed = tmp_path / "mixed.parquet"
    assert simulate_small(tmp_path, "--policies", "pop", "--mix", "greedy-static=0.5,pop=0.5", "--log", str(mixed),
                          "--quiet").returncode == 0
    bad = run("ope", str(mixed), "--estimators", "pi", "--train-users", "20", "--test-users", "30", "--quiet",
              "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "one epsilon-greedy" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    for args, message in ((["--estimators", "ips,magic"], "unknown: magic"), (["--sizes", "ten"], "whole numbers"),
                          (["--estimators", "dr"], "need a reward model"),
                          (["--estimators", "dm", "--reward-model", "nope"], "unknown model")):
        bad = run("ope", str(log), *args, "--quiet", "--out", str(tmp_path / "x"))
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_compare_sets_parameters_prints_json_and_separates_rating_models(tmp_path: Path) -> None:
    out = run("compare", "--models", "pop,ease,bias", "--set", "ease.reg=50", "--json", "--out", str(tmp_path / "c"),
              "--no-tune")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert [r["model"] for r in res["leaderboard"]] == ["ease", "pop"]
    assert [r["model"] for r in res["ratings"]] == ["bias"] and res["ratings"][0]["rmse"] > 0
    assert res["params"]["ease"]["reg"] == 50
    assert "recall@10" not in res["leaderboard"][0]  # one test item per user: hr@10 only
    assert "rating_ndcg" not in res["ratings"][0]  # likewise one test rating: its graded NDCG is 1 by construction
    assert (tmp_path / "c" / "ratings.md").exists() and (tmp_path / "c" / "trials.csv").exists()
    again = run("compare", "--models", "pop", "--json", "--out", str(tmp_path / "c"), "--resume")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["leaderboard"][0]["ndcg@10"] == res["leaderboard"][1]["ndcg@10"]
    bad = run("compare", "--models", "pop,ease", "--set", "reg=1", "--out", str(tmp_path / "d"))
    assert bad.returncode == 2 and "name the model" in bad.stderr


def test_evaluate_with_item_side_data_and_validation(tmp_path: Path) -> None:
    data = make_synthetic(n_users=120, n_items=60, n_interactions=3000, seed=4)
    df = data.to_frame().sort_values(["user_id", "timestamp"])
    last = df.groupby("user_id").tail(1)
    rest = df.drop(last.index)
    valid = rest.groupby("user_id").tail(1)
    rest.drop(valid.index).to_csv(tmp_path / "train.csv", index=False)
    valid.to_csv(tmp_path / "valid.csv", index=False)
    last.to_csv(tmp_path / "test.csv", index=False)
    data.item_data.reset_index(names="item_id").to_csv(tmp_path / "items.csv", index=False)
    files = ["--train", str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv"),
             "--test", str(tmp_path / "test.csv"), "--items", str(tmp_path / "items.csv")]
    out = run("evaluate", *files, "--model", "content", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["users"] == 120
    sas = run("evaluate", *files, "--model", "sasrec", "--set", "epochs=4", "--set", "n_factors=16",
              "--set", "max_len=20", "--set", "num_threads=1", "--json", "--no-tune")
    assert sas.returncode == 0, sas.stderr
    assert 1 <= json.loads(sas.stdout)["params"]["epochs"] <= 4  # early-stopped on VALID, then refitted
    no_items = run("evaluate", *files[:6], "--model", "content")
    assert no_items.returncode == 2 and "side data" in no_items.stderr


def test_json_output_is_strict_json(capsys, caplog) -> None:
    import numpy as np

    from recforge.cli import _echo_json

    _echo_json({"rmse": float("nan"), "hr": np.float32(0.5), "n": np.int64(3), "ci": [1.0, float("inf")],
                "progress": False})
    text = capsys.readouterr().out
    assert json.loads(text) == {"rmse": None, "hr": 0.5, "n": 3, "ci": [1.0, None], "progress": False}
    assert "NaN" not in text and "Infinity" not in text and "rmse, ci[1]" in caplog.text


def test_refit_adds_the_feedback_log_and_protects_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from recforge.cli import app
    from recforge.models import Recommender
    from recforge.serve import FeedbackLog

    runner = CliRunner()
    artifact = tmp_path / "pop"
    assert runner.invoke(app, ["train", "--model", "pop", "--out", str(artifact)]).exit_code == 0
    FeedbackLog(artifact / "feedback").append([{"user": 424242, "item": 1, "timestamp": 5}])
    refused = runner.invoke(app, ["refit", str(artifact), "--out", str(artifact)])
    assert "would lose acknowledged events" in str(refused.exception)  # main() makes it one line, exit 2
    done = runner.invoke(app, ["refit", str(artifact), "--out", str(tmp_path / "pop2")])
    assert done.exit_code == 0, done.output
    model = Recommender.load(tmp_path / "pop2")
    assert 424242 in model.user_map_.ids and sum(model.feedback_offsets_.values()) > 0
