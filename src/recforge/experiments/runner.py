"""Run an experiment config: every trial (model × parameter set × split) once, in parallel, resumable.

Results folder::

    config.json          the resolved config (a different config in the same folder is refused)
    environment.json     versions, platform, CPU count
    trials/<id>.json     one finished trial: what ran, its metrics, seconds (written atomically)
    trials/<id>.csv      its per-user metrics (for confidence intervals and paired tests)
    trials.csv           every distinct trial in one table (a trial two labels or two search proposals share, once)
    leaderboard.{md,csv,png}  the final models with 95% bootstrap CIs and paired tests against the best

With a validation part (e.g. ``loo``, ``temporal``) every grid point is fitted on train and scored on validation;
the best on ``select_metric`` is refitted on train + validation and scored on test. Interrupted runs resume: a trial
whose file exists is read back, not rerun; the seed fixes every split and model, so a rerun gives the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recforge import split as S
from recforge.data.interactions import Interactions
from recforge.data.io import atomic_path, write_table
from recforge.errors import DataError
from recforge.evaluation.report import lower_is_better
from recforge.experiments.config import ExperimentConfig, ModelSpec

log = logging.getLogger(__name__)


def load_data(cfg: ExperimentConfig) -> Interactions:
    """The dataset of the config with its filters applied in order."""
    from recforge.data import filters as F
    from recforge.data.datasets import load

    if isinstance(cfg.dataset, dict):
        data = load(cfg.dataset["name"], **dict(cfg.dataset.get("options") or {}))
    else:
        data = load(cfg.dataset)
    for name, value in cfg.filters.items():
        fn = getattr(F, name)
        data = fn(data, **value) if isinstance(value, dict) else fn(data, value)
    return data


def trial_id(model: str, params: dict[str, Any], part: str, split_index: int, seed: int) -> str:
    """A stable id for a trial (same inputs, same id; the resume key)."""
    key = json.dumps({"model": model, "params": params, "part": part, "split": split_index, "seed": seed},
                     sort_keys=True, default=str)
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def _results_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that fixes the trials' numbers: the worker count and the search budget
    (trials, time) may change between a run and its resume, so a finished search can be extended."""
    search = {k: v for k, v in (cfg.get("search") or {}).items() if k not in ("n_trials", "timeout")}
    return {**{k: v for k, v in cfg.items() if k != "workers"}, "search": search}


def _selection_score(results: list[dict[str, Any]], metric: str) -> float:
    """One parameter set's validation score: the mean of ``metric`` over its splits (NaN where not computed)."""
    return float(np.mean([r["record"]["metrics"].get(metric, np.nan) for r in results]))


def _splits(cfg: ExperimentConfig) -> list[S.Split]:
    from recforge.evaluation.protocols import make_splits, sequence_protocol
    from recforge.experiments.tasks import sequence_splits

    if cfg.protocol in ("folds", "ml100k-folds", "official-folds"):  # the official files, read as they are
        if cfg.filters or not isinstance(cfg.dataset, str):
            raise DataError(f"protocol {cfg.protocol!r} reads ML-100K's official u1..u5 files as they are: give "
                            "'dataset' as the ml-100k folder or zip (a string) and no 'filters'")
        data: Any = cfg.dataset
    else:
        data = load_data(cfg)
    seq = sequence_protocol(cfg.protocol)
    if seq is not None:  # next-event / sequence-mrr: test events become next-item samples in _run_trial
        return sequence_splits(data, seq, seed=cfg.seed)  # type: ignore[arg-type]
    return make_splits(data, cfg.protocol, seed=cfg.seed, merge_valid=False)  # type: ignore[arg-type]


