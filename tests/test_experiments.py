"""Config-driven experiments: typed configs, validation-tuned grids, resumable and parallel runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recforge.data import Interactions
from recforge.errors import DataError
from recforge.experiments import ExperimentConfig, run_experiment
from recforge.experiments.trials import Trial

SYNTH = {"name": "synthetic", "options": {"n_users": 200, "n_items": 120, "n_interactions": 6000, "n_clusters": 4, "seed": 3}}


def config(**extra) -> ExperimentConfig:
    raw = {"name": "t", "dataset": SYNTH, "protocol": "loo", "filters": {"deduplicate": "last"},
           "models": ["pop", {"name": "ease", "grid": {"reg": [1.0, 1000.0]}}], **extra}
    return ExperimentConfig.from_dict(raw)


def test_config_round_trips_and_rejects_bad_fields(tmp_path: Path) -> None:
    cfg = config()
    assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert [m.name for m in cfg.models] == ["pop", "ease"] and len(cfg.models[1].combinations()) == 2
    for bad, message in (({"colour": 1}, "unknown field"), ({"filters": {"k_cores": 5}}, "unknown filter"),
                         ({"models": []}, "non-empty"), ({"workers": 0}, "workers"),
                         ({"models": [{"name": "ease", "grid": {"reg": 3}}]}, "grid")):
        with pytest.raises(DataError, match=message):
            config(**bad)
    path = tmp_path / "c.toml"
    path.write_text("name = \"x\"\ndataset = \"ml-latest-small\"\nmodels = [\"pop\"]\n")
    assert ExperimentConfig.from_file(path).name == "x"
    (tmp_path / "c.yaml").write_text("name: [unclosed")
    with pytest.raises(DataError, match="could not parse"):
        ExperimentConfig.from_file(tmp_path / "c.yaml")



def test_config_errors_name_the_field_in_one_line() -> None:
    cases = (
        ({"exclude_seen": "no"}, "exclude_seen: must be a valid boolean, got 'no'"),
        ({"k": [10, 0]}, r"k\[1\]: must be greater than or equal to 1, got 0"),
        ({"search": {"n_trials": None}}, "n_trials may be null only with a search.timeout"),
        ({"search": {"trials": 3}}, "unknown field 'search.trials'"),
        ({"dataset": {"train": "a.csv"}}, "needs a 'dataset.test' field"),
        ({"dataset": {"name": "synthetic", "opts": {}}}, "unknown field 'dataset.opts'"),
        ({"models": ["pop", {"name": "ease", "grid": {"reg": []}}]}, r"models\[1\].grid.reg: must be a non-empty"),
        ({"models": [{"name": "ease", "space": {"reg": {"low": 1}}}]}, "space.reg needs low and high"),
        ({"models": [{"name": "ease", "grdi": {}}]}, r"unknown field 'models\[0\].grdi'"),
        ({"validation": "sometimes"}, "validation: must be 'refit', 'warm', 'reuse' or 'off'"),
        ({"dataset": {"train": "a", "test": "b"}, "filters": {"k_core": 2}}, "give no 'filters'"),
    )
    for bad, message in cases:
        with pytest.raises(DataError, match=message) as err:
            config(**bad)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="needs a 'name' field"):
        ExperimentConfig.from_dict({"dataset": "x", "models": ["pop"]})
    assert config(validation=False).validation == "off"  # YAML's bare `off`
    assert config(k=10).k == [10]


def test_config_reference_describes_every_field() -> None:
    from recforge.experiments.config import ModelSpec, SearchBudget, SplitFiles, config_reference

    text = config_reference()
    for model in (ExperimentConfig, ModelSpec, SearchBudget, SplitFiles):
        for name, info in model.model_fields.items():
            assert f"  {name}: " in text and info.description, name
    assert '"refit" | "warm" | "reuse" | "off"  (default "refit")' in text

def test_run_tunes_on_validation_writes_results_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "res"
    table = run_experiment(config(), out, progress=False).leaderboard
    assert set(table["model"]) == {"pop", "ease"}
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["part"] == "select").sum() == 2 and (trials["part"] == "test").sum() == 2
    select = trials[trials["part"] == "select"].set_index("params")["ndcg@10"]
    chosen = json.loads((out / "selected_params.json").read_text())["ease"]
    assert json.dumps(chosen, sort_keys=True) == select.idxmax()  # the validation winner was kept
    assert {"config.json", "environment.json", "leaderboard.md", "leaderboard.png"} <= {p.name for p in out.iterdir()}
    files = sorted((out / "trials").glob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    (files[0]).unlink()  # an interrupted run: one trial missing
    again = run_experiment(config(), out, progress=False).leaderboard
    pd.testing.assert_frame_equal(again.drop(columns="fit_seconds"), table.drop(columns="fit_seconds"))  # same seed
    assert [f.stat().st_mtime_ns for f in files[1:]] == stamps[1:]  # finished trials were not rerun
    with pytest.raises(DataError, match="different experiment"):
        run_experiment(config(seed=5), out, progress=False)


def test_a_damaged_trial_file_is_one_error_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "d"
    cfg = config(models=["ease"])
    run_experiment(cfg, out, progress=False)
    path = next((out / "trials").glob("*.json"))
    good = json.loads(path.read_text())
    for damage, message in (({"curve": ["x"]}, "'curve' that is not a list of numbers"),
                            ({"metrics": {"ndcg@10": "high"}}, "'metrics' that are not numbers"),
                            ({"pruned": "no"}, "'pruned' that is not true or false"), (None, "not valid JSON")):
        path.write_text("{" if damage is None else json.dumps({**good, **damage}))
        with pytest.raises(DataError, match=message) as info:
            run_experiment(cfg, out, progress=False)
        assert path.name in str(info.value) and "delete it" in str(info.value)


def test_a_changed_default_is_fitted_again_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recforge.models.linear import EASE

    out = tmp_path / "res"
    cfg = config(models=["ease"])
    first = run_experiment(cfg, out, progress=False).leaderboard
    n_first = len(list((out / "trials").glob("*.json")))
    defaults = list(EASE.__init__.__defaults__ or ())
    defaults[0] = 5.0  # an upgrade that changed EASE's default reg: the old trials no longer describe the model
    monkeypatch.setattr(EASE.__init__, "__defaults__", tuple(defaults))
    again = run_experiment(cfg, out, progress=False).leaderboard
    assert len(list((out / "trials").glob("*.json"))) == 2 * n_first
    assert again["ndcg@10"].iloc[0] != first["ndcg@10"].iloc[0]


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_parallel_workers_give_the_same_numbers(tmp_path: Path, backend: str,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    if backend == "ray":
        pytest.importorskip("ray")
    serial = run_experiment(config(), tmp_path / "a", progress=False).leaderboard
    parallel = run_experiment(config(workers=2), tmp_path / "b", progress=False, backend=backend).leaderboard
    assert "Token authentication" not in capfd.readouterr().err  # a private local Ray starts quietly
    pd.testing.assert_frame_equal(serial.drop(columns=["fit_seconds"], errors="ignore"),
                                  parallel.drop(columns=["fit_seconds"], errors="ignore"))
    assert len(list((tmp_path / "b" / "trials").glob("*.json"))) == 4  # every trial saved by the driver


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_a_trial_that_fails_on_a_worker_raises_its_own_one_line_error(tmp_path: Path, backend: str) -> None:
    if backend == "ray":
        pytest.importorskip("ray")
    from recforge.errors import RecforgeError

    cfg = config(models=[{"name": "ease", "params": {"max_items": 10, "device": "cpu"}}, "pop"], workers=2)
    with pytest.raises(RecforgeError) as info:
        run_experiment(cfg, tmp_path / backend, backend=backend, progress=False)
    assert "max_items" in str(info.value) and "\n" not in str(info.value) and "ray::" not in str(info.value)


def test_a_closed_executor_takes_no_more_trials_and_wakes_its_waiters() -> None:
    import threading

    from recforge.experiments import executors as E
    from recforge.experiments.trials import Trial

    task = Trial("x", "pop", "pop", {}, "select", 0)
    pool = E.ProcessExecutor([], 1)
    pool.close()
    with pytest.raises(RuntimeError, match="stopped"):
        next(pool.map([task]))  # not a fresh pool started behind the run's back
    pytest.importorskip("ray")
    ray = E.RayExecutor([], 1)
    try:
        ray._idle.clear()  # its one actor busy with another search's trial
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                next(ray.map([task]))
            except RuntimeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for an actor to free
    finally:
        ray.close()
    thread.join(10)
    assert not thread.is_alive() and "stopped" in str(errors[0])


def test_ray_workers_see_the_gpus_and_the_device_the_run_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray set an actor that asks for no GPU to CUDA_VISIBLE_DEVICES="" (its default until April 2026; the variable
    below restores it), so trials ran on the CPU, or failed under --device cuda, with the Ray backend on a GPU; and
    a cluster's workers inherit nothing from this process: the device choice and cuBLAS's setting go with them."""
    ray = pytest.importorskip("ray")
    import os

    from recforge.experiments import executors as E

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
    for name in ("RAY_ADDRESS", "RECFORGE_DEVICE", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # started without them, as a cluster is
    try:
        monkeypatch.setenv("RECFORGE_DEVICE", "cpu")
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        executor = E.RayExecutor([], 1)
        names = ("CUDA_VISIBLE_DEVICES", "RECFORGE_DEVICE", "CUBLAS_WORKSPACE_CONFIG")
        seen = ray.get(executor._actors[0].__ray_call__.remote(lambda _: [os.environ.get(n) for n in names]))
        executor.close()
    finally:
        ray.shutdown()
    assert seen == [os.environ["CUDA_VISIBLE_DEVICES"], "cpu", ":16:8"]


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from recforge.errors import UnknownNameError
    from recforge.experiments import executors as E

    assert E.resolve_backend("auto", 1, None) == "serial"
    assert E.resolve_backend("process", 4, None) == "process"
    with pytest.raises(UnknownNameError, match="available backends"):
        E.resolve_backend("dask", 2, None)
    with pytest.raises(DataError, match="ray backend"):
        E.resolve_backend("process", 2, "ray://head:10001")
    monkeypatch.setattr(E, "ray_available", lambda: False)
    assert E.resolve_backend("auto", 2, None) == "process"  # without Ray, the local pool
    with pytest.raises(DataError, match="pip install"):
        E.resolve_backend("auto", 2, "auto")
    monkeypatch.setattr(E, "ray_available", lambda: True)
    assert E.resolve_backend("auto", 2, None) == "ray"  # Ray by default when installed


def test_more_workers_than_cores_are_cut_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from recforge.experiments import executors as E

    monkeypatch.setattr(E, "resolve_threads", lambda threads: 4)
    with caplog.at_level("WARNING", logger="recforge.experiments.executors"):
        assert E.make_executor("process", 3, []).workers == 3
        assert not caplog.records
        pool = E.make_executor("process", 1000, [], threads_per_worker=2)  # a pool starts its processes lazily
    assert pool.workers == 2
    assert [r.getMessage() for r in caplog.records] == [
        "1000 workers of 2 thread(s) each asked for, but this machine has 4 cores: starting 2"]


def test_ray_address_variable_works_like_the_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from recforge.experiments import executors as E
    from recforge.experiments.runner import ExperimentRunner

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setattr(E, "ray_available", lambda: False)
    with pytest.raises(DataError, match="needs Ray"):  # one worker, auto: the cluster, not a serial run here
        ExperimentRunner(config(), tmp_path)
    assert ExperimentRunner(config(), tmp_path, backend="process").ray_address is None  # an explicit pool wins


def test_unreachable_ray_cluster_fails_fast_with_a_clear_error() -> None:
    from recforge.experiments import executors as E

    with pytest.raises(DataError, match="not 'auto', HOST:PORT"):
        E.check_ray_address("head-without-port")
    with pytest.raises(DataError, match="cannot reach the Ray cluster at '127.0.0.1:1'"):
        E.check_ray_address("127.0.0.1:1", timeout=2)  # nothing listens on port 1; ray.init would retry for minutes
    E.check_ray_address("auto")  # left to Ray


def test_parallel_trials_are_scheduled_longest_first() -> None:
    from recforge.experiments.runner import _expected_cost
    from recforge.experiments.trials import Trial

    def task(model: str, part: str = "select") -> Trial:
        return Trial(f"{model}-{part}", model, model, {}, part, 0, 0, (10,), "loo")  # type: ignore[arg-type]

    # neural trainer > epoch-trained > closed form; a test refit before a validation trial of the same model
    order = [task("sasrec", "test"), task("sasrec"), task("bpr"), task("ease")]
    shuffled = [order[2], order[3], order[1], order[0]]
    assert sorted(shuffled, key=_expected_cost, reverse=True) == order


def test_only_models_trained_by_the_neural_trainer_are_pruned() -> None:
    from recforge.models import available_models, get_model_class

    pruned = {n for n in available_models() if get_model_class(n).uses_trainer}
    assert pruned == {"bert4rec", "gru4rec", "pooling", "sasrec", "twotower"}
    assert get_model_class("scoreblend").supports_validation  # validates, but reports no epochs: not pruned


def test_search_prunes_neural_trials_through_trainer_callbacks(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    sasrec = {"name": "sasrec", "params": {"epochs": 6, "n_factors": 16, "max_len": 10, "patience": 0,
                                           "num_threads": 1},
              "space": {"lr": {"low": 1e-5, "high": 1e-2, "log": True}}}
    cfg = config(models=[sasrec], search={"n_trials": 8, "pruner": "median"})
    run_experiment(cfg, tmp_path / "p", progress=False)
    trials = pd.read_csv(tmp_path / "p" / "trials.csv")
    select = trials[trials["part"] == "select"]
    assert len(select) == 8 and select["pruned"].sum() >= 1  # some trials were stopped early ...
    assert select.loc[select["pruned"], "ndcg@10"].isna().all()
    pruned = [json.loads(f.read_text()) for f in (tmp_path / "p" / "trials").glob("*.json")]
    curves = [r["curve"] for r in pruned if r.get("pruned")]
    assert all(1 <= len(c) < 6 for c in curves)  # ... after a few epochs' validation, not at the end
    finished = [r for r in pruned if r["part"] == "select" and not r.get("pruned")]
    assert all(len(r["curve"]) == 6 for r in finished)
    stamps = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "p" / "trials").iterdir()}
    run_experiment(cfg, tmp_path / "p", progress=False)  # resumed: pruned and finished trials are replayed
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "p" / "trials").iterdir()} == stamps
    with pytest.raises(DataError, match="pruner"):
        config(search={"n_trials": 2, "pruner": "sometimes"})


