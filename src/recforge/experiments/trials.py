"""One trial of an experiment: a model with fixed parameters fitted and scored on one part of one split.

A ``select`` trial fits on the split's train part (models that validate while they train see the validation part
too) and scores the validation part; a ``test`` trial fits on train + validation (or train, without a validation
part) and scores the test part. :func:`run_trial` runs one anywhere (this process, a pool worker, a Ray actor);
its :class:`TrialResult` is what the results folder stores, one JSON record and one per-user CSV per trial.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from recforge.data import filters as F
from recforge.data import split as S
from recforge.data.datasets import load
from recforge.data.interactions import Interactions
from recforge.data.io import atomic_path, read_table, write_table
from recforge.errors import DataError, EmptyDatasetError, UnsupportedError, argument
from recforge.evaluation.protocols import get_protocol
from recforge.experiments.config import ExperimentConfig, NamedDataset, SplitFiles
from recforge.experiments.pruning import PruningProbe, TrialPruned
from recforge.models import create_model, get_model_class
from recforge.neural.trainer import training_callbacks

log = logging.getLogger(__name__)

Part = Literal["select", "test"]


@dataclass
class TrialKey:
    """Which trial: ``model`` (registry name) with ``params`` on ``part`` of split ``split``, shown as ``label``."""

    id: str
    label: str
    model: str
    params: dict[str, Any]
    part: Part
    split: int


@dataclass
class Trial(TrialKey):
    """What to run: ``model`` with ``params`` on ``part`` of split ``split``.

    ``then_test``: a select trial of ``validation: warm`` or ``reuse`` goes on to score the test part with the
    model it fitted: ``warm`` continues it on train + validation for a tenth of its epochs first
    (:func:`warm_epochs`), ``reuse`` only adds the validation events to its inputs; no second fit from scratch.
    ``keep_model``: hand the fitted model back with the result (trials run in this process only).
    ``probe``: the :class:`~recforge.experiments.pruning.PruningProbe` of a pruned search's trial (its first
    split), called after every epoch; not part of the trial's id.
    """

    seed: int = 0
    k: tuple[int, ...] = (10,)
    protocol: str = "loo"
    exclude_seen: bool = True
    then_test: str | None = None
    keep_model: bool = False
    probe: PruningProbe | None = field(default=None, repr=False, compare=False)


@dataclass
class TrialResult(TrialKey):
    """What a trial produced: its metrics (means), per-user metrics, seconds, and what the model tuned on
    validation (``tuned_params``); ``pruned`` trials carry their validation ``curve``; a model that cannot be
    scored under the protocol is ``skipped`` (the reason). ``reused_test``: the test result of a reuse trial."""

    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    per_user: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"user_id": []}))
    tuned_params: dict[str, Any] = field(default_factory=dict)
    pruned: bool = False
    curve: list[float] = field(default_factory=list)
    skipped: str | None = None
    reused_test: TrialResult | None = None
    fitted: Any = field(default=None, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        """The JSON record (everything but the per-user table and the fitted model)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("per_user", "reused_test", "fitted")}
        if self.reused_test is not None:
            out["reused_test"] = self.reused_test.record()
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any], per_user: pd.DataFrame) -> TrialResult:
        """The inverse of :meth:`record` (the per-user table read separately)."""
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__ and k not in ("reused_test", "fitted")}
        out = cls(**fields, per_user=per_user)
        if record.get("reused_test") is not None:
            out.reused_test = cls.from_record(record["reused_test"], pd.DataFrame({"user_id": []}))
        return out

    def save(self, folder: Path) -> None:
        """Write ``<id>.csv`` (per-user), ``<id>.test.csv`` for a reused test, then ``<id>.json`` (written last,
        atomically: its presence marks the trial complete)."""
        write_table(self.per_user, folder / f"{self.id}.csv")
        if self.reused_test is not None:
            write_table(self.reused_test.per_user, folder / f"{self.id}.test.csv")
        with atomic_path(folder / f"{self.id}.json") as tmp:
            tmp.write_text(json.dumps(self.record(), indent=2, default=str))

    @classmethod
    def load(cls, folder: Path, trial_id: str) -> TrialResult | None:
        """A finished trial read back from ``folder``, or None when it is not complete there."""
        path = folder / f"{trial_id}.json"
        if not (path.exists() and (folder / f"{trial_id}.csv").exists()):
            return None
        out = cls.from_record(_checked_record(path), pd.read_csv(folder / f"{trial_id}.csv"))
        if out.reused_test is not None:
            test_csv = folder / f"{trial_id}.test.csv"
            if not test_csv.exists():
                return None
            out.reused_test.per_user = pd.read_csv(test_csv)
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checked_record(path: Path) -> dict[str, Any]:
    """A trial's JSON record, its fields that steer a resumed run (the pruner's curve, the metrics a search
    compares) checked before use: an edited or damaged file is one error naming it, not a traceback."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"trial file {str(path)!r} is not valid JSON ({exc}); delete it to run that trial again") from None
    problem = None
    if not isinstance(record, dict):
        problem = "is not a JSON object"
    elif not isinstance(record.get("curve", []), list) or not all(map(_is_number, record.get("curve", []))):
        problem = "has a 'curve' that is not a list of numbers"
    elif not isinstance(record.get("pruned", False), bool):
        problem = "has a 'pruned' that is not true or false"
    elif not isinstance(record.get("metrics", {}), dict) or not all(map(_is_number, record.get("metrics", {}).values())):
        problem = "has 'metrics' that are not numbers"
    elif not _is_number(record.get("seconds", 0.0)):
        problem = "has 'seconds' that is not a number"
    if problem:
        raise DataError(f"trial file {str(path)!r} {problem}; delete it to run that trial again")
    return record


#: Parameters that change what a fit shows, not what it learns.
_DISPLAY_PARAMS = ("progress",)


def trial_id(model: str, params: dict[str, Any], part: str, split_index: int, seed: int) -> str:
    """A stable id for a trial (same inputs, same id; the resume key). The parameters are the model's defaults
    updated with ``params``, so a run resumed after an upgrade that changed a default fits that model again
    instead of reading back results of the old default."""
    cls = get_model_class(model)
    defaults = {k: v for k, v in cls.default_params().items() if k not in _DISPLAY_PARAMS}
    resolved = {**defaults, **params}
    key = json.dumps({"model": model, "params": resolved, "part": part, "split": split_index, "seed": seed},
                     sort_keys=True, default=str)
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def load_data(cfg: ExperimentConfig, data: Interactions | None = None) -> Interactions:
    """The dataset of the config (or ``data``, already loaded) with the config's filters applied in order."""
    if data is None and isinstance(cfg.dataset, NamedDataset):
        data = load(cfg.dataset.name, **dict(cfg.dataset.options or {}))
    elif data is None:
        data = load(cfg.dataset)
    for name, value in cfg.filters.items():
        fn = getattr(F, name)
        data = fn(data, **value) if isinstance(value, dict) else fn(data, value)
    return data