def _materialise(task: dict[str, Any], splits: list[S.Split]) -> dict[str, Any]:
    split = splits[task["split_index"]]
    has_valid = split.valid is not None and len(split.valid) > 0
    if task["part"] == "select":  # models that validate while training (early stopping, pruning) see it too
        return {**task, "train": split.train, "test": split.valid, "valid": split.valid, "split_name": split.name}
    train = split.train_valid if has_valid else split.train
    return {**task, "train": train, "test": split.test, "valid": None, "split_name": split.name}


def _expected_cost(task: dict[str, Any]) -> int:
    """A rough rank of a trial's duration for scheduling: models trained by the neural trainer first (they take
    the longest), then models trained for epochs, then closed-form and neighbourhood models; test refits on more
    data before validation trials."""
    from recforge.models import get_model_class

    cls = get_model_class(task["model"])
    rank = 2 if cls.uses_trainer else 1 if {"epochs", "iterations"} & set(cls._param_names()) else 0
    return 2 * rank + (task["part"] != "select")


def run_task(task: dict[str, Any], splits: list[S.Split], threads: int | None = None) -> dict[str, Any]:
    """Run one trial description (model, params, part, split index) against the experiment's splits."""
    return _run_trial(_materialise(task, splits), threads)


def _run_trial(task: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Fit and evaluate one trial; returns its record and per-user metrics."""
    from recforge.evaluation import evaluate
    from recforge.evaluation.cold_start import evaluate_cold_items
    from recforge.experiments.tasks import (
        RUNNER_SEQUENCE_PROTOCOLS,
        evaluate_sequence_trial,
        rating_user_metrics,
    )
    from recforge.models import create_model, get_model_class

    cls = get_model_class(task["model"])
    params = dict(task["params"])
    for key, value in (("seed", task["seed"]), ("progress", False), ("num_threads", threads)):
        if key in cls._param_names() and value is not None:
            params.setdefault(key, value)
    start = time.perf_counter()
    model = create_model(task["model"], **params)
    valid = task.get("valid")
    model.fit(task["train"], valid=valid) if cls.supports_validation and valid is not None else model.fit(task["train"])
    if task["split_name"] == "cold-items":
        res = evaluate_cold_items(model, S.Split(task["train"], task["test"], name="cold-items"), k=task["k"])
    elif task["split_name"] in RUNNER_SEQUENCE_PROTOCOLS:
        res = evaluate_sequence_trial(model, task["train"], task["test"], task["split_name"], task["k"])
    else:
        res = evaluate(model, task["test"], k=task["k"])
        extra = rating_user_metrics(model, task["test"])
        if extra is not None:  # rating models: rating-graded NDCG and the sums behind a user-level RMSE CI
            res.per_user = res.per_user.merge(extra, on="user_id", how="left")
            res.summary["rating_ndcg"] = float(extra["rating_ndcg"].mean())
    record = {"id": task["id"], "label": task["label"], "model": task["model"], "params": task["params"],
              "part": task["part"], "split": task["split_index"], "seconds": time.perf_counter() - start,
              "metrics": {k: float(v) for k, v in res.summary.items()}}
    return {"record": record, "per_user": res.per_user}


class ExperimentRunner:
    """Runs one :class:`ExperimentConfig` into a results folder (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, out: str | os.PathLike[str], workers: int | None = None,
                 progress: bool = True, backend: str = "auto", ray_address: str | None = None,
                 threads_per_worker: int | None = None) -> None:
        from recforge.experiments.executors import resolve_backend

        self.cfg = cfg
        self.out = Path(out)
        self.workers = workers or cfg.workers
        self.progress = progress
        self.backend = backend
        if ray_address is None and (backend or "auto").strip().lower() in ("auto", "ray"):
            ray_address = os.environ.get("RAY_ADDRESS") or None  # as documented: the variable works like the flag
        self.ray_address = ray_address
        self.threads_per_worker = threads_per_worker
        resolve_backend(backend, self.workers, ray_address)  # a bad name or a missing Ray fails before any work
        self._exec: Any = None
        self._main = True  # False on the ranks > 0 of a torchrun launch: they train, rank 0 writes
        self._distributed = False

    # ------------------------------------------------------------------ bookkeeping
    def _prepare_folder(self) -> None:
        if not self._main:
            return
        (self.out / "trials").mkdir(parents=True, exist_ok=True)
        resolved = json.loads(json.dumps(self.cfg.to_dict(), default=str))
        existing = self.out / "config.json"
        env = environment()
        env_path = self.out / "environment.json"
        if existing.exists():
            if _results_identity(json.loads(existing.read_text())) != _results_identity(resolved):
                raise DataError(f"{str(self.out)!r} holds results of a different experiment config; use another "
                                "--out folder (or delete it) to start afresh")
            if env_path.exists():  # keep what the first run ran on; later runs are listed after it
                first = json.loads(env_path.read_text())
                env = {**first, "resumed": [*first.get("resumed", []), env]}
        with atomic_path(existing) as tmp:
            tmp.write_text(json.dumps(resolved, indent=2))
        with atomic_path(env_path) as tmp:
            tmp.write_text(json.dumps(env, indent=2))

    def _done(self, tid: str) -> dict[str, Any] | None:
        from recforge.neural.distributed import broadcast_object

        path = self.out / "trials" / f"{tid}.json"
        per_user = self.out / "trials" / f"{tid}.csv"
        found = None
        if self._main and path.exists() and per_user.exists():
            found = {"record": json.loads(path.read_text()), "per_user": pd.read_csv(per_user)}
        # under torchrun every rank must skip the same trials, or one would wait forever in a gradient exchange
        return broadcast_object(found) if self._distributed else found

    def _save(self, result: dict[str, Any]) -> None:
        if not self._main:
            return
        rec = result["record"]
        write_table(result["per_user"], self.out / "trials" / f"{rec['id']}.csv")
        with atomic_path(self.out / "trials" / f"{rec['id']}.json") as tmp:  # last: marks the trial complete
            tmp.write_text(json.dumps(rec, indent=2, default=str))

    def _run(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the tasks not done yet on the executor; each result is saved as it arrives; results in task order."""
        from tqdm.auto import tqdm

        results: dict[str, dict[str, Any]] = {}
        todo = []
        for task in tasks:
            done = self._done(task["id"])
            if done is not None:
                results[task["id"]] = done
            else:
                todo.append(task)
        if todo:
            executor = self._executor()
            if executor.workers > 1:  # longest first: a long trial started last would leave the others idle
                todo.sort(key=_expected_cost, reverse=True)
            bar = tqdm(total=len(todo), desc=f"{self.cfg.name} trials ({executor.name})", disable=not self.progress)
            for res in executor.map(todo):
                self._save(res)
                results[res["record"]["id"]] = res
                bar.update(1)
            bar.close()
        return [results[t["id"]] for t in tasks]

    def _executor(self) -> Any:
        """The executor of this run, started on first use and kept until the run ends."""
        if self._exec is None:
            from recforge.experiments.executors import make_executor

            self._exec = make_executor(self.backend, self.workers, self._splits, self.cfg.to_dict(), self.ray_address,
                                       self.threads_per_worker)
            log.info("%s: trials on the %s backend with %d worker(s)", self.cfg.name, self._exec.name,
                     self._exec.workers)
        return self._exec

    def _search(self, spec: ModelSpec, splits: list[S.Split], task: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Optuna TPE over ``spec.space`` on the validation parts; every trial is saved (and resumed) like a grid
        point, and the seeded sampler proposes the same sequence again, so a resumed search retraces its steps.

        Models trained by the neural trainer are pruned: their trials run in this process, the trainer reports
        the validation score after every epoch of the first split, and the pruner stops trials that fall behind
        (a pruned trial is saved with its curve, so a resumed search replays it to the pruner). Other models take
        ``search.batch`` proposals at a time and run them (and their splits) together on the workers; the batch
        size, not the number of workers, shapes the sampler's sequence, so the numbers do not depend on workers."""
        try:
            import optuna
        except ImportError:
            raise DataError("search spaces need Optuna: pip install optuna") from None
        from recforge.models import get_model_class

        cfg = self.cfg
        search = cfg.search or {}
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        prune = get_model_class(spec.name).uses_trainer and search.get("pruner", "median") != "none"
        pruner: Any = optuna.pruners.NopPruner()
        if prune:
            pruner = (optuna.pruners.HyperbandPruner() if search.get("pruner") == "hyperband"
                      else optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2))
        study = optuna.create_study(direction="minimize" if lower_is_better(cfg.select_metric) else "maximize",
                                    sampler=optuna.samplers.TPESampler(seed=cfg.seed), pruner=pruner)
        runs: list[dict[str, Any]] = []

        def suggest(trial: Any) -> dict[str, Any]:
            params = dict(spec.params)
            for pname, dist in sorted(spec.space.items()):
                if "choices" in dist:
                    params[pname] = trial.suggest_categorical(pname, list(dist["choices"]))
                elif dist.get("int"):
                    params[pname] = trial.suggest_int(pname, int(dist["low"]), int(dist["high"]), log=bool(dist.get("log")))
                else:
                    params[pname] = trial.suggest_float(pname, float(dist["low"]), float(dist["high"]), log=bool(dist.get("log")))
            return params

        # ask/tell rather than study.optimize: a batch of proposals runs at once on the workers, and under torchrun
        # rank 0 alone decides whether time is left, so every rank runs the same trials
        from recforge.neural import distributed as D

        n_trials, timeout = search.get("n_trials", 20), search.get("timeout")
        n_trials = int(n_trials) if n_trials is not None else np.inf
        batch = 1 if prune else int(search.get("batch", 1))
        started, asked = time.monotonic(), 0
        while asked < n_trials and D.broadcast_object(timeout is None or time.monotonic() - started < timeout):
            trials = [study.ask() for _ in range(int(min(batch, n_trials - asked)))]
            asked += len(trials)
            proposals = [suggest(trial) for trial in trials]
            tasks = [[task(spec, params, "select", i, split) for i, split in enumerate(splits)] for params in proposals]
            if prune:
                try:
                    values = [_selection_score(self._run_pruned(tasks[0], trials[0], runs), cfg.select_metric)]
                except optuna.TrialPruned:
                    study.tell(trials[0], state=optuna.trial.TrialState.PRUNED)
                    continue
            else:
                done = self._run([t for group in tasks for t in group])
                runs.extend(done)
                by_id = {d["record"]["id"]: d for d in done}
                values = [_selection_score([by_id[t["id"]] for t in group], cfg.select_metric) for group in tasks]
            for trial, value in zip(trials, values):
                if np.isfinite(value):
                    study.tell(trial, value)
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
            raise DataError(self._missing_metric_message(runs, spec))
        return {**spec.params, **study.best_params}, runs

    def _missing_metric_message(self, runs: list[dict[str, Any]], spec: ModelSpec) -> str:
        names = sorted({m for r in runs if r["record"]["model"] == spec.name for m in r["record"]["metrics"]})
        return (f"select_metric {self.cfg.select_metric!r} was not computed for model {spec.display!r} on validation "
                f"(check k: {self.cfg.k}); computed metrics: {names or 'none'}")

    def _run_pruned(self, tasks: list[dict[str, Any]], trial: Any, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run one search trial's tasks here, reporting the first split's validation curve to the pruner; every
        result, pruned ones included, is also appended to ``runs``."""
        import optuna

        from recforge.neural.trainer import training_callbacks

        metric = f"valid_{self.cfg.select_metric}"
        results = []
        for i, t in enumerate(tasks):
            done = self._done(t["id"])
            if done is None:
                curve: list[float] = []

                def report(row: dict[str, Any], curve: list[float] = curve, first: bool = i == 0,
                           model: str = t["model"]) -> None:
                    if not first:
                        return
                    value = row.get(metric)
                    if value is None:  # the trainer validates on its own metric: prune on that, and say so
                        key, value = next(((k, v) for k, v in row.items() if k.startswith("valid_")), (None, None))
                        if key is not None and not curve:
                            log.warning("%s reports no %s while training; pruning follows %s instead",
                                        model, metric, key)
                    if value is None:
                        return
                    curve.append(float(value))
                    trial.report(float(value), len(curve))
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"validation {metric} {value:.4f} after {len(curve)} epochs")

                try:
                    with training_callbacks(report):
                        done = run_task(t, self._splits)
                except optuna.TrialPruned:
                    record = {"id": t["id"], "label": t["label"], "model": t["model"], "params": t["params"],
                              "part": t["part"], "split": t["split_index"], "pruned": True, "curve": curve,
                              "metrics": {}}
                    runs.append({"record": record, "per_user": pd.DataFrame({"user_id": []})})
                    self._save(runs[-1])
                    raise
                done["record"]["curve"] = curve
                self._save(done)
            else:  # resumed: give the pruner the same history it saw the first time
                for step, value in enumerate(done["record"].get("curve", []), start=1):
                    trial.report(value, step)
                if done["record"].get("pruned"):
                    runs.append(done)
                    raise optuna.TrialPruned("pruned in an earlier run")
            results.append(done)
            runs.append(done)
        return results

    # ------------------------------------------------------------------ the experiment
    def run(self) -> pd.DataFrame:
        """Run (or resume) every trial and write the tables; returns the leaderboard."""
        from recforge.neural import distributed as D

        self._distributed = D.init_distributed()
        if self._distributed:  # torchrun: the ranks go through the trials together, each neural fit data-parallel
            self._main = D.is_main_process()
            self.workers, self.backend = 1, "serial"
        try:
            return self._run_all()
        finally:
            if self._exec is not None:
                self._exec.close()
                self._exec = None

    def _run_all(self) -> pd.DataFrame:
        from recforge.evaluation import leaderboard, save_leaderboard
        from recforge.evaluation.evaluator import EvaluationResult

        cfg = self.cfg
        self._prepare_folder()
        splits = self._splits = _splits(cfg)
        has_valid = all(s.valid is not None and len(s.valid) for s in splits)
        for spec in cfg.models:
            if spec.tuned and not has_valid:
                raise DataError(f"model {spec.display!r} has a grid, but protocol {cfg.protocol!r} has no validation "
                                "part to choose on; use loo, temporal or another protocol with validation")

        def task(spec: ModelSpec, params: dict[str, Any], part: str, i: int, split: S.Split) -> dict[str, Any]:
            return {"id": trial_id(spec.name, params, part, i, cfg.seed), "label": spec.display, "model": spec.name,
                    "params": params, "part": part, "split_index": i, "seed": cfg.seed, "k": cfg.k}

        select_tasks = [task(spec, params, "select", i, split)
                        for spec in cfg.models if len(spec.combinations()) > 1
                        for params in spec.combinations() for i, split in enumerate(splits)]
        selected = self._run(select_tasks)
        best: dict[str, dict[str, Any]] = {}
        for spec in cfg.models:
            if spec.space:
                best[spec.display], searched = self._search(spec, splits, task)
                selected += searched
                continue
            combos = spec.combinations()
            if len(combos) == 1:
                best[spec.display] = combos[0]
                continue
            scores = [_selection_score([r for r in selected if r["record"]["model"] == spec.name
                                        and r["record"]["params"] == params], cfg.select_metric) for params in combos]
            if np.isnan(scores).all():
                raise DataError(self._missing_metric_message(selected, spec))
            pick = np.nanargmin if lower_is_better(cfg.select_metric) else np.nanargmax
            best[spec.display] = combos[int(pick(scores))]
        final = self._run([task(spec, best[spec.display], "test", i, split)
                           for spec in cfg.models for i, split in enumerate(splits)])
        # by position, not by the label saved in the record: two labels with the same model and parameters share
        # one trial (same id), whose record carries only one of the labels
        by_label = {spec.display: final[j * len(splits):(j + 1) * len(splits)] for j, spec in enumerate(cfg.models)}
        rows = [{"label": r["record"]["label"], "part": r["record"]["part"], "split": r["record"]["split"],
                 "params": json.dumps(r["record"]["params"], sort_keys=True), "seconds": r["record"].get("seconds"),
                 "pruned": bool(r["record"].get("pruned")), **r["record"]["metrics"]}
                for r in {r["record"]["id"]: r for r in selected + final}.values()]  # a shared trial once
        if self._main:  # every rank computes the report, rank 0 writes it
            write_table(pd.DataFrame(rows), self.out / "trials.csv")
        results = {}
        for spec in cfg.models:
            parts = by_label[spec.display]
            per_user = pd.concat([p["per_user"] for p in parts], ignore_index=True)
            summary = {k: float(np.mean([p["record"]["metrics"][k] for p in parts]))
                       for k in parts[0]["record"]["metrics"]}
            for col in per_user.columns.drop("user_id", errors="ignore"):
                summary[col] = float(per_user[col].mean())
            results[spec.display] = EvaluationResult(spec.display, per_user, summary,
                                                     info={"params": best[spec.display]})
        ks = cfg.k
        metrics = cfg.metrics or [f"ndcg@{ks[0]}", f"hr@{ks[0]}", f"recall@{ks[0]}", "mrr", f"coverage@{ks[0]}"]
        table = leaderboard(results, metrics=metrics, seed=cfg.seed)
        if "rmse" in metrics and "rmse" in table.columns and "rmse_lo" not in table.columns:
            from recforge.experiments.tasks import user_bootstrap_rmse

            cis = [user_bootstrap_rmse(results[m].per_user, seed=cfg.seed) if "rating_sse" in results[m].per_user
                   else (np.nan, np.nan) for m in table["model"]]
            at = table.columns.get_loc("rmse") + 1
            table.insert(at, "rmse_lo", [c[0] for c in cis])
            table.insert(at + 1, "rmse_hi", [c[1] for c in cis])
        table.attrs["title"] = f"{cfg.name}: {cfg.protocol}"
        if self._main:
            save_leaderboard(table, self.out)
            with atomic_path(self.out / "selected_params.json") as tmp:
                tmp.write_text(json.dumps(best, indent=2, default=str))
        return table


def environment() -> dict[str, Any]:
    """Versions and hardware, for the results folder."""
    import numpy
    import scipy

    import recforge

    info: dict[str, Any] = {
        "recforge": recforge.__version__, "python": sys.version.split()[0], "numpy": numpy.__version__,
        "scipy": scipy.__version__, "pandas": pd.__version__, "platform": platform.platform(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def run_experiment(config: ExperimentConfig | str | os.PathLike[str], out: str | os.PathLike[str],
                   workers: int | None = None, progress: bool = True, backend: str = "auto",
                   ray_address: str | None = None, threads_per_worker: int | None = None) -> pd.DataFrame:
    """Run an experiment config (object or file) into ``out``; returns the leaderboard. ``backend``: ``auto``
    (Ray when installed and ``workers > 1``, else a process pool), ``serial``, ``process`` or ``ray``;
    ``ray_address`` connects to a Ray cluster; ``threads_per_worker`` caps each trial's BLAS/numba/torch threads
    (default: all cores serially, 1 per worker otherwise)."""
    cfg = config if isinstance(config, ExperimentConfig) else ExperimentConfig.from_file(config)
    return ExperimentRunner(cfg, out, workers, progress, backend, ray_address, threads_per_worker).run()
