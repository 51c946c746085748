"""The fitting pipeline: tune on validation, refit, test — every trial once, in parallel, resumable.

``recforge run``, ``recforge compare``, ``recforge evaluate`` and the benchmark scripts all run experiments through
:class:`ExperimentRunner`. For a protocol with a validation part:

1. every grid point (or search proposal) of a tuned model is fitted on train and scored on validation; models that
   validate while they train (neural models, ScoreBlend) get the validation part for early stopping / weight
   tuning, and what they chose is kept (``tuned_params``);
2. the best parameters on ``select_metric`` are kept; a model with nothing to choose but that tunes itself is still
   fitted on train with validation once, to learn its epochs;
3. the model is refitted on train + validation with the chosen parameters and what it tuned (``validation:
   refit``), or the model of step 1 is continued on train + validation for a tenth of its epochs (``warm``;
   models that cannot continue their training are refitted) or tested as it is (``reuse``), and scored on test.

``validation: off`` skips step 1 for models without a grid (fitted on train + validation as configured).

Results folder::

    config.json          the resolved config (results of another dataset, protocol, seed or k are refused)
    environment.json     versions, platform, CPU count
    trials/<id>.json     one finished trial: what ran, its metrics, seconds, what it tuned (written atomically)
    trials/<id>.csv      its per-user metrics (for confidence intervals and paired tests)
    trials.csv           every distinct trial of this run in one table
    leaderboard.{md,csv,png}  the final top-N models with 95% bootstrap CIs and paired tests against the best
    ratings.{md,csv,png}      rating models on RMSE / MAE / rating NDCG (when there are some and no ``metrics``)
    selected_params.json      the parameters each model was finally tested with

Interrupted runs resume: a trial whose file exists is read back, not rerun; the seed fixes every split and model,
so a rerun gives the same numbers.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy
import torch

import recforge
from recforge.core.progress import progress_bar
from recforge.data import split as S
from recforge.data.interactions import Interactions
from recforge.data.io import atomic_path, write_table
from recforge.errors import DataError
from recforge.evaluation.evaluator import EvaluationResult
from recforge.evaluation.protocols import RATING_METRICS, get_protocol
from recforge.evaluation.rating import user_bootstrap_rmse
from recforge.evaluation.report import leaderboard, lower_is_better, save_leaderboard
from recforge.experiments.config import ExperimentConfig, ModelSpec
from recforge.experiments.executors import make_executor, resolve_backend
from recforge.experiments.pruning import PruningProbe
from recforge.experiments.trials import Trial, TrialResult, make_splits, trial_id
from recforge.models import get_model_class
from recforge.neural import distributed as D

log = logging.getLogger(__name__)


@dataclass
class ExperimentResult:
    """What an experiment produced: the leaderboard of top-N models, the rating table (rating models; None
    without), every model's merged result, the parameters each was tested with, models that could not be
    evaluated under the protocol (label -> reason), and every validation (``select``) and final (``test``) trial
    by label; ``models``: the final fitted models (one per split) when the runner was asked to keep them."""

    leaderboard: pd.DataFrame
    ratings: pd.DataFrame | None
    results: dict[str, EvaluationResult]
    params: dict[str, dict[str, Any]]
    out: Path
    skipped: dict[str, str] = field(default_factory=dict)
    trials: dict[str, list[TrialResult]] = field(default_factory=dict)
    models: dict[str, list[Any]] = field(default_factory=dict)
    #: What the splits did that a reader should know (see :attr:`recforge.data.split.Split.notes`).
    notes: dict[str, Any] = field(default_factory=dict)


def _results_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that fixes the trials' numbers. Models, metrics, the worker count and the
    search budget may change between a run and its resume: new models and trials are added, finished ones kept."""
    search = {k: v for k, v in (cfg.get("search") or {}).items() if k not in ("n_trials", "timeout")}
    keep = ("dataset", "filters", "protocol", "k", "select_metric", "seed", "validation", "exclude_seen")
    return {**{k: cfg.get(k) for k in keep}, "search": search}


def _selection_score(results: Sequence[TrialResult], metric: str) -> float:
    """One parameter set's validation score: the mean of ``metric`` over its splits (NaN where not computed)."""
    return float(np.mean([r.metrics.get(metric, np.nan) for r in results]))


def _expected_cost(task: Trial) -> int:
    """A rough rank of a trial's duration for scheduling: models trained by the neural trainer first (they take
    the longest), then models trained for epochs, then closed-form and neighbourhood models; test refits on more
    data before validation trials."""
    cls = get_model_class(task.model)
    rank = 2 if cls.uses_trainer else 1 if "epochs" in cls._param_names() else 0
    return 2 * rank + (task.part != "select")