#: The columns split files are read by, and the option that names each one otherwise.
_FILE_COLUMNS = {"user_col": "user_id", "item_col": "item_id", "rating_col": "rating", "timestamp_col": "timestamp"}


def read_split_files(files: dict[str, Any], carve_valid: bool = False, seed: int = 0) -> S.Split:
    """A split made elsewhere: train/valid/test tables (CSV, Parquet, ...: ``user_id,item_id[,rating,timestamp]``)
    indexed with one shared id map, with optional item and user side data (``items``, ``users``: tables with an
    ``item_id`` / ``user_id`` column). ``carve_valid``: without a VALID file, hold one event per user out of TRAIN
    as the validation part (:func:`~recforge.data.split.holdout_one`: the last by time, else a random one).
    ``columns``: other names of the columns (``user_col``, ``item_col``, ``rating_col``, ``timestamp_col``) and the
    CSV separator (``sep``)."""
    columns = dict(files.get("columns") or {})
    unknown = sorted(set(columns) - set(_FILE_COLUMNS) - {"sep"})
    if unknown:
        raise DataError(f"unknown column option(s) {unknown} for split files; known: {[*_FILE_COLUMNS, 'sep']}")
    renames = {columns[arg]: name for arg, name in _FILE_COLUMNS.items() if arg in columns}
    frames, parts = [], []
    for part in ("train", "valid", "test"):
        if files.get(part) is None:
            continue
        df = read_table(files[part], sep=columns.get("sep")).rename(columns=renames)
        missing = [(arg, c) for arg, c in (("user_col", "user_id"), ("item_col", "item_id")) if c not in df.columns]
        if missing:
            raise DataError(f"{part.upper()} file lacks the column(s) {[columns.get(a, c) for a, c in missing]}; it "
                            f"has {list(df.columns)}; pass {' and '.join(argument(a) for a, _ in missing)} to name "
                            "yours")
        if len(df) == 0:
            raise DataError(f"{part.upper()} file has no rows")
        frames.append(df)
        parts.append(part)
    cols = [c for c in ("user_id", "item_id", "rating", "timestamp") if all(c in f.columns for f in frames)]
    side = {key: read_table(files[key]) for key in ("items", "users") if files.get(key) is not None}
    for key, col in (("items", "item_id"), ("users", "user_id")):
        if key in side and col not in side[key].columns:
            raise DataError(f"the {key} file needs an {col!r} column; it has {list(side[key].columns)}")
    both = Interactions.from_frame(pd.concat([f[cols] for f in frames], ignore_index=True),
                                   item_data=side.get("items"), item_data_id_col="item_id",
                                   user_data=side.get("users"), user_data_id_col="user_id")
    label = np.repeat(np.array(parts), [len(f) for f in frames])
    got = {p: both.subset(label == p) for p in parts}
    known = np.zeros(both.n_users, bool)
    for part in ("train", "valid"):
        if part in got:
            known[got[part].users] = True
    test, notes = got["test"], {}
    if carve_valid and "valid" not in got:
        try:
            carved = S.holdout_one(got["train"], seed=seed)
        except EmptyDatasetError:  # tuning is skipped then, as for a protocol without validation
            notes["validation"] = "not carved: no TRAIN user has 3+ events, so nothing was tuned"
        else:
            got["train"], got["valid"] = carved.train, carved.test
            how = "the last event" if carved.name == "holdout-last" else "a random event (no timestamps)"
            notes["validation"] = (f"carved from TRAIN: {how} of each user with 3+ events, {len(carved.test):,} "
                                   "events; the final models are refitted on all of TRAIN")
    cold = ~known[test.users]
    if cold.any():  # nothing to rank them by: every score would tie, and ties would fall to item-id order
        n_cold, n_test = len(np.unique(test.users[cold])), len(np.unique(test.users))
        if n_cold == n_test:
            raise DataError("no TEST user has TRAIN (or VALID) events: there is nothing to rank their items by")
        log.warning("%d of %d TEST users have no TRAIN or VALID events: left out of the metrics", n_cold, n_test)
        test, notes = test.subset(~cold), {"cold_test_users": n_cold, "cold_test_rows": int(cold.sum())}
    return S.Split(got["train"], test, got.get("valid"), name="files", notes=notes)


