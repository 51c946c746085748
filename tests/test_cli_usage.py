"""Usage errors of every subcommand: one line and the usage hint, exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pandas as pd
import pytest
import typer

from recforge import __version__
from recforge.cli import app, main


def _commands() -> list[tuple[list[str], Any]]:
    """Every leaf subcommand with the words that call it."""
    out: list[tuple[list[str], Any]] = []

    def walk(group: Any, path: list[str]) -> None:
        for name, cmd in getattr(group, "commands", {}).items():
            if getattr(cmd, "commands", None):
                walk(cmd, [*path, name])
            else:
                out.append(([*path, name], cmd))

    walk(typer.main.get_command(app), [])
    return out


COMMANDS = _commands()


def _main(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["recforge", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out + captured.err


def _check_usage_error(code: int, text: str, expected: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text and expected in text, text
    assert "Usage: recforge" in text and "--help" in text  # the usage hint


def test_every_subcommand_is_covered() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"compare", "evaluate", "recommend", "serve", "datasets describe", "simulate"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=[" ".join(p) for p, _ in COMMANDS])
def test_a_wrong_option_is_one_line_and_the_usage(path: list[str], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _main([*path, "--no-such-option"], monkeypatch, capsys)
    _check_usage_error(code, text, "No such option: --no-such-option")


def _required(cmd: Any) -> list[Any]:
    return [p for p in cmd.params if p.required]


@pytest.mark.parametrize("path", [p for p, c in COMMANDS if _required(c)],
                         ids=[" ".join(p) for p, c in COMMANDS if _required(c)])
def test_a_missing_argument_is_one_line_and_the_usage(path: list[str], monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _main(path, monkeypatch, capsys)
    _check_usage_error(code, text, "Missing")


def _numeric_option(cmd: Any) -> str | None:
    for p in cmd.params:
        if p.param_type_name == "option" and str(p.bare_type()) in ("int", "float", "list[int]", "list[float]"):
            return max(p.opts, key=len)
    return None


@pytest.mark.parametrize("path", [p for p, c in COMMANDS if _numeric_option(c)],
                         ids=[" ".join(p) for p, c in COMMANDS if _numeric_option(c)])
def test_a_bad_value_is_one_line_and_the_usage(path: list[str], monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cmd = {" ".join(p): c for p, c in COMMANDS}[" ".join(path)]
    required = [arg for p in _required(cmd) for arg in ((max(p.opts, key=len), "x") if p.param_type_name == "option"
                                                       else ("x",))]
    code, text = _main([*path, *required, _numeric_option(cmd) or "", "abc"], monkeypatch, capsys)
    _check_usage_error(code, text, "Invalid value")


@pytest.mark.parametrize("path", [["compare"], ["evaluate", "--train", "x", "--test", "y"], ["recommend", "x"],
                                  ["similar", "x"]], ids=["compare", "evaluate", "recommend", "similar"])
def test_a_list_length_below_one_is_a_usage_error(path: list[str], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _main([*path, "-k", "0"], monkeypatch, capsys)
    _check_usage_error(code, text, "'-k': Input should be greater than or equal to 1")


def test_version_and_an_unknown_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _main(["--version"], monkeypatch, capsys)
    assert code == 0 and text.strip() == f"recforge {__version__}"
    code, text = _main(["comapre"], monkeypatch, capsys)
    _check_usage_error(code, text, "No such command 'comapre'")


def test_the_installed_entry_point_answers_usage_errors_without_a_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "recforge", "compare", "--model", "pop"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "No such option: --model" in out.stderr


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--policies", "random,linucbb"], "unknown policy 'linucbb'"),
    (["simulate", "--policies", "random", "--set", "linucb.alpha=1"], "'linucb' is not one of --policies"),
    (["simulate", "--policies", "linucb", "--set", "linucb.alhpa=1"], "has no parameter(s) ['alhpa']"),
])
def test_names_are_checked_before_any_work(argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import recforge.cli

    def no_work(*_: Any) -> None:
        raise AssertionError("the data was loaded before the names were checked")

    monkeypatch.setattr(recforge.cli, "_load", no_work)
    code, text = _main(argv, monkeypatch, capsys)
    assert code == 2 and message in text and len(text.strip().splitlines()) == 1


def test_models_lists_and_describes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _main(["models"], monkeypatch, capsys)
    lines = text.splitlines()
    assert code == 0 and any(line.startswith("ease ") and "binary" in line for line in lines)
    assert max(len(line) for line in lines) <= 100
    code, text = _main(["models", "als"], monkeypatch, capsys)
    assert code == 0 and "learns from counts" in text and "alpha                0.005 (tuned)" in text


def test_describe_is_readable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _main(["datasets", "describe", "ml-latest-small"], monkeypatch, capsys)
    assert code == 0 and "density: 1.7%" in text and "time_max: 2018-09-24 14:27 UTC" in text
    assert "interactions: 100,836" in text


@pytest.fixture(scope="module")
def own_csv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A user's own export: other column names, ';'-separated, and a TRAIN/TEST cut of it."""
    from recforge.data.datasets import make_synthetic

    folder = tmp_path_factory.mktemp("own")
    frame = make_synthetic(n_users=60, n_items=40, n_interactions=1500, seed=5).to_frame()
    frame = frame.rename(columns={"user_id": "uid", "item_id": "song", "timestamp": "ts"}).drop(columns="rating")
    frame.to_csv(folder / "events.csv", sep=";", index=False)
    last = frame.sort_values("ts").groupby("uid").tail(1)
    frame.drop(last.index).to_csv(folder / "train.csv", sep=";", index=False)
    last.to_csv(folder / "test.csv", sep=";", index=False)
    cols = ["--user-col", "uid", "--item-col", "song", "--time-col", "ts", "--sep", ";"]
    return {"folder": folder, "cols": cols}