def test_grids_need_a_validation_part(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no validation"):
        run_experiment(config(protocol="random"), tmp_path / "r", progress=False)


def test_optuna_search_on_validation_is_seeded_and_resumable(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    cfg = config(models=[{"name": "ease", "space": {"reg": {"low": 1.0, "high": 3000.0, "log": True}}}],
                 search={"n_trials": 5, "timeout": None})
    table = run_experiment(cfg, tmp_path / "o", progress=False).leaderboard
    trials = pd.read_csv(tmp_path / "o" / "trials.csv")
    assert (trials["part"] == "select").sum() == 5 and (trials["part"] == "test").sum() == 1
    chosen = json.loads((tmp_path / "o" / "selected_params.json").read_text())["ease"]["reg"]
    best_row = trials[trials["part"] == "select"].sort_values("ndcg@10", ascending=False).iloc[0]
    assert json.loads(best_row["params"])["reg"] == chosen
    again = run_experiment(cfg, tmp_path / "o2", progress=False).leaderboard  # same seed: the same search
    assert json.loads((tmp_path / "o2" / "selected_params.json").read_text())["ease"]["reg"] == chosen
    pd.testing.assert_frame_equal(again.drop(columns="fit_seconds"), table.drop(columns="fit_seconds"))
    with pytest.raises(DataError, match="both a grid and a search space"):
        config(models=[{"name": "ease", "grid": {"reg": [1.0]}, "space": {"reg": {"low": 1, "high": 2}}}])


def test_search_batches_run_together_and_do_not_depend_on_workers(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("optuna")
    from recforge.experiments.runner import ExperimentRunner

    cfg = config(models=[{"name": "ease", "space": {"reg": {"low": 1.0, "high": 3000.0, "log": True}}}],
                 search={"n_trials": 5, "batch": 3})
    sizes: list[int] = []
    run = ExperimentRunner._run
    monkeypatch.setattr(ExperimentRunner, "_run",
                        lambda self, tasks, bar=None: sizes.append(len(tasks)) or run(self, tasks, bar))
    serial = run_experiment(cfg, tmp_path / "s", progress=False).leaderboard
    assert sizes == [0, 3, 2, 1]  # no grid; two search batches of the 5 trials (one split each); the test refit
    pooled = run_experiment(cfg, tmp_path / "p", workers=2, backend="process", progress=False).leaderboard
    pd.testing.assert_frame_equal(serial.drop(columns="fit_seconds"), pooled.drop(columns="fit_seconds"))
    timed = config(models=cfg.to_dict()["models"], search={"n_trials": None, "timeout": 0.5})
    run_experiment(timed, tmp_path / "t", progress=False)  # a budget in time only
    assert (pd.read_csv(tmp_path / "t" / "trials.csv")["part"] == "select").sum() >= 1
    with pytest.raises(DataError, match="search.batch"):
        config(search={"batch": 0})


SPACES = [{"name": "ease", "space": {"reg": {"low": 1.0, "high": 3000.0, "log": True}}},
          {"name": "itemknn", "space": {"n_neighbors": {"low": 2, "high": 60, "int": True}}}]


def _timed_searches(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[float, float, str]]:
    """Record when each model's search ran, and in which thread."""
    import threading
    import time

    from recforge.experiments.runner import ExperimentRunner

    spans: dict[str, tuple[float, float, str]] = {}
    search = ExperimentRunner._search

    def timed(self, spec, stop, bar):
        start = time.monotonic()
        try:
            return search(self, spec, stop, bar)
        finally:
            spans[spec.display] = (start, time.monotonic(), threading.current_thread().name)

    monkeypatch.setattr(ExperimentRunner, "_search", timed)
    return spans


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_searches_run_side_by_side_on_the_workers_with_the_same_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    pytest.importorskip("optuna")
    if backend == "ray":
        pytest.importorskip("ray")
    cfg = config(models=["pop", *SPACES], search={"n_trials": 4})
    spans = _timed_searches(monkeypatch)
    alone = run_experiment(cfg, tmp_path / "s", progress=False)
    (e0, e1, _), (k0, k1, _) = spans["ease"], spans["itemknn"]
    assert e1 <= k0  # one worker: one search after the other
    both = run_experiment(cfg.model_copy(update={"workers": 2}), tmp_path / "p", backend=backend, progress=False)
    (e0, e1, _), (k0, k1, _) = spans["ease"], spans["itemknn"]
    assert max(e0, k0) < min(e1, k1)  # two workers: the two searches overlapped
    assert both.params == alone.params
    pd.testing.assert_frame_equal(alone.leaderboard.drop(columns="fit_seconds"),
                                  both.leaderboard.drop(columns="fit_seconds"))
    trials = [pd.read_csv(tmp_path / out / "trials.csv").filter(regex=r"^(?!.*seconds)") for out in ("s", "p")]
    pd.testing.assert_frame_equal(*trials)  # the same trials in the same order


def test_pruned_searches_prune_on_the_workers_as_they_would_here(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("optuna")
    sasrec = {**SAS, "params": {**SAS["params"], "epochs": 6, "patience": 0},
              "space": {"lr": {"low": 1e-5, "high": 1e-2, "log": True}}}
    cfg = config(models=[SPACES[0], sasrec], search={"n_trials": 8})
    spans = _timed_searches(monkeypatch)
    alone = run_experiment(cfg, tmp_path / "s", progress=False)
    both = run_experiment(cfg.model_copy(update={"workers": 2}), tmp_path / "p", backend="process", progress=False)
    (e0, e1, _), (s0, s1, thread) = spans["ease"], spans["sasrec"]
    assert max(e0, s0) < min(e1, s1) and thread.startswith("recforge-search")
    trials = [pd.read_csv(tmp_path / out / "trials.csv").filter(regex=r"^(?!.*seconds)") for out in ("s", "p")]
    assert trials[1]["pruned"].sum() >= 1  # pruned in the workers ...
    pd.testing.assert_frame_equal(*trials)  # ... the same trials, curves and decisions as in this process
    curves = [sorted(json.loads(f.read_text()).get("curve", []) for f in (tmp_path / out / "trials").glob("*.json"))
              for out in ("s", "p")]
    assert curves[0] == curves[1]
    assert both.params == alone.params


@pytest.mark.parametrize("kind", ["median", "hyperband"])
def test_a_probe_prunes_as_the_live_study_would(kind: str) -> None:
    optuna = pytest.importorskip("optuna")
    from recforge.experiments.pruning import PruningProbe, TrialPruned

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    curves = np.random.default_rng(0).random((30, 1)) * np.linspace(0.2, 1.0, 12)  # 30 trials, 12 epochs each

    def study() -> optuna.Study:
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2) if kind == "median"
                  else optuna.pruners.HyperbandPruner())
        return optuna.create_study(study_name="s", direction="maximize", pruner=pruner)

    def live() -> list[int]:  # the trainer reporting to the driver's own study
        s, stopped = study(), []
        for curve in curves:
            trial = s.ask()
            for step, value in enumerate(curve, start=1):
                trial.report(float(value), step)
                if trial.should_prune():
                    break
            stopped.append(step)
            s.tell(trial, state=optuna.trial.TrialState.PRUNED) if step < len(curve) else s.tell(trial, curve[-1])
        return stopped

    def probed() -> list[int]:  # the same, through a probe elsewhere and the runner's replay
        from recforge.experiments.runner import ExperimentRunner

        s, stopped = study(), []
        for curve in curves:
            trial = s.ask()
            probe = PruningProbe(trial, "valid_ndcg@10", "m")
            try:
                for value in curve:
                    probe({"valid_ndcg@10": float(value)})
            except TrialPruned:
                pass
            result = type("R", (), {"curve": probe.curve, "pruned": len(probe.curve) < len(curve)})()
            runner = ExperimentRunner.__new__(ExperimentRunner)
            runner._run = lambda tasks, bar, result=result: [result]
            runner.cfg = type("C", (), {"select_metric": "ndcg@10"})()
            done = runner._run_pruned([Trial("x", "m", "m", {}, "select", 0)], trial, [], None)
            stopped.append(len(probe.curve))
            s.tell(trial, state=optuna.trial.TrialState.PRUNED) if done is None else s.tell(trial, curve[-1])
        return stopped

    expected = live()
    assert sum(n < 12 for n in expected) >= 5  # the pruner does stop trials on these curves
    assert probed() == expected


def test_a_finished_run_read_back_starts_no_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("optuna")
    from recforge.experiments import runner as R

    cfg = config(models=SPACES, search={"n_trials": 3}, workers=2)
    first = run_experiment(cfg, tmp_path / "r", backend="process", progress=False)

    def no_workers(*args, **kwargs):
        raise AssertionError("a finished run started its workers")

    monkeypatch.setattr(R, "make_executor", no_workers)  # e.g. the Ray cluster it ran on is gone
    again = run_experiment(cfg, tmp_path / "r", backend="process", progress=False)
    assert again.params == first.params


def test_two_labels_with_one_space_search_one_after_the_other(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    models = [{**SPACES[0], "label": "ease-a"}, {**SPACES[0], "label": "ease-b"}, SPACES[1]]
    cfg = config(models=models, search={"n_trials": 3})
    run_experiment(cfg, tmp_path / "s", progress=False)
    run_experiment(cfg.model_copy(update={"workers": 2}), tmp_path / "p", backend="process", progress=False)
    trials = [pd.read_csv(tmp_path / out / "trials.csv").filter(regex=r"^(?!.*seconds)") for out in ("s", "p")]
    pd.testing.assert_frame_equal(*trials)  # ease-b read ease-a's trials back, as in one search after another
    assert (trials[1].query("part == 'select'")["label"] != "ease-b").all()


def test_a_failing_search_stops_the_others_and_is_the_error_reported(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("optuna")
    from recforge.experiments.runner import ExperimentRunner

    search = ExperimentRunner._search

    def ease_fails(self, spec, stop, bar):
        if spec.name == "ease":
            raise DataError("the ease search broke")
        return search(self, spec, stop, bar)

    monkeypatch.setattr(ExperimentRunner, "_search", ease_fails)
    cfg = config(models=SPACES, search={"n_trials": 40}, workers=2)
    with pytest.raises(DataError, match="the ease search broke"):
        run_experiment(cfg, tmp_path / "f", backend="process", progress=False)
    knn = list((tmp_path / "f" / "trials").glob("*.json"))
    assert len(knn) <= 2  # the itemknn search stopped after the trial it was running, not after 40


def test_two_labels_of_one_model_share_trials_but_both_are_reported(tmp_path: Path) -> None:
    models = [{"name": "ease", "label": "ease-a", "grid": {"reg": [1.0, 1000.0]}},
              {"name": "ease", "label": "ease-b", "grid": {"reg": [1000.0, 3000.0]}}]
    table = run_experiment(config(models=models), tmp_path / "l", progress=False).leaderboard.set_index("model")
    assert set(table.index) == {"ease-a", "ease-b"}
    select = pd.read_csv(tmp_path / "l" / "trials.csv").query("part == 'select'")
    assert len(select) == 3  # reg=1000 ran once for both labels
    chosen = json.loads((tmp_path / "l" / "selected_params.json").read_text())
    best = json.loads(select.set_index("params")["ndcg@10"].idxmax())["reg"]
    assert chosen["ease-a"]["reg"] == best or chosen["ease-b"]["reg"] == best


def test_a_finished_search_can_be_extended_in_place(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    space = [{"name": "ease", "space": {"reg": {"low": 1.0, "high": 3000.0, "log": True}}}]
    out = tmp_path / "x"
    run_experiment(config(models=space, search={"n_trials": 3}), out, progress=False)
    stamps = {f.name: f.stat().st_mtime_ns for f in (out / "trials").glob("*.json")}
    run_experiment(config(models=space, search={"n_trials": 5}, workers=2), out, backend="serial", progress=False)
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["part"] == "select").sum() == 5
    assert all((out / "trials" / name).stat().st_mtime_ns == ns for name, ns in stamps.items())  # retraced, not rerun
    env = json.loads((out / "environment.json").read_text())
    assert "python" in env and len(env["resumed"]) == 1  # the first run's machine, then the resume's


def test_kfold_protocol_gives_every_row_one_test_fold(tmp_path: Path) -> None:
    from recforge.data.datasets import load
    from recforge.evaluation import get_protocol

    data = load("synthetic", **SYNTH["options"])
    folds = get_protocol("kfold3").splits(data, seed=1)
    assert len(folds) == 3 and sum(len(f.test) for f in folds) == len(data)
    table = run_experiment(config(protocol="kfold3", models=["pop", "itemknn"]), tmp_path / "k",
                           progress=False).leaderboard
    assert set(table["model"]) == {"pop", "itemknn"}
    assert (pd.read_csv(tmp_path / "k" / "trials.csv")["split"].nunique()) == 3


# on the CPU on every machine: runs compared number for number would differ on a GPU (its sums' order varies)
SAS = {"name": "sasrec", "params": {"epochs": 8, "n_factors": 16, "max_len": 20, "patience": 2, "lr": 5e-3,
                                    "num_threads": 1, "device": "cpu"}}


def _rows(out: Path, label: str) -> pd.DataFrame:
    trials = pd.read_csv(out / "trials.csv")
    return trials[trials["label"] == label].set_index("part")


def test_models_that_validate_are_tuned_on_validation_then_refitted(tmp_path: Path) -> None:
    res = run_experiment(config(models=["pop", SAS]), tmp_path / "r", progress=False)
    sas = _rows(tmp_path / "r", "sasrec")
    tuned = json.loads(sas.loc["select", "tuned"])["epochs"]
    assert 1 <= tuned <= 8 and json.loads(sas.loc["test", "params"])["epochs"] == tuned  # refitted for that long
    assert res.params["sasrec"] == {**SAS["params"], "epochs": tuned}
    assert list(_rows(tmp_path / "r", "pop").index) == ["test"]  # nothing to tune: fitted once
    with pytest.raises(DataError, match="validation: must be 'refit'"):
        config(validation="sometimes")


def test_reuse_tests_the_tuned_model_without_a_second_fit(tmp_path: Path) -> None:
    res = run_experiment(config(models=[SAS], validation="reuse"), tmp_path / "u", progress=False)
    assert len(list((tmp_path / "u" / "trials").glob("*.json"))) == 1  # one fit: validation and test scored
    sas = _rows(tmp_path / "u", "sasrec")
    assert sas.loc["test", "fit_seconds"] == sas.loc["select", "fit_seconds"]  # the same model
    tuned = json.loads(sas.loc["select", "tuned"])["epochs"]
    assert res.params["sasrec"] == {**SAS["params"], "epochs": tuned}  # stopped early, tested as it was
    refit = run_experiment(config(models=[SAS]), tmp_path / "r", progress=False)
    assert refit.results["sasrec"]["users"] == res.results["sasrec"]["users"]


def test_warm_continues_the_tuned_model_on_train_and_validation(tmp_path: Path) -> None:
    res = run_experiment(config(models=[SAS], validation="warm"), tmp_path / "w", progress=False)
    assert len(list((tmp_path / "w" / "trials").glob("*.json"))) == 1  # no refit from scratch
    tuned = json.loads(_rows(tmp_path / "w", "sasrec").loc["select", "tuned"])["epochs"]
    assert res.params["sasrec"]["epochs"] == tuned and res.params["sasrec"]["warm_epochs"] == -(-tuned // 10)


def test_validation_off_fits_on_train_and_validation_as_configured(tmp_path: Path) -> None:
    res = run_experiment(config(models=[SAS], validation="off"), tmp_path / "o", progress=False)
    assert list(_rows(tmp_path / "o", "sasrec").index) == ["test"]
    assert res.params["sasrec"]["epochs"] == 8


def test_scoreblend_with_any_member_is_tuned_and_refitted(tmp_path: Path) -> None:
    blend = {"name": "scoreblend", "params": {"models": ["ease", "funksvd"], "weight_step": 0.5,
                                             "params": {"funksvd": {"n_factors": 4, "epochs": 3}}}}
    res = run_experiment(config(models=[blend]), tmp_path / "b", progress=False)
    weights = res.params["scoreblend"]["weights"]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0)
    assert set(_rows(tmp_path / "b", "scoreblend").index) == {"select", "test"}


def test_cold_test_users_are_left_out_and_reported(planted, tmp_path: Path) -> None:
    from recforge.experiments import compare

    frame = planted.to_frame()
    users = frame["user_id"].unique()
    train = frame[frame["user_id"].isin(users[:200])]
    test = frame[frame["user_id"].isin(users[150:])].groupby("user_id").tail(2)  # 150 users, 100 of them cold
    (tmp_path / "train.csv").write_text(train.to_csv(index=False))
    results = {}
    for rename in (False, True):
        cold_test = test.copy()
        if rename:  # what the cold users' items are called must not move the metrics
            cold = cold_test["user_id"].isin(users[200:])
            cold_test.loc[cold, "item_id"] = cold_test.loc[cold, "item_id"].max()
        (tmp_path / "test.csv").write_text(cold_test.to_csv(index=False))
        files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
        result = compare(files, ["ease"], progress=False, out=tmp_path / f"c{rename}", validation="off")
        assert result.notes["cold_test_users"] == 100
        assert result.results["ease"].summary["users"] == 50
        results[rename] = result.results["ease"].summary["ndcg@10"]
    assert results[False] == results[True]


def test_tune_searches_each_models_own_space_defaults_first(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    cfg = config(models=["pop", "ease", {"name": "itemknn", "params": {"weighting": "bm25"}}], tune=True,
                 search={"n_trials": 3, "timeout": None})
    run_experiment(cfg, tmp_path / "t", progress=False)
    trials = pd.read_csv(tmp_path / "t" / "trials.csv")
    select = trials[trials["part"] == "select"]
    assert set(select["label"]) == {"ease", "itemknn"}  # pop has nothing to tune
    ease = [json.loads(p) for p in select[select["label"] == "ease"]["params"]]
    assert len(ease) == 3 and ease[0] == {"reg": 100.0}  # the budget; the default (what --no-tune gives) first
    knn = [json.loads(p) for p in select[select["label"] == "itemknn"]["params"]]
    assert all(p["weighting"] == "bm25" for p in knn)  # a fixed parameter stays fixed
    assert knn[0]["n_neighbors"] == 5 and {"shrink", "n_neighbors"} <= set(knn[1])
    chosen = json.loads((tmp_path / "t" / "selected_params.json").read_text())
    scores = select[select["label"] == "ease"].set_index("params")["ndcg@10"]
    # the validation winner, or the defaults when it does not win by more than a standard error
    assert json.dumps(chosen["ease"], sort_keys=True) in (scores.idxmax(), json.dumps({"reg": 100.0}))


def test_the_defaults_are_kept_unless_a_trial_beats_them_by_more_than_a_standard_error() -> None:
    from recforge.experiments.runner import _clearly_better
    from recforge.experiments.trials import TrialResult

    rng = np.random.default_rng(0)
    users = np.arange(400)
    base = rng.random(400)

    def trial(params: dict, values: np.ndarray, split: int = 0) -> TrialResult:
        out = TrialResult("id", "m", "m", params, "select", split)
        out.per_user = pd.DataFrame({"user_id": users, "ndcg@10": values, "rating_sse": values, "rating_n": 1.0})
        return out

    noise = rng.normal(0, 0.3, 400)
    default, lucky, good = {"a": 1}, {"a": 2}, {"a": 3}
    runs = [trial(default, base), trial(lucky, base + 0.005 + noise), trial(good, base + 0.1 + noise)]
    assert not _clearly_better(runs, lucky, default, "ndcg@10")  # ahead on average, by less than its noise
    assert _clearly_better(runs, good, default, "ndcg@10")
    assert not _clearly_better(runs, good, default, "rmse")  # an error: higher is worse
    assert _clearly_better(runs, default, good, "rmse")


def test_rating_models_are_tuned_on_rmse_and_one_parameter_spaces_on_four_trials(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    cfg = config(models=["ease", "bias"], tune=True, search={"n_trials": 20, "timeout": None})
    run_experiment(cfg, tmp_path / "r", progress=False)
    trials = pd.read_csv(tmp_path / "r" / "trials.csv")
    select = trials[trials["part"] == "select"]
    assert (select["label"] == "ease").sum() == 4  # EASE searches one parameter: at most 4 trials
    bias = select[select["label"] == "bias"].set_index("params")["rmse"]
    assert len(bias) == 8  # two parameters: the whole budget of 8
    chosen = json.loads((tmp_path / "r" / "selected_params.json").read_text())["bias"]
    picked = json.dumps({k: chosen[k] for k in ("item_reg", "user_reg")}, sort_keys=True)
    assert picked in (bias.idxmin(), json.dumps({"item_reg": 2.0, "user_reg": 5.0}))  # lowest RMSE, or defaults


def test_split_files_without_validation_get_one_carved_from_train(planted, tmp_path: Path) -> None:
    from recforge.experiments import compare

    frame = planted.to_frame().sort_values(["user_id", "timestamp"])
    test = frame.groupby("user_id").tail(1)
    (tmp_path / "train.csv").write_text(frame.drop(test.index).to_csv(index=False))
    (tmp_path / "test.csv").write_text(test.to_csv(index=False))
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    tuned = compare(files, ["ease"], progress=False, out=tmp_path / "a", tune=True, tune_trials=2)
    assert tuned.notes["validation"].startswith("carved from TRAIN: the last event of each user")
    fixed = compare(files, ["ease"], progress=False, out=tmp_path / "b")
    assert "validation" not in fixed.notes and fixed.params["ease"] == {}
    # both refit on all of TRAIN: with the default chosen, the test numbers are the same
    same = compare(files, {"ease": {"name": "ease", "params": {"reg": 100.0}}}, progress=False, out=tmp_path / "c",
                   tune=True)
    assert same.results["ease"].summary["ndcg@10"] == fixed.results["ease"].summary["ndcg@10"]


def test_files_too_short_to_carve_a_validation_part_are_evaluated_untuned(tmp_path: Path) -> None:
    from recforge.experiments import compare

    pd.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [1, 2, 1, 3], "timestamp": [1, 2, 1, 2]}).to_csv(
        tmp_path / "train.csv", index=False)
    pd.DataFrame({"user_id": [1, 2], "item_id": [3, 2], "timestamp": [5, 5]}).to_csv(tmp_path / "test.csv", index=False)
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    result = compare(files, ["ease"], progress=False, out=tmp_path / "c", tune=True)
    assert result.notes["validation"].startswith("not carved") and result.params["ease"] == {}
    assert result.results["ease"].summary["users"] == 2


def test_every_run_states_what_each_model_learns_from(tmp_path: Path) -> None:
    from recforge.experiments import compare
    from recforge.experiments.runner import learns_note

    rated = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 2, 3, 3, 3], "item_id": [1, 2, 3, 1, 2, 4, 2, 3, 4],
                          "rating": [5.0, 1, 4, 2, 5, 3, 4, 4, 1], "timestamp": range(9)})
    result = compare(Interactions.from_frame(rated), ["pop", "ease", "bias"], protocol="loo", progress=False,
                     out=tmp_path / "r")
    assert result.notes["learns_from"] == (
        "counts: pop; binary: ease; ratings: bias — only rating models use the rating values: the others count "
        "every rated item as an interaction, whatever its rating")
    repeated = Interactions.from_frame(rated.drop(columns="rating").assign(item_id=[1, 1, 3, 1, 2, 4, 2, 3, 4]))
    assert learns_note({"ease": "binary", "sasrec": "order"}, repeated) == (
        "binary: ease; order: sasrec — binary models count a repeated user-item pair once")


def test_repeated_pairs_in_the_test_part_are_reported_with_the_ways_out(caplog: pytest.LogCaptureFixture) -> None:
    from recforge.data.datasets import make_synthetic
    from recforge.experiments import compare

    frame = make_synthetic(n_users=120, n_items=60, n_interactions=3000, seed=4).to_frame()
    frame = frame.drop_duplicates(["user_id", "item_id"])
    again = frame.sample(frac=0.5, random_state=0).assign(timestamp=lambda f: f["timestamp"] + 10**8)
    data = Interactions.from_frame(pd.concat([frame, again]))  # each user's latest events repeat earlier ones
    excluded = compare(data, ["pop"], progress=False)
    note = excluded.notes["seen_test_events"]
    share = float(note.split("%")[0]) / 100
    assert share > 0.5 and "--no-exclude-seen" in note and "--dedupe" in note
    assert "seen items excluded" in excluded.leaderboard.attrs["title"] and "already had" in caplog.text
    kept = compare(data, ["pop"], progress=False, exclude_seen=False)
    assert "seen_test_events" not in kept.notes and "seen items kept" in kept.leaderboard.attrs["title"]
    assert kept.leaderboard["hr@10"].iloc[0] > excluded.leaderboard["hr@10"].iloc[0]  # repeats can be hit again
    deduped = compare(data, ["pop"], progress=False, dedupe="last")
    assert "seen_test_events" not in deduped.notes  # one event per pair: no test item was seen before