def make_splits(cfg: ExperimentConfig, data: Interactions | None = None) -> list[S.Split]:
    """The splits of an experiment: its protocol applied to its dataset (or to ``data``, already loaded), or the
    split files it names; validation parts kept."""
    protocol = get_protocol(cfg.protocol)
    if isinstance(cfg.dataset, SplitFiles):
        files = cfg.dataset.model_dump(exclude_none=True)
        return [read_split_files(files, carve_valid=cfg.wants_validation(), seed=cfg.seed)]
    if data is None and isinstance(cfg.dataset, str) and cfg.dataset.startswith("in-memory:"):
        raise DataError("this experiment ran on interactions held in memory; pass them again (data=...)")
    if protocol.reads_files:  # the official files, read as they are
        if cfg.filters or not isinstance(cfg.dataset, str) or data is not None:
            raise DataError(f"protocol {cfg.protocol!r} reads ML-100K's official u1..u5 files as they are: give "
                            "'dataset' as the ml-100k folder or zip (a string) and no 'filters'")
        return protocol.splits(cfg.dataset, seed=cfg.seed)
    return protocol.splits(load_data(cfg, data), seed=cfg.seed)


def _fit_scored(trial: Trial, split: S.Split) -> tuple[Interactions, Interactions | None, Interactions]:
    """(what to fit on, the validation part the model may tune on, what to score) for a trial."""
    has_valid = split.valid is not None and len(split.valid) > 0
    if trial.part == "select":
        return split.train, split.valid, split.valid  # type: ignore[return-value]
    return (split.train_valid if has_valid else split.train), None, split.test


