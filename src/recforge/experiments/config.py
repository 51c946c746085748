"""Typed experiment configs (pydantic): read from YAML, TOML or JSON, validated with one-line messages that name the
field, written back as JSON (the resolved config doubles as the results folder's metadata), and described field by
field by :func:`config_reference` (``recforge run --help-config``)."""

from __future__ import annotations

import itertools
import json
import os
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from recforge.errors import DataError, RecforgeError
from recforge.evaluation.protocols import get_protocol
from recforge.models import get_model_class

FILTERS = ("k_core", "min_user_count", "min_item_count", "rating_threshold", "deduplicate")
#: Optuna pruners a search may name.
PRUNERS = ("median", "hyperband", "none")
#: How models that tune themselves on validation (early stopping, blend weights) are tested (see
#: :attr:`ExperimentConfig.validation`).
VALIDATION_MODES = ("refit", "warm", "reuse", "off")
#: The parts of a dataset given as split files (``dataset: {train: ..., test: ...}``).
SPLIT_FILES = ("train", "valid", "test", "items", "users", "columns")

PositiveInt = Annotated[StrictInt, Field(ge=1)]


class _Section(BaseModel):
    """A part of a config: unknown keys are errors, values are checked as they are (no "5" for 5)."""

    model_config = ConfigDict(extra="forbid", strict=False)


class NamedDataset(_Section):
    """A registered dataset with loader options."""

    name: str = Field(description="A dataset name (`recforge datasets list`) or path.")
    options: dict[str, Any] | None = Field(None, description="Loader options, e.g. the generator's for `synthetic`.")


class SplitFiles(_Section):
    """A split made elsewhere, as files; the protocol then only says how to score."""

    train: str = Field(description="Training events (CSV, Parquet, ...: user_id,item_id[,rating,timestamp]).")
    test: str = Field(description="Test events, same columns.")
    valid: str | None = Field(None, description="Validation events (default: one event per user held out of train).")
    items: str | None = Field(None, description="Item side data: a table with an item_id column.")
    users: str | None = Field(None, description="User side data: a table with a user_id column.")
    columns: dict[str, str] | None = Field(
        None, description="Other column names (user_col, item_col, rating_col, timestamp_col) and the CSV sep.")


class SearchBudget(_Section):
    """How long a search on validation runs."""

    n_trials: PositiveInt | None = Field(20, description="Trials per searched model (null with a timeout: time only).")
    timeout: Annotated[float, Field(gt=0)] | None = Field(None, description="Seconds per searched model.")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="Stops unpromising trials of models trained by the neural trainer early.")
    batch: PositiveInt = Field(1, description="Proposals run together on the workers (non-neural models).")

    @model_validator(mode="after")
    def _a_budget(self) -> SearchBudget:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("search.n_trials may be null only with a search.timeout")
        return self