def test_own_column_names_on_every_command_that_reads_a_file(own_csv: dict[str, Any], tmp_path, monkeypatch,
                                                             capsys) -> None:
    folder, cols = own_csv["folder"], own_csv["cols"]
    events = str(folder / "events.csv")
    code, text = _main(["datasets", "describe", events, "--sep", ";"], monkeypatch, capsys)
    assert code == 2 and "missing user column 'user_id'" in text and "pass --user-col ..." in text
    assert "user_col=" not in text  # the CLI names its options, not Python arguments
    code, text = _main(["datasets", "describe", events, *cols], monkeypatch, capsys)
    assert code == 0 and "interactions: 1,500" in text
    code, text = _main(["datasets", "describe", "ml-latest-small", "--user-col", "u"], monkeypatch, capsys)
    assert code == 2 and "(--user-col: they are for data files)" in text
    code, text = _main(["evaluate", "--train", str(folder / "train.csv"), "--test", str(folder / "test.csv"),
                        "--model", "pop", "--no-tune", "--json", "-q", *cols[:4], "--sep", ";"], monkeypatch, capsys)
    assert code == 0 and '"hr@10"' in text
    code, text = _main(["evaluate", "--train", str(folder / "train.csv"), "--test", str(folder / "test.csv"),
                        "--model", "pop", "--sep", ";"], monkeypatch, capsys)
    assert code == 2 and "lacks the column(s) ['user_id', 'item_id']" in text and "--user-col ... and --item-col" in text
    for argv in (["split", "-d", events, "-o", str(tmp_path / "split")],
                 ["train", "-m", "pop", "-d", events, "-o", str(tmp_path / "pop")],
                 ["compare", "-d", events, "--models", "pop", "--no-tune", "-q", "-o", str(tmp_path / "cmp")]):
        code, text = _main([*argv, *cols], monkeypatch, capsys)
        assert code == 0, text


def test_python_errors_name_python_arguments(own_csv: dict[str, Any]) -> None:
    from recforge.data import Interactions
    from recforge.errors import DataError

    with pytest.raises(DataError, match=r"pass user_col=\.\.\. to name the right one"):
        Interactions.from_file(own_csv["folder"] / "events.csv", sep=";")