def run_trial(trial: Trial, splits: Sequence[S.Split], threads: int | None = None) -> TrialResult:
    """Fit and score one trial against the experiment's splits; ``threads`` caps the model's threads."""
    cls = get_model_class(trial.model)
    split = splits[trial.split]
    protocol = get_protocol(trial.protocol)
    params = dict(trial.params)
    # models validate as the protocol tests: with or without each user's earlier items in the ranking
    for key, value in (("seed", trial.seed), ("progress", False), ("num_threads", threads),
                       ("valid_exclude_seen", protocol.excludes_seen(trial.exclude_seen))):
        if key in cls._param_names() and value is not None:
            params.setdefault(key, value)
    if params.get("checkpoint_dir"):  # a folder of its own for every trial: a trial resumes itself only
        params["checkpoint_dir"] = str(Path(params["checkpoint_dir"]) / f"{trial.part}-{trial.id}")
    start = time.perf_counter()
    fit_on, valid, scored = _fit_scored(trial, split)
    result = TrialResult(trial.id, trial.label, trial.model, trial.params, trial.part, trial.split)
    probe = trial.probe
    try:
        with training_callbacks(*(() if probe is None else (probe,))):
            model = create_model(trial.model, **params).fit(fit_on, valid=valid)
        res = protocol.evaluate(model, fit_on, scored, k=list(trial.k), exclude_seen=trial.exclude_seen)
    except UnsupportedError as exc:  # e.g. a model that cannot score histories under a next-item protocol
        log.warning("%s cannot be evaluated with the %s protocol: %s", trial.label, protocol.name, exc)
        result.skipped = str(exc)
        return result
    except TrialPruned:
        assert probe is not None
        result.pruned, result.curve = True, probe.curve
        result.seconds = time.perf_counter() - start
        return result
    if probe is not None:
        result.curve = probe.curve
    result.metrics = {k: float(v) for k, v in res.summary.items()}
    result.per_user = res.per_user
    result.tuned_params = dict(getattr(model, "tuned_params_", {}) or {})
    if trial.then_test:
        result.reused_test = reused_test(trial, split, model, protocol)
    elif trial.keep_model:
        result.fitted = model
    result.seconds = time.perf_counter() - start
    return result


def warm_epochs(tuned_epochs: int) -> int:
    """How long a warm refit continues a model early-stopped after ``tuned_epochs`` epochs on train +
    validation: a tenth of that, at least one epoch (measured in ``docs/experiments.md``: within noise of a
    refit from scratch, at a tenth of its time)."""
    return max(1, math.ceil(tuned_epochs / 10))


def reused_test(trial: Trial, split: S.Split, model: Any, protocol: Any) -> TrialResult:
    """The test result of a model fitted on train with validation, without fitting it again from scratch:
    ``warm`` continues its training on train + validation (:func:`warm_epochs`), ``reuse`` adds the validation
    events to what it knows (``partial_fit``, where it can take them: sequential models extend their histories);
    either way the validation events are excluded from its rankings."""
    start = time.perf_counter()
    tuned = dict(getattr(model, "tuned_params_", {}) or {})
    if trial.then_test == "warm" and tuned.get("epochs"):
        tuned["warm_epochs"] = warm_epochs(int(tuned["epochs"]))
        model.continue_fit(split.train_valid, tuned["warm_epochs"])
    elif model.supports_partial_fit and split.valid is not None and len(split.valid):
        model.partial_fit(split.valid)
    history = split.train_valid
    res = protocol.evaluate(model, history, split.test, k=list(trial.k), exclude_seen=trial.exclude_seen)
    out = TrialResult(trial.id, trial.label, trial.model, trial.params, "test", trial.split,
                      seconds=time.perf_counter() - start, per_user=res.per_user, tuned_params=tuned,
                      fitted=model if trial.keep_model else None)
    out.metrics = {k: float(v) for k, v in res.summary.items()}
    return out