class ModelSpec(_Section):
    """One model of an experiment (a bare name is a model with its defaults)."""

    name: str = Field(description="A registry name (`recforge models` lists them).")
    params: dict[str, Any] = Field(default_factory=dict, description="Fixed constructor parameters.")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="Values per parameter; every combination is a trial, the best on "
        "validation (select_metric) is kept.")
    label: str | None = Field(None, description="The model's name in tables (default: name).")
    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="An Optuna search space instead of a grid: {param: {low, high[, log, "
        "int]}} or {param: {choices: [...]}}; searched within `search`'s budget.")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, raw: Any) -> Any:
        return {"name": raw} if isinstance(raw, str) else raw

    @field_validator("space")
    @classmethod
    def _dimensions(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for pname, dist in space.items():
            if not ({"low", "high"} <= set(dist) or "choices" in dist):
                raise ValueError(f"space.{pname} needs low and high (optional log, int) or choices")
        return space

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.space and self.grid:
            raise ValueError("has both a grid and a search space; give one")
        self.check()
        return self

    def combinations(self) -> list[dict[str, Any]]:
        """Every parameter set of the grid laid over ``params`` (one set without a grid)."""
        keys = sorted(self.grid)
        values = [self.grid[k] for k in keys]
        return [{**self.params, **dict(zip(keys, combo))} for combo in itertools.product(*values)] or [dict(self.params)]

    def check(self) -> None:
        """Fail early, before any data is read: an unknown model, unknown parameter names (grid and search space
        included) or a fixed value a parameter does not accept."""
        cls = get_model_class(self.name)
        cls.check_param_names({**self.params, **{k: None for k in self.grid}, **{k: None for k in self.space}})
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


def _dataset_kind(raw: Any) -> str:
    """The dataset union's member: also called on the validated value when the config is written."""
    if isinstance(raw, NamedDataset):
        return "named"
    if isinstance(raw, dict):
        return "named" if "name" in raw else "files"
    return "name" if isinstance(raw, str) else "files"  # anything else fails as split files, naming the keys


DatasetField = Annotated[
    Annotated[str, Tag("name")] | Annotated[NamedDataset, Tag("named")] | Annotated[SplitFiles, Tag("files")],
    Discriminator(_dataset_kind),
]


class ExperimentConfig(_Section):
    """An experiment: dataset (+ filters) → split protocol → models (grids or searches) → metrics."""

    name: str = Field(min_length=1, description="The experiment's name (results go to results/<name>).")
    dataset: DatasetField = Field(
        description="A dataset name or path, {name, options} (e.g. synthetic with generator options), or split "
        "files {train, test[, valid, items, users, columns]}.")
    models: list[ModelSpec] = Field(min_length=1, description="The models: names or {name, params, grid|space, "
                                    "label}.")
    protocol: str = Field("loo", description="A split protocol (`recforge protocols` lists them).")
    filters: dict[str, Any] = Field(
        default_factory=dict, description=f"Applied in the order given, e.g. {{k_core: 5}}; one of {list(FILTERS)}.")
    k: list[PositiveInt] | None = Field(None, description="List lengths (default: the protocol's).")
    metrics: list[str] | None = Field(None, description="Leaderboard columns (default: the protocol's).")
    select_metric: str = Field("ndcg@10", description="What grids and searches are tuned on (validation part).")
    seed: StrictInt = Field(0, description="Seeds the split, the models and the search.")
    workers: PositiveInt = Field(1, description="Trials run in parallel.")
    search: SearchBudget = Field(default_factory=SearchBudget, description="The budget of each search.")
    validation: Literal["refit", "warm", "reuse", "off"] = Field(
        "refit", description="How models that tune themselves on validation (early stopping, blend weights) are "
        "tested: refit (on train + validation from scratch with what was chosen), warm (continued for a tenth of "
        "their epochs; others refitted), reuse (the model fitted on train, validation events added to its "
        "histories) or off (fitted on train + validation without validation).")
    rank_rating_models: StrictBool = Field(
        False, description="Also rank rating models in the top-N leaderboard (default: their own RMSE table).")
    exclude_seen: StrictBool = Field(True, description="Rankings leave out each user's training items.")
    tune: StrictBool = Field(
        False, description="Models without a grid or space have their key parameters searched on validation in "
        "their own search space, their defaults tried first.")

    @field_validator("validation", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @field_validator("k", mode="before")
    @classmethod
    def _one_k(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, filters: dict[str, Any]) -> dict[str, Any]:
        for name in filters:
            if name not in FILTERS:
                raise ValueError(f"unknown filter {name!r}; available filters: {list(FILTERS)}")
        return filters

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        labels = [m.display for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two models share a label {labels}; give one of them a 'label'")
        protocol = get_protocol(self.protocol)
        self.protocol = protocol.name
        if self.k is None:
            self.k = list(protocol.ks)
        if isinstance(self.dataset, SplitFiles) and self.filters:
            raise ValueError("split files are used as they are: give no 'filters'")
        at = self.select_metric.partition("@")[2]
        if (self.tune or any(m.tuned for m in self.models)) and at and (not at.isdigit() or int(at) not in self.k):
            raise ValueError(f"select_metric {self.select_metric!r} needs its cut-off in k, but k is {self.k}")
        return self

    def wants_validation(self) -> bool:
        """Whether a validation part is used: some model is tuned (a grid, a search space, ``tune``) or tunes
        itself while it trains (early stopping), and ``validation`` is not ``off``."""
        if self.validation == "off":
            return False
        return self.tune or any(m.tuned or get_model_class(m.name).supports_validation for m in self.models)

    @classmethod
    def from_dict(cls, raw: Any) -> ExperimentConfig:
        """Validate a plain dict (as read from a file); the first problem raises one :class:`DataError` line naming
        the field (errors of the model registry and of model parameters keep their own type)."""
        if not isinstance(raw, dict):
            raise DataError(f"an experiment config must be a mapping, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise _one_line(exc) from None

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
        """A JSON-ready dict (unset optional fields left out) that :meth:`from_dict` reads back to an equal config."""
        return self.model_dump(exclude_none=True)


def _where(loc: tuple[int | str, ...]) -> str:
    """``('models', 1, 'grid', 'reg')`` → ``models[1].grid.reg`` (the dataset's union tags left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("name", "named", "files") or not out.endswith("dataset"):
            out += f".{part}" if out else str(part)
    return out


def _one_line(exc: ValidationError) -> RecforgeError:
    """The first error of a validation as one line: ``models[1].grid.reg: input should be a valid list, got 3``.
    A recforge error raised inside (a model's parameter check) comes back as it was."""
    first = exc.errors()[0]
    where = _where(first["loc"])
    inner = (first.get("ctx") or {}).get("error")
    if isinstance(inner, RecforgeError):
        return inner
    if first["type"] == "extra_forbidden":
        return DataError(f"experiment config has unknown field {where!r}")
    if first["type"] == "missing":
        return DataError(f"experiment config needs a {where!r} field")
    if inner is not None:
        message = str(inner)
    elif first["type"] == "too_short" and (first.get("ctx") or {}).get("min_length") == 1:
        message = f"must be a non-empty list, got {first['input']!r}"
    else:  # pydantic's words, as a continuation of the field's name
        message = f"{first['msg'].replace('Input should be', 'must be')}, got {first['input']!r}"
    return DataError(f"experiment config: {where}: {message}" if where else f"experiment config: {message}")


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: ``list[int] | null``."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(annotation.model_fields) + "}"
    return {Any: "any", str: "string", int: "int", float: "number", bool: "bool"}.get(annotation, str(annotation))


def config_reference() -> str:
    """Every field of an experiment config with its type, default and meaning (``recforge run --help-config``)."""
    lines = ["An experiment config (YAML, TOML or JSON); unknown fields are errors.", ""]
    sections: list[tuple[str, type[BaseModel]]] = [
        ("", ExperimentConfig), ("models[]", ModelSpec), ("dataset (named)", NamedDataset),
        ("dataset (split files)", SplitFiles), ("search", SearchBudget)]
    for title, model in sections:
        if title:
            lines += ["", f"{title}: {model.__doc__.splitlines()[0] if model.__doc__ else ''}"]
        for fname, info in model.model_fields.items():
            if info.is_required():
                default = "required"
            else:
                value = info.get_default(call_default_factory=True)
                value = value.model_dump() if isinstance(value, BaseModel) else value
                default = f"default {json.dumps(value)}"
            lines.append(f"  {fname}: {_type_name(info.annotation)}  ({default})")
            lines += textwrap.wrap(info.description or "", 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