def test_recommend_skips_unknown_users_when_asked(tmp_path, monkeypatch, capsys) -> None:
    code, text = _main(["train", "-m", "pop", "-o", str(tmp_path / "pop"), "-q"], monkeypatch, capsys)
    assert code == 0, text
    code, text = _main(["recommend", str(tmp_path / "pop"), "--user", "99999"], monkeypatch, capsys)
    assert code == 2 and "pass --on-unknown warn or --on-unknown ignore" in text
    code, text = _main(["recommend", str(tmp_path / "pop"), "--user", "99999", "--user", "1", "-k", "2",
                        "--on-unknown", "ignore", "--format", "csv"], monkeypatch, capsys)
    assert code == 0 and text.count("\n1,") == 2  # user 1's two items; 99999 skipped


def test_folds_needs_ml_100k_and_metric_sorts(tmp_path, monkeypatch, capsys) -> None:
    code, text = _main(["compare", "--protocol", "folds", "--models", "pop", "-q"], monkeypatch, capsys)
    assert code == 2 and "official ML-100K folds" in text and "'ml-latest-small' does not have" in text
    code, text = _main(["compare", "--models", "pop", "--metric", "bogus", "-q"], monkeypatch, capsys)
    assert code == 2 and "cannot sort by 'bogus'" in text and "mrr" in text
    code, text = _main(["compare", "--models", "pop,itemknn", "--no-tune", "-q", "--metric", "mrr", "-o",
                        str(tmp_path / "c")], monkeypatch, capsys)
    assert code == 0, text
    board = pd.read_csv(tmp_path / "c" / "leaderboard.csv")
    assert list(board.columns[1:4]) == ["mrr", "mrr_lo", "mrr_hi"] and board["mrr"].is_monotonic_decreasing


def test_a_huge_id_is_an_unknown_user_and_a_bad_dedupe_policy_is_named(tmp_path, monkeypatch, capsys) -> None:
    from recforge.data import Interactions
    from recforge.errors import DataError

    code, text = _main(["train", "-m", "pop", "-o", str(tmp_path / "pop"), "-q"], monkeypatch, capsys)
    huge = "9" * 30  # beyond int64: cannot be one of the model's integer ids
    code, text = _main(["recommend", str(tmp_path / "pop"), "--user", huge], monkeypatch, capsys)
    assert code == 2 and f"1 unknown users (e.g. {huge})" in text and "Traceback" not in text
    code, text = _main(["recommend", str(tmp_path / "pop"), "--user", huge, "--user", "1", "-k", "1",
                        "--on-unknown", "ignore", "--format", "csv"], monkeypatch, capsys)
    assert code == 0 and text.count("\n1,") == 1  # the known user still gets its list
    data = Interactions.from_frame(pd.DataFrame({"user_id": [1, 1], "item_id": [2, 2]}))
    with pytest.raises(DataError, match="unknown duplicate policy 'max'"):
        data.deduplicate("max")  # type: ignore[arg-type]


def test_run_describes_its_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _main(["run", "--help-config"], monkeypatch, capsys)  # no config file needed
    assert code == 0 and "select_metric: string" in out and "search: " in out


