"""Typed experiment configs: read from YAML, TOML or JSON, validated with messages that name the field, and written
back as JSON (the resolved config doubles as the results folder's metadata)."""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from recforge.errors import DataError
from recforge.evaluation.protocols import get_protocol
from recforge.models import get_model_class

FILTERS = ("k_core", "min_user_count", "min_item_count", "rating_threshold", "deduplicate")
#: Optuna pruners a search may name.
PRUNERS = ("median", "hyperband", "none")
#: How models that tune themselves on validation (early stopping, blend weights) are tested:
#: ``refit`` (fit on train with validation, refit on train + validation from scratch with what was chosen, test),
#: ``warm`` (continue the model fitted on train on train + validation for a tenth of its epochs, then test; models
#: that cannot continue are refitted), ``reuse`` (test the model fitted on train, the validation events added to
#: its histories where it can take them) or ``off`` (fit on train + validation without validation, as configured).
VALIDATION_MODES = ("refit", "warm", "reuse", "off")
#: The parts of a dataset given as split files (``dataset: {train: ..., test: ...}``).
SPLIT_FILES = ("train", "valid", "test", "items", "users", "columns")


@dataclass
class ModelSpec:
    """One model of an experiment: registry ``name``, fixed ``params``, and either a ``grid`` of values (every
    combination is a trial) or a search ``space`` for Optuna (``{"reg": {"low": 1, "high": 1000, "log": true},
    "n_factors": {"choices": [32, 64]}, "epochs": {"low": 5, "high": 50, "int": true}}``), searched for
    ``search.n_trials`` trials / ``search.timeout`` seconds (``n_trials: null`` with a timeout: time only),
    ``search.batch`` proposals at a time. The best on ``select_metric`` (validation) is kept.
    Models trained by the neural trainer report their validation score every epoch, and ``search.pruner``
    (``median``, the default, ``hyperband`` or ``none``) stops unpromising trials early."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    label: str | None = None
    space: dict[str, dict[str, Any]] = field(default_factory=dict)

    def combinations(self) -> list[dict[str, Any]]:
        """Every parameter set of the grid laid over ``params`` (one set without a grid)."""
        keys = sorted(self.grid)
        values = [self.grid[k] for k in keys]
        return [{**self.params, **dict(zip(keys, combo))} for combo in itertools.product(*values)] or [dict(self.params)]

    def check(self) -> None:
        """Fail early, before any data is read: an unknown model, unknown parameter names (grid and search space
        included) or a fixed value a parameter does not accept."""
        cls = get_model_class(self.name)
        names = {**self.params, **{k: None for k in self.grid}, **{k: None for k in self.space}}
        cls.check_param_names(names)
        for params in self.combinations():
            cls(**cls.check_param_names(params)).check_params()

    @property
    def tuned(self) -> bool:
        """Whether parameters are chosen on validation: a grid of several points or a search space."""
        return bool(self.space) or len(self.combinations()) > 1

    @property
    def display(self) -> str:
        """The label of the model in tables (``label`` or ``name``)."""
        return self.label or self.name


@dataclass
class ExperimentConfig:
    """An experiment: dataset (+ filters) → split protocol → models (with grids) → metrics.

    ``dataset``: a dataset name or path, ``{"name": ..., "options": {...}}`` (e.g. ``synthetic`` with generator
    options), or a split made elsewhere as files ``{"train": ..., "test": ..., "valid": ..., "items": ...,
    "users": ...}`` (``valid``, ``items`` and ``users`` optional; the protocol then only says how to score).
    ``filters``: applied in order, e.g. ``{"k_core": 5}``. ``protocol``: a name of the protocol registry
    (:mod:`recforge.evaluation.protocols`). ``k``: list lengths (default: the protocol's); ``select_metric``:
    what grids are tuned on (validation part when the protocol has one). ``validation``: how models that tune
    themselves on validation are tested (:data:`VALIDATION_MODES`). ``metrics``: leaderboard columns (default:
    the protocol's, top-N models in the leaderboard and rating models in a separate rating table; with
    ``rank_rating_models`` rating models are also ranked in the leaderboard). ``exclude_seen``: top-N rankings
    leave out each user's training items (protocols that keep them, such as next-event, ignore it). ``tune``: models
    given without a grid or search space have their key parameters searched on validation in their model's own
    ``search_space`` (parameters fixed in ``params`` stay fixed), within ``search``'s budget, the model's defaults
    tried first.
    """

    name: str
    dataset: str | dict[str, Any]
    models: list[ModelSpec]
    protocol: str = "loo"
    filters: dict[str, Any] = field(default_factory=dict)
    k: list[int] | None = None
    metrics: list[str] | None = None
    select_metric: str = "ndcg@10"
    seed: int = 0
    workers: int = 1
    search: dict[str, Any] = field(default_factory=lambda: {"n_trials": 20, "timeout": None})
    validation: str = "refit"
    rank_rating_models: bool = False
    exclude_seen: bool = True
    tune: bool = False

    def wants_validation(self) -> bool:
        """Whether a validation part is used: some model is tuned (a grid, a search space, ``tune``) or tunes
        itself while it trains (early stopping), and ``validation`` is not ``off``."""
        if self.validation == "off":
            return False
        return self.tune or any(m.tuned or get_model_class(m.name).supports_validation for m in self.models)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        """Validate a plain dict (as read from a file); unknown or missing fields raise :class:`DataError`."""
        if not isinstance(raw, dict):
            raise DataError(f"an experiment config must be a mapping, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"experiment config has unknown field(s) {unknown}; valid fields: {sorted(known)}")
        for required in ("name", "dataset", "models"):
            if required not in raw:
                raise DataError(f"experiment config needs a {required!r} field")
        models_raw = raw["models"]
        if not isinstance(models_raw, list) or not models_raw:
            raise DataError("experiment config 'models' must be a non-empty list")
        models = []
        for i, spec in enumerate(models_raw):
            if isinstance(spec, str):
                spec = {"name": spec}
            if not isinstance(spec, dict) or "name" not in spec:
                raise DataError(f"models[{i}] must be a model name or a mapping with a 'name'")
            extra = sorted(set(spec) - {"name", "params", "grid", "label", "space"})
            if extra:
                raise DataError(f"models[{i}] has unknown field(s) {extra}; use name, params, grid, space, label")
            space = spec.get("space") or {}
            if space and spec.get("grid"):
                raise DataError(f"models[{i}] has both a grid and a search space; give one")
            for pname, dist in space.items():
                if not isinstance(dist, dict) or not ({"low", "high"} <= set(dist) or "choices" in dist):
                    raise DataError(f"models[{i}].space.{pname} needs low and high (optional log, int) or choices")
            grid = spec.get("grid") or {}
            if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
                raise DataError(f"models[{i}].grid must map parameter names to non-empty lists of values")
            model = ModelSpec(spec["name"], dict(spec.get("params") or {}), grid, spec.get("label"), dict(space))
            model.check()
            models.append(model)
        labels = [m.display for m in models]
        if len(set(labels)) != len(labels):
            raise DataError(f"two models share a label {labels}; give one of them a 'label'")
        cfg = cls(**{**raw, "models": models})
        if cfg.validation is False:  # YAML reads a bare `off` as false
            cfg.validation = "off"
        protocol = get_protocol(cfg.protocol)
        cfg.protocol = protocol.name
        if cfg.k is None:
            cfg.k = list(protocol.ks)
        cfg.k = [cfg.k] if isinstance(cfg.k, int) else list(cfg.k)
        if not cfg.k or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in cfg.k):
            raise DataError(f"k must be a positive integer or a list of them, got {cfg.k!r}")
        if cfg.validation not in VALIDATION_MODES:
            raise DataError(f"validation must be one of {list(VALIDATION_MODES)}, got {cfg.validation!r}")
        if isinstance(cfg.dataset, dict) and "name" not in cfg.dataset:
            extra = sorted(set(cfg.dataset) - set(SPLIT_FILES))
            if extra or "train" not in cfg.dataset or "test" not in cfg.dataset:
                raise DataError(f"dataset must be a name, {{name, options}} or split files {{train, test[, valid, "
                                f"items, users, columns]}}; got keys {sorted(cfg.dataset)}")
            if cfg.filters:
                raise DataError("split files are used as they are: give no 'filters'")
        for name in cfg.filters:
            if name not in FILTERS:
                raise DataError(f"unknown filter {name!r}; available filters: {list(FILTERS)}")
        at = cfg.select_metric.partition("@")[2]
        if (cfg.tune or any(m.tuned for m in models)) and at and (not at.isdigit() or int(at) not in cfg.k):  # untuned configs never use it
            raise DataError(f"select_metric {cfg.select_metric!r} needs its cut-off in k, but k is {cfg.k}")
        if not isinstance(cfg.tune, bool):
            raise DataError(f"tune must be true or false, got {cfg.tune!r}")
        if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 1:
            raise DataError(f"workers must be a positive integer, got {cfg.workers!r}")
        search = cfg.search or {}
        extra = sorted(set(search) - {"n_trials", "timeout", "pruner", "batch"})
        if extra:
            raise DataError(f"search has unknown field(s) {extra}; use n_trials, timeout, pruner, batch")
        for key in ("n_trials", "batch"):
            value = search.get(key, 1)
            if key == "n_trials" and value is None and search.get("timeout"):
                continue  # a budget in time only
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"search.{key} must be a positive integer, got {value!r}")
        if search.get("pruner", "median") not in PRUNERS:
            raise DataError(f"search.pruner must be one of {list(PRUNERS)}, got {search['pruner']!r}")
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ExperimentConfig:
        """Read a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"experiment config not found: {str(p)!r}")
        text = p.read_text()
        suffix = p.suffix.lower()
        try:
            if suffix in (".yaml", ".yml"):
                raw = yaml.safe_load(text)
            elif suffix == ".toml":
                raw = tomllib.loads(text)
            elif suffix == ".json":
                raw = json.loads(text)
            else:
                raise DataError(f"experiment config {str(p)!r} must be .yaml, .toml or .json")
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - parser errors of three libraries, shown as one message
            raise DataError(f"could not parse {str(p)!r}: {exc}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` reads back to an equal config."""
        return asdict(self)