#: Most trials an automatic search spends per searched parameter.
_TRIALS_PER_PARAMETER = 4


def _clearly_better(runs: Sequence[TrialResult], challenger: dict[str, Any], incumbent: dict[str, Any],
                    metric: str) -> bool:
    """Whether ``challenger`` beats ``incumbent`` on validation by more than one standard error of the per-user
    paired difference (the one-standard-error rule): with one validation event per user, the best of a few
    trials also wins by chance, and then the defaults, chosen on principle, are the better bet."""
    if challenger == incumbent:
        return False
    pairs = []
    for split in sorted({r.split for r in runs}):
        a = [r for r in runs if r.split == split and r.params == challenger and not r.pruned]
        b = [r for r in runs if r.split == split and r.params == incumbent and not r.pruned]
        ours, theirs = (_per_user(found[0], metric) if found else None for found in (a, b))
        if ours is None or theirs is None:
            return True  # nothing to pair: trust the search
        both = ours.to_frame("x").join(theirs.to_frame("y"), how="inner")
        pairs.append((both["x"] - both["y"]).to_numpy(float))
    diff = np.concatenate(pairs)
    diff = diff[np.isfinite(diff)]
    if len(diff) < 2:
        return True
    gain = -diff.mean() if lower_is_better(metric) else diff.mean()
    return bool(gain > diff.std(ddof=1) / np.sqrt(len(diff)))


def _per_user(result: TrialResult, metric: str) -> pd.Series | None:
    """A trial's per-user values of ``metric`` (by user id): for RMSE each user's mean squared error."""
    table = result.per_user
    if metric == "rmse" and {"rating_sse", "rating_n"} <= set(table.columns):
        return pd.Series((table["rating_sse"] / table["rating_n"]).to_numpy(), index=table["user_id"])
    if metric in table.columns:
        return pd.Series(table[metric].to_numpy(), index=table["user_id"])
    return None