def test_compare_writes_a_new_run_and_never_replaces_one_unasked(own_csv: dict[str, Any], tmp_path, monkeypatch,
                                                                 capsys) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["compare", "-d", str(own_csv["folder"] / "events.csv"), *own_csv["cols"], "--models", "pop", "--no-tune",
            "-q"]

    def saved(argv: list[str]) -> str:
        code, text = _main([*base, *argv], monkeypatch, capsys)
        assert code == 0, text
        return next(line for line in text.splitlines() if line.startswith("saved: "))[7:]

    first = saved([])
    assert first == "results/compare/events.csv-loo" and saved([]) == first + "-2"  # the first run is kept
    assert saved(["--resume"]) == first + "-2"  # the latest run, continued
    code, text = _main([*base, "-o", first], monkeypatch, capsys)
    assert code == 2 and "holds an earlier run: --resume adds to it, --overwrite replaces it" in text
    stamp = (tmp_path / first / "config.json").stat().st_mtime_ns
    assert saved(["-o", first, "--overwrite"]) == first and (tmp_path / first / "config.json").stat().st_mtime_ns > stamp
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, text = _main([*base, "-o", "mine", "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "not a results folder" in text and (tmp_path / "mine" / "notes.txt").exists()
    code, text = _main([*base, "--resume", "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "not both" in text
    code, text = _main([*base, "-o", "mine/notes.txt", "--resume"], monkeypatch, capsys)
    assert code == 2 and "'mine/notes.txt' is a file, not a folder" in text and "Traceback" not in text


def test_the_command_fixes_cublas_workspace_before_any_gpu_work(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """cuBLAS reads its workspace setting once, when the process first uses it: the command sets it at start, and
    recforge's torch code when imported (unless the environment chose one); chosen only after the process used a
    GPU, a deterministic fit says so."""
    import os

    import torch

    from recforge.core import device as D

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    monkeypatch.setattr(sys, "argv", ["recforge", "--version"])
    with pytest.raises(SystemExit):
        main()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's choice stands
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    with pytest.raises(SystemExit):
        main()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not D.choose_cublas_workspace()  # already chosen
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    assert D.choose_cublas_workspace() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    D._warn_cublas_chosen_late.cache_clear()  # it warns once a process
    for late in (False, True):
        monkeypatch.setattr(D, "CUBLAS_CHOSEN_LATE", late)
        with caplog.at_level("WARNING", logger="recforge.core.device"), D.deterministic_algorithms(True):
            pass
        assert ("used a GPU before CUBLAS_WORKSPACE_CONFIG was set" in caplog.text) == late


def test_device_option_is_checked_and_reaches_every_auto_device(tmp_path, monkeypatch, capsys) -> None:
    from recforge.core.device import resolve_device

    monkeypatch.setenv("RECFORGE_DEVICE", "auto")  # restored after the test: --device sets it for this process
    code, text = _main(["train", "-m", "pop", "-o", str(tmp_path / "p"), "--device", "tpu"], monkeypatch, capsys)
    _check_usage_error(code, text, "device 'tpu': a device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    code, text = _main(["train", "-m", "pop", "-o", str(tmp_path / "p"), "-q", "--device", "cpu"], monkeypatch, capsys)
    assert code == 0, text
    assert resolve_device("auto").type == "cpu"  # what a neural model left at device="auto" now trains on


def test_device_names_follow_one_rule_in_the_option_the_environment_and_the_parameter(tmp_path, monkeypatch,
                                                                                      capsys) -> None:
    """Case and surrounding spaces never matter; ``cpu:0`` is no device name anywhere; a typo in the environment
    is one line before any work, even for a model that never asks for a device."""
    from recforge.core.device import resolve_device
    from recforge.core.params import DeviceName, device_name

    assert [device_name(v) for v in (" cpu", "CPU", "Cuda:1", "AUTO\n")] == ["cpu", "cpu", "cuda:1", "auto"]
    assert [device_name(v) for v in ("cpu:0", "cuda:x", "", "tpu", 3, "cuda:\u0661", "cuda:\uff10")] == [None] * 7
    assert DeviceName().accepts(" CPU") and not DeviceName().accepts("cpu:0")
    monkeypatch.setenv("RECFORGE_DEVICE", " CPU ")
    assert resolve_device("auto").type == "cpu" and resolve_device("Cpu").type == "cpu"
    monkeypatch.setenv("RECFORGE_DEVICE", "auto")
    code, text = _main(["train", "-m", "pop", "-o", str(tmp_path / "p"), "--device", "cpu:0"], monkeypatch, capsys)
    _check_usage_error(code, text, "a device must be")
    monkeypatch.setenv("RECFORGE_DEVICE", "meta")
    code, text = _main(["train", "-m", "pop", "-o", str(tmp_path / "p")], monkeypatch, capsys)
    assert code == 2 and text.strip() == "error: RECFORGE_DEVICE='meta': a device must be 'auto', 'cpu', 'cuda' or " \
        "'cuda:N'"
    code, text = _main(["train", "-m", "pop", "-o", str(tmp_path / "p"), "-q", "--device", "cpu"], monkeypatch, capsys)
    assert code == 0, text  # the option replaces the variable
    code, text = _main(["train", "--help"], monkeypatch, capsys)
    assert code == 0 and "--device" in text