def _defaults_within(model: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The model's values of the searched parameters, where they lie inside the space (else left to the sampler)."""
    out = {}
    for name, dist in space.items():
        value = getattr(model, name)
        if "choices" in dist:
            if value in dist["choices"]:
                out[name] = value
        elif isinstance(value, int | float) and not isinstance(value, bool) and dist["low"] <= value <= dist["high"]:
            out[name] = value
    return out


def learns_note(learns: dict[str, str], data: Interactions) -> str:
    """One line: what each model learns from (:data:`recforge.models.LEARNS_FROM`), grouped, and what of ``data``
    the models that do not use it leave out."""
    groups: dict[str, list[str]] = {}
    for label, what in learns.items():
        groups.setdefault(what, []).append(label)
    parts = ["; ".join(f"{what}: {', '.join(labels)}" for what, labels in groups.items())]
    kinds = {kind for what in learns.values() for kind in what.split("+")}
    if data.ratings is not None and kinds - {"ratings", "nothing"}:
        parts.append("only rating models use the rating values: the others count every rated item as an interaction, "
                     "whatever its rating")
    if "binary" in kinds and data.csr("ones").nnz < len(data):
        parts.append("binary models count a repeated user-item pair once")
    return " — ".join(parts)


def merge_trials(label: str, parts: Sequence[TrialResult], params: dict[str, Any]) -> EvaluationResult:
    """One model's result over its splits: per-user rows pooled (and their means), whole-model figures (rmse,
    coverage, fit seconds) averaged over splits."""
    per_user = pd.concat([p.per_user for p in parts], ignore_index=True)
    keys = set.intersection(*(set(p.metrics) for p in parts))
    summary = {k: float(np.sum([p.metrics[k] for p in parts]) if k in ("users", "samples")
                        else np.mean([p.metrics[k] for p in parts])) for k in keys}
    for col in per_user.columns.drop("user_id", errors="ignore"):
        summary[col] = float(per_user[col].mean())
    return EvaluationResult(label, per_user, summary, info={"params": params})


class ExperimentRunner:
    """Runs one :class:`ExperimentConfig` into a results folder (see the module docstring). ``data``: the
    dataset already loaded (for :func:`recforge.experiments.compare` on in-memory interactions).
    ``keep_models``: hand back every model's final fitted models (``ExperimentResult.models``, one per split);
    the trials that fit them are then run again, not read back from an earlier run."""

    def __init__(self, cfg: ExperimentConfig, out: str | os.PathLike[str], workers: int | None = None,
                 progress: bool = True, backend: str = "auto", ray_address: str | None = None,
                 threads_per_worker: int | None = None, data: Interactions | None = None,
                 keep_models: bool = False) -> None:
        self.cfg = cfg
        self.keep_models = keep_models
        self.out = Path(out)
        self.workers = workers or cfg.workers
        self.progress = progress
        self.backend = backend
        if ray_address is None and (backend or "auto").strip().lower() in ("auto", "ray"):
            ray_address = os.environ.get("RAY_ADDRESS") or None  # as documented: the variable works like the flag
        self.ray_address = ray_address
        self.threads_per_worker = threads_per_worker
        self.data = data
        resolve_backend(backend, self.workers, ray_address)  # a bad name or a missing Ray fails before any work
        self.protocol = get_protocol(cfg.protocol)
        self._exec: Any = None
        self._splits: list[S.Split] = []
        self._rerun: set[str] = set()  # trials to run again whatever is on disk (they must hand back a model)
        self._models: list[ModelSpec] = list(cfg.models)
        self._has_valid = False
        self._auto_spaces: set[str] = set()  # models searched in their own default space (``tune``)
        self._main = True  # False on the ranks > 0 of a torchrun launch: they train, rank 0 writes
        self._distributed = False
        self._bar_lock = threading.Lock()
        self._exec_lock = threading.Lock()
        self._stopping = False  # set when the workers are stopped: no search may start them again

    # ------------------------------------------------------------------ bookkeeping
    @property
    def _trials_dir(self) -> Path:
        return self.out / "trials"

    def _prepare_folder(self) -> None:
        if not self._main:
            return
        for folder in (self.out, *self.out.parents):
            if folder.exists() and not folder.is_dir():
                raise DataError(f"results folder {str(self.out)!r}: {str(folder)!r} is a file, not a folder")
        self._trials_dir.mkdir(parents=True, exist_ok=True)
        resolved = json.loads(json.dumps(self.cfg.to_dict(), default=str))
        existing = self.out / "config.json"
        env = environment()
        env_path = self.out / "environment.json"
        if existing.exists():
            if _results_identity(json.loads(existing.read_text())) != _results_identity(resolved):
                raise DataError(f"{str(self.out)!r} holds results of a different experiment (dataset, protocol, "
                                "seed, k or validation); use another --out folder (or delete it) to start afresh")
            if env_path.exists():  # keep what the first run ran on; later runs are listed after it
                first = json.loads(env_path.read_text())
                env = {**first, "resumed": [*first.get("resumed", []), env]}
        with atomic_path(existing) as tmp:
            tmp.write_text(json.dumps(resolved, indent=2))
        with atomic_path(env_path) as tmp:
            tmp.write_text(json.dumps(env, indent=2))

    def _done(self, tid: str) -> TrialResult | None:
        if tid in self._rerun:
            return None
        found = TrialResult.load(self._trials_dir, tid) if self._main else None
        # under torchrun every rank must skip the same trials, or one would wait forever in a gradient exchange
        return D.broadcast_object(found) if self._distributed else found

    def _save(self, result: TrialResult) -> None:
        if self._main:
            result.save(self._trials_dir)

    def _run(self, tasks: list[Trial], bar: Any = None) -> list[TrialResult]:
        """Run the tasks not done yet on the executor; each result is saved as it arrives; results in task order.
        ``bar``: a progress bar shared with other calls (the searches' one), advanced by the caller; without it
        this call shows its own."""
        results: dict[str, TrialResult] = {}
        todo = []
        for task in tasks:
            done = self._done(task.id)
            if done is not None:
                results[task.id] = done
            elif task.id not in {t.id for t in todo}:
                todo.append(task)
        if todo:
            executor = self._executor()
            if executor.workers > 1:  # longest first: a long trial started last would leave the others idle
                todo.sort(key=_expected_cost, reverse=True)
            with progress_bar(total=len(todo), desc=f"{self.cfg.name} trials ({executor.name})",
                              enabled=self.progress and bar is None) as own:
                for res in executor.map(todo):
                    self._save(res)
                    results[res.id] = res
                    own.set_postfix_str(res.label)
                    own.update(1)
        return [results[t.id] for t in tasks]

    def _executor(self) -> Any:
        """The executor of this run, started on first use (by whichever search needs it first) and kept until
        the run ends."""
        with self._exec_lock:
            if self._stopping:
                raise RuntimeError("the workers of this run were stopped")
            if self._exec is None:
                self._exec = make_executor(self.backend, self.workers, self._splits, self.ray_address,
                                           self.threads_per_worker)
                log.info("%s: trials on the %s backend with %d worker(s)", self.cfg.name, self._exec.name,
                         self._exec.workers)
            return self._exec

    def _task(self, spec: ModelSpec, params: dict[str, Any], part: str, i: int) -> Trial:
        cfg = self.cfg
        then_test = cfg.validation if part == "select" and self._without_refit(spec) else None
        key_part = {"reuse": "select+test", "warm": "select+warm"}.get(then_test or "", part)
        keep = self.keep_models and (part == "test" or then_test is not None)
        assert cfg.k is not None
        tid = trial_id(spec.name, params, key_part, i, cfg.seed)
        if keep:
            self._rerun.add(tid)
        return Trial(tid, spec.display, spec.name, params, part, i, cfg.seed, tuple(cfg.k),  # type: ignore[arg-type]
                     cfg.protocol, cfg.exclude_seen, then_test=then_test, keep_model=keep)

    def _without_refit(self, spec: ModelSpec) -> bool:
        """Whether this model's test comes from its validation trial (``warm``: continued on train + validation,
        for models that can continue their training; ``reuse``: as it is) instead of a refit from scratch."""
        if not self._validates(spec) or self.cfg.validation not in ("warm", "reuse"):
            return False
        return self.cfg.validation == "reuse" or bool(get_model_class(spec.name).supports_continue)

    def _validates(self, spec: ModelSpec) -> bool:
        """Whether this model tunes itself on the validation part (early stopping, blend weights) in this run."""
        return (self.cfg.validation != "off" and self._has_valid
                and bool(get_model_class(spec.name).supports_validation))

    # ------------------------------------------------------------------ search
    def _select_metric(self, spec: ModelSpec) -> str:
        """What a model's parameters are chosen on: ``select_metric``, or RMSE for a rating model that is judged
        by its ratings (not ranked in the top-N leaderboard)."""
        if get_model_class(spec.name).predicts_ratings and not self.cfg.rank_rating_models:
            return "rmse"
        return self.cfg.select_metric

    def _default_space(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with its model's own search space (less the parameters it fixes) when it has no grid or space
        of its own; the model's defaults are then the search's first trial."""
        if spec.grid or spec.space:
            return spec
        space = {k: v for k, v in get_model_class(spec.name).search_space.items() if k not in spec.params}
        if not space:
            return spec
        self._auto_spaces.add(spec.display)
        return spec.model_copy(update={"space": space})

    def _prunes(self, spec: ModelSpec) -> bool:
        """Whether this model's search is pruned (trained by the neural trainer, a pruner set): its trials then
        run one at a time, each pruned where it trains by a copy of its study."""
        return bool(get_model_class(spec.name).uses_trainer) and self.cfg.search.pruner != "none"

    def _budget(self, spec: ModelSpec) -> float:
        """The most proposals this model's search may try (infinite: a budget in time only)."""
        n_trials = self.cfg.search.n_trials
        budget = float(n_trials) if n_trials is not None else np.inf
        if spec.display in self._auto_spaces:  # a budget, not a quota: a one-parameter space is settled in 4
            budget = min(budget, _TRIALS_PER_PARAMETER * len(spec.space))
        return budget

    def _search_all(self, specs: list[ModelSpec]) -> dict[str, tuple[dict[str, Any], list[TrialResult]]]:
        """Every search of ``specs``, each model's chosen parameters and trials by label, under one progress bar.

        With several workers the searches run side by side: each model's search keeps its own sampler and
        sequence (a proposal is drawn when the model's previous batch has been told), so the numbers equal one
        search after another, while the workers stay busy — one search keeps at most ``search.batch`` proposals
        (times the splits; one for a pruned search) running, and a search with nothing in flight leaves its
        workers to the others. As many run at once as the workers hold without a search waiting for another's
        trials (so a ``timeout`` buys each model about as many trials as alone). Labels of one model with the same
        parameters and space search one after the other, the later reading the earlier's trials back. The first
        failure stops every search after its running trials and is raised."""
        found: dict[str, tuple[dict[str, Any], list[TrialResult]]] = {}
        if not specs:
            return found
        budgets = [self._budget(spec) for spec in specs]
        total = int(sum(budgets)) if np.isfinite(budgets).all() else None
        stop = threading.Event()
        serial = self._distributed or resolve_backend(self.backend, self.workers, self.ray_address) == "serial"
        with progress_bar(total=total, desc=f"{self.cfg.name} search on validation", unit="trials",
                          enabled=self.progress) as bar:

            def search_chain(chain: list[ModelSpec]) -> None:
                for spec in chain:
                    found[spec.display] = self._search(spec, stop, bar)

            if serial or len(specs) < 2:
                search_chain(specs)
                return found
            chains: dict[str, list[ModelSpec]] = {}
            for spec in specs:  # the same trials under two labels: one search after the other
                key = json.dumps([spec.name, spec.params, spec.space], sort_keys=True, default=str)
                chains.setdefault(key, []).append(spec)
            # the workers, without starting them (a finished run read back needs none; a Ray cluster without
            # --workers has one per CPU, unknown until started: every search may start)
            workers = (self._exec.workers if self._exec is not None
                       else len(chains) if self.ray_address and self.workers <= 1 else self.workers)
            slots = max(1, min(workers // (self.cfg.search.batch * len(self._splits)), len(chains)))
            failures: list[BaseException] = []

            def fail_all(future: Future[Any]) -> None:
                if not future.cancelled() and future.exception() is not None:
                    failures.append(future.exception())  # type: ignore[arg-type]
                    stop.set()

            side = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="recforge-search")
            try:
                futures = [side.submit(search_chain, chain) for chain in chains.values()]
                for future in futures:
                    future.add_done_callback(fail_all)
                wait(futures)
            except BaseException:  # Ctrl-C: stop the workers now, or each search would first finish its trial
                stop.set()
                self._close_executor()
                raise
            finally:
                side.shutdown(wait=True, cancel_futures=True)
            if failures:
                raise failures[0]
        return {spec.display: found[spec.display] for spec in specs}

    def _search(self, spec: ModelSpec, stop: threading.Event, bar: Any) -> tuple[dict[str, Any], list[TrialResult]]:
        """Optuna TPE over ``spec.space`` on the validation parts; every trial is saved (and resumed) like a grid
        point, and the seeded sampler proposes the same sequence again, so a resumed search retraces its steps.
        ``stop``: set when the run is failing; the search then ends after its running trials. ``bar``: the shared
        progress bar, advanced per proposal.

        Models trained by the neural trainer are pruned, one trial at a time: the trainer reports the validation
        score after every epoch of the first split to the trial's probe, and the pruner stops trials that fall
        behind (a pruned trial is saved with its curve, so a resumed search replays it to the pruner). Other
        models take ``search.batch`` proposals at a time and run them (and their splits) together on the workers;
        the batch size, not the number of workers, shapes the sampler's sequence, so the numbers do not depend on
        workers."""
        try:
            import optuna  # optional dependency (recforge[tune])
        except ImportError:
            raise DataError("search spaces need Optuna: pip install 'recforge[tune]'") from None
        cfg = self.cfg
        search = cfg.search
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        prune = self._prunes(spec)
        pruner: Any = optuna.pruners.NopPruner()
        if prune:
            pruner = (optuna.pruners.HyperbandPruner() if search.pruner == "hyperband"
                      else optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2))
        metric = self._select_metric(spec)
        # a fixed name: Hyperband draws each trial's bracket from the study's name and the trial's number
        study = optuna.create_study(study_name=f"{cfg.name}:{spec.display}",
                                    direction="minimize" if lower_is_better(metric) else "maximize",
                                    sampler=optuna.samplers.TPESampler(seed=cfg.seed), pruner=pruner)
        runs: list[TrialResult] = []
        defaults: dict[str, Any] = {}
        if spec.display in self._auto_spaces:  # what the user would get without tuning is always tried
            defaults = _defaults_within(get_model_class(spec.name)(**spec.params), spec.space)
            if defaults:
                study.enqueue_trial(defaults)

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
        n_trials, timeout = self._budget(spec), search.timeout
        batch = 1 if prune else search.batch
        started, asked = time.monotonic(), 0
        while asked < n_trials and not stop.is_set() and D.broadcast_object(
                timeout is None or time.monotonic() - started < timeout):
            trials = [study.ask() for _ in range(int(min(batch, n_trials - asked)))]
            asked += len(trials)
            proposals = [suggest(trial) for trial in trials]
            tasks = [[self._task(spec, params, "select", i) for i in range(len(self._splits))] for params in proposals]
            if prune:
                finished = self._run_pruned(tasks[0], trials[0], runs, bar)
                if finished is None:
                    study.tell(trials[0], state=optuna.trial.TrialState.PRUNED)
                    self._advance(bar, 1, spec.display)
                    continue
                values = [_selection_score(finished, metric)]
            else:
                done = self._run([t for group in tasks for t in group], bar)
                runs.extend(done)
                by_id = {d.id: d for d in done}
                values = [_selection_score([by_id[t.id] for t in group], metric) for group in tasks]
            for trial, value in zip(trials, values):
                if np.isfinite(value):
                    study.tell(trial, value)
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self._advance(bar, len(trials), spec.display)
        if stop.is_set():  # another search failed: its error is the one to report
            return dict(spec.params), runs
        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
            raise DataError(self._missing_metric_message(runs, spec))
        best = {**spec.params, **study.best_params}
        if defaults and not _clearly_better(runs, best, {**spec.params, **defaults}, metric):
            return {**spec.params, **defaults}, runs
        return best, runs

    def _advance(self, bar: Any, n: int, label: str) -> None:
        """Count ``n`` finished proposals of ``label`` on the shared bar (searches may report from several
        threads)."""
        with self._bar_lock:
            bar.set_postfix_str(label)
            bar.update(n)

    def _missing_metric_message(self, runs: Sequence[TrialResult], spec: ModelSpec) -> str:
        names = sorted({m for r in runs if r.model == spec.name for m in r.metrics})
        return (f"select_metric {self._select_metric(spec)!r} was not computed for model {spec.display!r} on validation "
                f"(check k: {self.cfg.k}); computed metrics: {names or 'none'}")

    def _run_pruned(self, tasks: list[Trial], trial: Any, runs: list[TrialResult],
                    bar: Any) -> list[TrialResult] | None:
        """Run one pruned search trial's tasks on the executor: the first split's with a
        :class:`~recforge.experiments.pruning.PruningProbe` (a copy of ``trial``, pruned where it trains), its
        validation curve then replayed into ``trial`` (a resumed trial's saved curve too, so the pruner sees the
        same history); the other splits only if it was not pruned. Every result is appended to ``runs``; None
        when the trial was pruned."""
        probe = PruningProbe(trial, f"valid_{self.cfg.select_metric}", tasks[0].model)
        first = self._run([replace(tasks[0], probe=probe)], bar)[0]
        runs.append(first)
        for step, value in enumerate(first.curve, start=1):
            trial.report(value, step)
            # asked once a step, as the probe did: Hyperband records each rung's score in the study as it decides,
            # and the trials after this one are judged against those records
            trial.should_prune()
        if first.pruned:
            return None
        rest = self._run(tasks[1:], bar) if len(tasks) > 1 else []
        runs.extend(rest)
        return [first, *rest]

    # ------------------------------------------------------------------ the experiment
    def run(self) -> ExperimentResult:
        """Run (or resume) every trial and write the tables."""
        self._distributed = D.init_distributed()
        if self._distributed:  # torchrun: the ranks go through the trials together, each neural fit data-parallel
            self._main = D.is_main_process()
            self.workers, self.backend = 1, "serial"
        self._stopping = False
        try:
            return self._run_all()
        finally:
            self._close_executor()
            self._exec = None  # every search thread has ended: a later run starts its own workers

    def _close_executor(self) -> None:
        """Stop the workers; a search thread still running then gets an error from the closed executor instead of
        starting another."""
        with self._exec_lock:
            self._stopping = True
            executor = self._exec
        if executor is not None:
            executor.close()

    def _select(self) -> tuple[dict[str, dict[str, Any]], list[TrialResult]]:
        """Step 1-2: validation trials; the chosen parameters of every model, and every validation trial."""
        n = len(self._splits)
        grid_specs = [spec for spec in self._models if not spec.space and (len(spec.combinations()) > 1
                                                                         or self._validates(spec))]
        selected = self._run([self._task(spec, params, "select", i)
                              for spec in grid_specs for params in spec.combinations() for i in range(n)])
        best: dict[str, dict[str, Any]] = {}
        searches = self._search_all([spec for spec in self._models if spec.space])
        for spec in self._models:
            if spec.space:
                best[spec.display], searched = searches[spec.display]
                selected += searched
                continue
            combos = spec.combinations()
            if len(combos) == 1:
                best[spec.display] = combos[0]
                continue
            scores = [_selection_score([r for r in selected if r.model == spec.name and r.params == params],
                                       self._select_metric(spec)) for params in combos]
            if np.isnan(scores).all():
                raise DataError(self._missing_metric_message(selected, spec))
            pick = np.nanargmin if lower_is_better(self._select_metric(spec)) else np.nanargmax
            best[spec.display] = combos[int(pick(scores))]
        return best, selected

    def _test(self, best: dict[str, dict[str, Any]], selected: list[TrialResult]) -> dict[str, list[TrialResult]]:
        """Step 3: every model's test result on every split, refitted with what it tuned or reused."""
        by_key = {(r.model, json.dumps(r.params, sort_keys=True, default=str), r.split): r
                  for r in selected if not r.pruned}
        final: dict[str, list[TrialResult | None]] = {}
        tasks: list[Trial] = []
        for spec in self._models:
            params = best[spec.display]
            final[spec.display] = []
            for i in range(len(self._splits)):
                sel = by_key.get((spec.name, json.dumps(params, sort_keys=True, default=str), i))
                if sel is not None and sel.reused_test is not None:
                    final[spec.display].append(replace(sel.reused_test, label=spec.display))
                    continue
                tuned = sel.tuned_params if sel is not None and self._validates(spec) else {}
                tasks.append(self._task(spec, {**params, **tuned}, "test", i))
                final[spec.display].append(None)
        done = iter(self._run(tasks))
        return {label: [r if r is not None else next(done) for r in parts] for label, parts in final.items()}

    def _run_all(self) -> ExperimentResult:
        cfg = self.cfg
        self._prepare_folder()
        self._splits = make_splits(cfg, self.data)
        self._has_valid = all(s.valid is not None and len(s.valid) for s in self._splits)
        for spec in cfg.models:
            if spec.tuned and not self._has_valid:
                raise DataError(f"model {spec.display!r} has a grid, but protocol {cfg.protocol!r} has no validation "
                                "part to choose on; use loo, temporal or another protocol with validation")
        no_ratings = self._splits[0].train.ratings is None
        unrated = {spec.display: "it predicts ratings and the data has none" for spec in cfg.models
                   if no_ratings and get_model_class(spec.name).predicts_ratings}
        self._models = [spec for spec in cfg.models if spec.display not in unrated]
        if cfg.tune and self._has_valid:
            self._models = [self._default_space(spec) for spec in self._models]
        best, selected = self._select()
        final = self._test(best, selected)
        rows = [self._trial_row(r) for r in {r.id + r.part: r for r in [*selected, *(
            p for parts in final.values() for p in parts)]}.values()]
        if self._main:  # every rank computes the report, rank 0 writes it
            write_table(pd.DataFrame(rows), self.out / "trials.csv")
        skipped = {**unrated, **{label: next(p.skipped for p in parts if p.skipped) for label, parts in final.items()
                                 if any(p.skipped for p in parts)}}
        for label, reason in skipped.items():
            log.warning("%s was not evaluated: %s", label, reason)
        # what each model was tested with: its parameters and, for a test without a refit, what it tuned
        used = {label: {**parts[0].params, **parts[0].tuned_params} for label, parts in final.items()
                if label not in skipped}
        results = {label: merge_trials(label, parts, used[label]) for label, parts in final.items()
                   if label not in skipped}
        if not results:
            raise DataError(f"no model could be evaluated with the {cfg.protocol} protocol: "
                            + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        board, ratings = self._tables(results)
        if self._main:
            save_leaderboard(board, self.out)
            if ratings is not None:
                save_leaderboard(ratings, self.out, stem="ratings")
            with atomic_path(self.out / "selected_params.json") as tmp:
                tmp.write_text(json.dumps(used, indent=2, default=str))
        trials = {spec.display: [r for r in selected if r.label == spec.display or (
            r.model == spec.name and r.params == best.get(spec.display))] + final.get(spec.display, [])
            for spec in self._models}
        models = {label: [p.fitted for p in parts] for label, parts in final.items() if parts[0].fitted is not None}
        first = self._splits[0]
        whole = first.train_valid.concat(first.test)
        learns = {spec.display: models[spec.display][0].learns_from if spec.display in models
                  else get_model_class(spec.name).learns for spec in self._models if spec.display in results}
        notes = {"data": whole.regime(), "learns_from": learns_note(learns, whole),
                 **{k: v for split in self._splits for k, v in split.notes.items()}}
        seen = self._seen_note()
        if seen:
            notes["seen_test_events"] = seen
        return ExperimentResult(board, ratings, results, used, self.out, skipped, trials, models, notes)

    def _seen_note(self) -> str | None:
        """What excluding each user's seen items does to this split's test events (``None`` if nothing): repeated
        (user, item) pairs put test items in the training data, where they can never be hit. Warns from 5%."""
        if not self.protocol.excludes_seen(self.cfg.exclude_seen):
            return None
        share = float(np.mean([split.seen_test_share() for split in self._splits]))
        if share == 0:
            return None
        note = (f"{share:.1%} of the test events are items their user already had before the test; with seen items "
                "excluded from the rankings (the default) they can never be hit. To count re-consumption, keep them "
                "(exclude_seen=False; CLI --no-exclude-seen); to keep one event per user-item pair, deduplicate "
                "(the deduplicate filter; CLI --dedupe last)")
        if share >= 0.05:
            log.warning(note)
        return note

    @staticmethod
    def _trial_row(r: TrialResult) -> dict[str, Any]:
        return {"label": r.label, "part": r.part, "split": r.split, "params": json.dumps(r.params, sort_keys=True),
                "seconds": r.seconds, "pruned": r.pruned, "skipped": r.skipped,
                "tuned": json.dumps(r.tuned_params, sort_keys=True) if r.tuned_params else None, **r.metrics}

    def _tables(self, results: dict[str, EvaluationResult]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """The leaderboard (explicit ``metrics``: every model; default: top-N models with the protocol's metrics)
        and the rating table (rating models, when the leaderboard's metrics are the default)."""
        cfg = self.cfg
        assert cfg.k is not None
        rating = {label for label, res in results.items() if "rmse" in res.summary}
        if cfg.metrics:
            return self._board(results, list(cfg.metrics), f"{cfg.name}: {cfg.protocol}"), None
        ranked = {k: v for k, v in results.items() if k not in rating or cfg.rank_rating_models}
        board_metrics = self.protocol.default_metrics(cfg.k)
        main_k = 10 if 10 in cfg.k else cfg.k[0]
        recall, hr = f"recall@{main_k}", f"hr@{main_k}"
        if recall in board_metrics and ranked and all(
            recall in r.per_user and np.array_equal(r.per_user[recall], r.per_user[hr]) for r in ranked.values()
        ):
            board_metrics.remove(recall)  # one relevant item per user: recall@k is hr@k again
        if cfg.select_metric in board_metrics:  # ranked by what the models were tuned on
            board_metrics.insert(0, board_metrics.pop(board_metrics.index(cfg.select_metric)))
        seen = "seen items excluded" if self.protocol.excludes_seen(cfg.exclude_seen) else "seen items kept"
        board = (self._board(ranked, board_metrics, f"{cfg.name}: {cfg.protocol}, {seen}") if ranked
                 else pd.DataFrame({"model": []}))
        table = None
        if rating:
            rated = {k: results[k] for k in rating}
            metrics = [m for m in RATING_METRICS if m != "rating_ndcg" or any(
                (r.per_user.get("rating_n", pd.Series(dtype=float)) > 1).any() for r in rated.values())]
            # one test rating per user (leave-one-out) makes the rating-graded NDCG 1 by construction
            table = self._board(rated, metrics, f"{cfg.name}: {cfg.protocol}, rating models")
        return board, table

    def _board(self, results: dict[str, EvaluationResult], metrics: list[str], title: str) -> pd.DataFrame:
        table = leaderboard(results, metrics=metrics, seed=self.cfg.seed)
        if "rmse" in metrics and "rmse" in table.columns and "rmse_lo" not in table.columns:
            cis = [user_bootstrap_rmse(results[m].per_user, seed=self.cfg.seed) if "rating_sse" in results[m].per_user
                   else (np.nan, np.nan) for m in table["model"]]
            at = table.columns.get_loc("rmse") + 1
            table.insert(at, "rmse_lo", [c[0] for c in cis])
            table.insert(at + 1, "rmse_hi", [c[1] for c in cis])
        table.attrs["title"] = title
        return table


def environment() -> dict[str, Any]:
    """Versions and hardware, for the results folder."""
    return {
        "recforge": recforge.__version__, "python": sys.version.split()[0], "numpy": np.__version__,
        "scipy": scipy.__version__, "pandas": pd.__version__, "platform": platform.platform(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_experiment(config: ExperimentConfig | str | os.PathLike[str], out: str | os.PathLike[str],
                   workers: int | None = None, progress: bool = True, backend: str = "auto",
                   ray_address: str | None = None, threads_per_worker: int | None = None,
                   data: Interactions | None = None) -> ExperimentResult:
    """Run an experiment config (object or file) into ``out``. ``backend``: ``auto`` (Ray when installed and
    ``workers > 1``, else a process pool), ``serial``, ``process`` or ``ray``; ``ray_address`` connects to a Ray
    cluster; ``threads_per_worker`` caps each trial's BLAS/numba/torch threads (default: all cores serially, 1 per
    worker otherwise); ``data``: the dataset already loaded (the config then only names it)."""
    cfg = config if isinstance(config, ExperimentConfig) else ExperimentConfig.from_file(config)
    return ExperimentRunner(cfg, out, workers, progress, backend, ray_address, threads_per_worker, data).run()
