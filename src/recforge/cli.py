"""The ``recforge`` command line: a thin layer over the Python API.

Every command maps onto public functions (datasets.load, protocols, create_model, the fitting pipeline of
``recforge.experiments``); errors that recforge raises on purpose are printed as one line and exit with status 2.
Commands import what they need when they run, so ``recforge --help`` answers without loading torch.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import numbers
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from recforge import __version__
from recforge.core.gpu_environment import DEVICE_ENV, fix_cublas_workspace
from recforge.core.params import DEVICE_NAMES, device_name
from recforge.errors import DataError, RecforgeError, settings_named_as_options

app = typer.Typer(
    name="recforge",
    help="Build, evaluate and compare recommender systems.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="List, describe and fetch datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

DEFAULT_DATASET = "ml-latest-small"
DEFAULT_MODELS = "random,pop,itemknn,ease,als,bpr,funksvd"

DatasetOpt = Annotated[
    str, typer.Option("--dataset", "-d", help="Dataset name (see `recforge datasets list`) or path to a folder/file.")
]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (see `recforge models`).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Model parameter as name=value; repeatable.")
]
KOpt = Annotated[list[int], typer.Option("--k", "-k", min=1, help="List length(s) for top-k metrics; repeatable.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for splits and models.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (bars in a terminal, a line per stage elsewhere).")]


def _set_device(value: str | None) -> str | None:
    """Make ``value`` the device of every model left at ``device="auto"``, in this process and the workers and
    ranks it starts (through ``RECFORGE_DEVICE``); checked first, so a typo or a missing GPU is one line."""
    if value is not None:
        from recforge.core.device import resolve_device

        try:
            resolve_device(value)
        except RecforgeError as exc:
            raise typer.BadParameter(str(exc)) from None
        os.environ[DEVICE_ENV] = value
    return value


DeviceOpt = Annotated[str | None, typer.Option(
    "--device", callback=_set_device, help="auto, cpu, cuda or cuda:N for every model left at device=auto "
    "(default: $RECFORGE_DEVICE, else CUDA when present).")]
_COLUMNS = "Columns of a data file"
UserColOpt = Annotated[str | None, typer.Option("--user-col", help="User ids (default: user_id).",
                                                rich_help_panel=_COLUMNS)]
ItemColOpt = Annotated[str | None, typer.Option("--item-col", help="Item ids (default: item_id).",
                                                rich_help_panel=_COLUMNS)]
RatingColOpt = Annotated[str | None, typer.Option("--rating-col", help="Ratings (default: rating, when present).",
                                                  rich_help_panel=_COLUMNS)]
TimeColOpt = Annotated[str | None, typer.Option("--time-col", help="Timestamps (default: timestamp, when present).",
                                                rich_help_panel=_COLUMNS)]
SepOpt = Annotated[str | None, typer.Option("--sep", help="Field separator of a CSV or TSV file (default: from the "
                                            "extension).", rich_help_panel=_COLUMNS)]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"recforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _columns(user_col: str | None, item_col: str | None, rating_col: str | None, time_col: str | None,
             sep: str | None) -> dict[str, str]:
    """The column options given, as the arguments of :func:`recforge.datasets.load` for a data file."""
    given = {"user_col": user_col, "item_col": item_col, "rating_col": rating_col, "timestamp_col": time_col,
             "sep": sep}
    return {key: value for key, value in given.items() if value is not None}


def _load(dataset: str, columns: dict[str, str] | None = None) -> Any:
    from recforge.data.datasets import load

    return load(dataset, **(columns or {}))


def _model(name: str, assignments: list[str] | None, quiet: bool = False) -> Any:
    """Build a registered model from ``--set name=value`` pairs; ``quiet`` turns its training bars off."""
    from recforge.models import create_model, get_model_class, parse_params

    params = parse_params(assignments or [])
    if quiet and "progress" in get_model_class(name)._param_names():
        params.setdefault("progress", False)
    return create_model(name, **params)


def _echo_json(obj: Any) -> None:
    """Print ``obj`` as strict JSON: NaN and infinities (which JSON cannot hold) become null, with a warning
    naming where."""
    bad: list[str] = []
    typer.echo(json.dumps(_finite(obj, "", bad), indent=None, sort_keys=True, default=float, allow_nan=False))
    if bad:
        logging.getLogger("recforge").warning("not a finite number, printed as null: %s%s", ", ".join(bad[:5]),
                                              f" and {len(bad) - 5} more" if len(bad) > 5 else "")


def _finite(obj: Any, where: str, bad: list[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v, f"{where}[{i}]", bad) for i, v in enumerate(obj)]
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        if not math.isfinite(obj):
            bad.append(where)
            return None
        return float(obj)
    return obj


# ---------------------------------------------------------------------------------------------- datasets
@datasets_app.command("list")
def datasets_list() -> None:
    """List the known datasets."""
    from rich.console import Console
    from rich.table import Table

    from recforge.data.datasets import list_datasets

    table = list_datasets()[["name", "source", "size", "description"]]
    rt = Table()
    for col in table.columns:
        rt.add_column(str(col))
    for _, row in table.iterrows():
        rt.add_row(*(str(v) for v in row))
    Console().print(rt)


@datasets_app.command("describe")
def datasets_describe(
    name: Annotated[str, typer.Argument(help="Dataset name or path.")] = DEFAULT_DATASET,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    rating_col: RatingColOpt = None,
    time_col: TimeColOpt = None,
    sep: SepOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe a dataset: counts, density, rating and time ranges."""
    from recforge.data.datasets import describe_dataset

    columns = _columns(user_col, item_col, rating_col, time_col, sep)
    info = describe_dataset(_load(name, columns) if columns else name)
    if as_json:
        _echo_json(info)
    else:
        for key, value in info.items():
            typer.echo(f"{key:>24}: {_readable(key, value)}")


def _readable(key: str, value: Any) -> str:
    """A ``describe`` value for people: dates for unix times, shares in percent, four significant digits."""
    import datetime as dt

    if key.startswith("time_") and isinstance(value, numbers.Real) and math.isfinite(value):
        return dt.datetime.fromtimestamp(float(value), dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if key in ("density", "repeat_share") and isinstance(value, numbers.Real):
        return f"{100 * value:.3g}%"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "-"
    return str(value)


@datasets_app.command("fetch")
def datasets_fetch(
    name: Annotated[str, typer.Argument(help="Dataset to download, e.g. ml-1m.")],
    cache_dir: Annotated[Path | None, typer.Option(help="Where to keep downloads.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Download a dataset from its official source into the cache (checksum verified)."""
    from recforge.data.datasets import fetch

    typer.echo(str(fetch(name, cache_dir=cache_dir, progress=not quiet)))


@app.command("models")
def models_list(
    name: Annotated[str | None, typer.Argument(help="A model: its description, parameters with their defaults, "
                                                    "and what tuning searches.")] = None,
) -> None:
    """List the models (kind, what each learns from, what it is), or describe one."""
    import inspect

    from recforge.models import available_models, get_model_class

    if name is None:
        for model in available_models():
            cls = get_model_class(model)
            kind = "rating" if cls.predicts_ratings else "top-n"
            typer.echo(f"{model:<11} {kind:<7} {cls.learns:<8} {_first_sentence(cls.__doc__)}")
        typer.echo("\n`recforge models NAME` lists a model's parameters and defaults.")
        return
    cls = get_model_class(name)
    doc = inspect.getdoc(cls) or ""
    summary = " ".join(doc.split("\n\n")[0].replace("``", "").split())
    typer.echo(f"{cls.name} ({cls.__name__}, {'rating' if cls.predicts_ratings else 'top-n'}, learns from "
               f"{cls.learns}): {summary}\n")
    for param, default in cls.default_params().items():
        searched = " (tuned)" if param in cls.search_space else ""
        typer.echo(f"  {param:<20} {default!r}{searched}")


def _first_sentence(doc: str | None, width: int = 70) -> str:
    """A docstring's first sentence, without reST markup, cut at a word to ``width`` characters."""
    text = " ".join((doc or "").replace("``", "").split())
    end = text.find(". ")
    text = text if end < 0 else text[:end + 1]
    return text if len(text) <= width else text[:width - 1].rsplit(" ", 1)[0] + "…"


# ---------------------------------------------------------------------------------------------- split
@app.command("split")
def split_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for train/valid/test files.")],
    dataset: DatasetOpt = DEFAULT_DATASET,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    rating_col: RatingColOpt = None,
    time_col: TimeColOpt = None,
    sep: SepOpt = None,
    protocol: Annotated[str, typer.Option(help="A protocol of the registry (see `recforge protocols`).")] = "loo",
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet.")] = "csv",
    seed: SeedOpt = 0,
) -> None:
    """Split a dataset and write train/valid/test files with the original ids."""
    from recforge.data.io import write_table
    from recforge.evaluation import get_protocol

    if fmt not in ("csv", "parquet"):
        raise typer.BadParameter("--format must be csv or parquet")
    columns = _columns(user_col, item_col, rating_col, time_col, sep)
    splits = get_protocol(protocol).splits(_load(dataset, columns) if columns else dataset, seed=seed)
    for split in splits:
        folder = out if len(splits) == 1 else out / split.name
        for part in ("train", "valid", "test", "history"):
            inter = getattr(split, part)
            if inter is not None:
                path = write_table(inter.to_frame(), folder / f"{part}.{fmt}")
                typer.echo(f"{part:>7}: {len(inter):>9,} rows, {inter.describe().get('repeat_share', 0.0):.1%} "
                           f"repeated user-item pairs -> {path}")
        typer.echo(f"{100 * split.seen_test_share():.1f}% of the test rows are items their user had before the test "
                   "(excluded from rankings by default; compare --no-exclude-seen counts them)")


# ---------------------------------------------------------------------------------------------- train
@app.command("train")
def train_cmd(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to write.")],
    dataset: DatasetOpt = DEFAULT_DATASET,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    rating_col: RatingColOpt = None,
    time_col: TimeColOpt = None,
    sep: SepOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Fit a model on a whole dataset and save it as an artifact (safetensors + JSON, no pickle). Under torchrun,
    neural models train data-parallel over the processes (one per GPU, or gloo on CPUs) and rank 0 saves."""
    from recforge.neural.distributed import is_main_process

    inter = _load(dataset, _columns(user_col, item_col, rating_col, time_col, sep))
    est = _model(model, set_, quiet).fit(inter)
    if is_main_process():  # under torchrun every rank trains its share; rank 0 saves
        est.save(out)
        typer.echo(f"trained {est!r} on {len(inter):,} interactions in {est.fit_seconds_:.2f}s -> {out}")


# ---------------------------------------------------------------------------------------------- evaluate
ValidationOpt = Annotated[str, typer.Option(
    help="Models that tune themselves on validation (early stopping, blend weights) are fitted on train with it, "
    "then: warm (continued on train + validation for a tenth of their epochs), refit (refitted on train + "
    "validation from scratch with what they chose), reuse (tested as they are); off: every model fitted on "
    "train + validation as configured.")]
WorkersOpt = Annotated[int, typer.Option(help="Trials in parallel (process pool or Ray); models are searched side by side.")]
TuneOpt = Annotated[bool, typer.Option(
    help="Tune each model's key parameters on validation (carved from TRAIN for files without --valid), its "
    "defaults tried first; --no-tune keeps the given parameters.")]
TuneBudgetOpt = Annotated[str, typer.Option(
    help="Tuning budget per model: trials (8) or seconds (90s, 2m).")]


def _tune_budget(text: str) -> tuple[int | None, float | None]:
    """``--tune-budget``: ``N`` trials, or ``Ns`` / ``Nm`` seconds / minutes (trials then unbounded)."""
    from recforge.errors import ParameterError

    raw = text.strip().lower()
    unit = {"s": 1.0, "m": 60.0}.get(raw[-1:]) if raw else None
    number = raw[:-1] if unit else raw
    try:
        value = float(number) if unit else int(number)
    except ValueError:
        value = 0
    if not value > 0:
        raise ParameterError(f"--tune-budget must be a number of trials (8) or of seconds (90s, 2m), got {text!r}")
    return (None, float(value) * unit) if unit else (int(value), None)
BackendOpt = Annotated[str, typer.Option(help="auto, serial, process or ray (with --workers > 1).")]


def _model_params(assignments: list[str] | None, names: list[str]) -> dict[str, dict[str, Any]]:
    """``--set MODEL.PARAM=VALUE`` pairs as parameters per model (``--set PARAM=VALUE`` with a single model)."""
    from recforge.errors import ParameterError
    from recforge.models import parse_params

    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_params(assignments or []).items():
        model, dot, param = key.rpartition(".")
        if not dot:
            if len(names) != 1:
                raise ParameterError(f"--set {key}=...: name the model, as in ease.reg=300")
            model, param = names[0], key
        if model not in names:
            raise ParameterError(f"--set {key}=...: {model!r} is not among the models {names}")
        out.setdefault(model, {})[param] = value
    return out


def _split_files(columns: dict[str, str], **files: Path | None) -> dict[str, Any] | None:
    """The split files given on the command line as a dataset (None without --train), with their columns."""
    given: dict[str, Any] = {part: str(path) for part, path in files.items() if path is not None}
    if columns:
        given["columns"] = columns
    return given if "train" in given else None


def _with_columns(dataset: str, columns: dict[str, str]) -> str | dict[str, Any]:
    """A dataset name or path, with the column options when there are any (as the pipeline's config takes it)."""
    return {"name": dataset, "options": columns} if columns else dataset


@app.command("evaluate")
def evaluate_cmd(
    model: ModelOpt,
    train: Annotated[Path | None, typer.Option(help="Training file (CSV/Parquet: user_id,item_id[,rating,timestamp]).")] = None,
    test: Annotated[Path | None, typer.Option(help="Test file with the same columns.")] = None,
    valid: Annotated[
        Path | None, typer.Option(help="Validation file: what models tune themselves on (epochs, weights).")
    ] = None,
    items: Annotated[Path | None, typer.Option(help="Item side data (item_id, title, genres, ...) for the files.")] = None,
    users: Annotated[Path | None, typer.Option(help="User side data (user_id, features) for the files.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset to split instead of files.")] = None,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    rating_col: RatingColOpt = None,
    time_col: TimeColOpt = None,
    sep: SepOpt = None,
    protocol: Annotated[str, typer.Option(
        help="A protocol of the registry (see `recforge protocols`); with --train/--test files it only says how to "
        "score (e.g. next-event: every TEST row a sample with all earlier events as history).")] = "loo",
    set_: SetOpt = None,
    k: Annotated[list[int] | None, typer.Option("--k", "-k", min=1, help="List length(s); repeatable (default: the "
                                                "protocol's).")] = None,
    exclude_seen: Annotated[bool, typer.Option(help="Exclude each user's training items.")] = True,
    validation: ValidationOpt = "warm",
    tune: TuneOpt = True,
    tune_budget: TuneBudgetOpt = "8",
    rank_rating_models: Annotated[bool, typer.Option(
        help="For a rating model, also report top-N ranking metrics (every test row counted as relevant, "
        "whatever its rating).")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Keep the trials in this folder (resumable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with lower-case metric names.")] = False,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Fit, tune and test one model through the fitting pipeline, on TRAIN/TEST files made elsewhere or on a
    dataset split here, and report its metrics (and the parameters it was tested with)."""
    from recforge.errors import DataError
    from recforge.evaluation.protocols import RATING_METRICS
    from recforge.experiments import compare

    if (train is None) != (test is None):
        raise DataError("give both --train and --test, or neither (then --dataset and --protocol)")
    if train is None and (valid or items or users):
        raise DataError("--valid, --items and --users go with --train/--test files")
    columns = _columns(user_col, item_col, rating_col, time_col, sep)
    data: Any = _split_files(columns, train=train, valid=valid, test=test, items=items, users=users) or (
        _with_columns(dataset or DEFAULT_DATASET, columns))
    params = _model_params(set_, [model])
    trials, seconds = _tune_budget(tune_budget)
    result = compare(data, {model: {"name": model, "params": params.get(model, {})}}, protocol=protocol, k=k,
                     seed=seed, progress=not quiet, out=out, validation=validation,
                     exclude_seen=exclude_seen, name="evaluate", tune=tune, tune_trials=trials,
                     tune_seconds=seconds, rank_rating_models=rank_rating_models)
    if model in result.skipped:
        raise DataError(f"{model} could not be evaluated: {result.skipped[model]}")
    summary = dict(result.results[model].summary)
    if "rmse" in summary and not rank_rating_models:  # a rating model is judged by its ratings, errors first
        summary = {key: summary[key] for key in (*RATING_METRICS, "users", "fit_seconds") if key in summary}
    if as_json:
        _echo_json({**summary, "params": result.params[model], **({"notes": result.notes} if result.notes else {})})
    else:
        for key in summary if "rmse" in summary and not rank_rating_models else sorted(summary):
            typer.echo(f"{key:>14}: {summary[key]:.4f}")
        typer.echo(f"{'params':>14}: {json.dumps(result.params[model], sort_keys=True, default=str)}")
        for key, value in result.notes.items():
            typer.echo(f"{key:>14}: {value}")


# ---------------------------------------------------------------------------------------------- recommend
@app.command("recommend")
def recommend_cmd(
    artifact: Annotated[Path, typer.Argument(help="Model artifact folder written by `recforge train`.")],
    user: Annotated[list[str] | None, typer.Option("--user", "-u", help="User id; repeatable.")] = None,
    users_file: Annotated[Path | None, typer.Option(help="File with a user_id column (or one id per line).")] = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Number of items per user.")] = 10,
    include_seen: Annotated[bool, typer.Option(help="Allow items the user already has.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
    on_unknown: Annotated[str, typer.Option(help="Users the model never saw: raise (an error), warn (skip them "
                                            "with a warning) or ignore (skip them).")] = "raise",
) -> None:
    """Top-k recommendations from a saved model, in the original ids, with titles when known."""
    import numpy as np

    from recforge.data.io import read_table
    from recforge.errors import DataError
    from recforge.models import Recommender

    est = Recommender.load(artifact)
    ids: list[Any] = list(user or [])
    if users_file is not None:
        if users_file.suffix.lower() in (".csv", ".tsv", ".parquet", ".jsonl"):
            table = read_table(users_file)
            if "user_id" not in table.columns:
                raise DataError(f"{users_file} has no user_id column")
            ids += table["user_id"].tolist()
        else:
            if not users_file.exists():
                raise DataError(f"file not found: {str(users_file)!r}")
            ids += [line.strip() for line in users_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError("give at least one --user or a --users-file")
    ids = _typed_ids([str(x) for x in ids], est.user_map_, "user")
    if on_unknown not in ("raise", "warn", "ignore"):
        raise typer.BadParameter(f"{on_unknown!r}: give raise, warn or ignore", param_hint="--on-unknown")
    recs = est.recommend(np.asarray(ids), k=k, exclude_seen=not include_seen, with_titles=True,
                         on_unknown=on_unknown)  # type: ignore[arg-type]
    _write_frame(recs, fmt, out, "recommendations")


def _write_frame(frame: Any, fmt: str, out: Path | None, what: str) -> None:
    """Print a result frame as a table, CSV or JSON lines, or write it atomically to ``out``."""
    from recforge.data.io import atomic_path
    from recforge.errors import DataError

    if fmt == "csv":
        text = frame.to_csv(index=False)
    elif fmt == "json":
        text = frame.to_json(orient="records", lines=True)
    elif fmt == "table":
        text = frame.to_string(index=False) + "\n"
    else:
        raise DataError(f"--format must be table, csv or json, not {fmt!r}")
    if out is None:
        typer.echo(text, nl=False)
    else:
        with atomic_path(out) as tmp:
            tmp.write_text(text)
        typer.echo(f"{len(frame)} {what} -> {out}")


def _typed_ids(values: list[str], id_map: Any, what: str) -> list[Any]:
    from recforge.errors import DataError

    if id_map.is_string:
        return list(values)
    try:
        return [int(x) for x in values]
    except ValueError:
        raise DataError(f"this model's {what} ids are integers; got a non-integer id") from None


@app.command("similar")
def similar_cmd(
    artifact: Annotated[Path, typer.Argument(help="Model artifact folder written by `recforge train`.")],
    item: Annotated[list[str], typer.Option("--item", "-i", help="Item id; repeatable.")],
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Number of similar items per item.")] = 10,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """"More like this": the k most similar items of each item (content, item-kNN, factor and two-tower models)."""
    import numpy as np

    from recforge.models import Recommender

    est = Recommender.load(artifact)
    ids = _typed_ids(item, est.item_map_, "item")
    _write_frame(est.similar_items(np.asarray(ids), k=k, with_titles=True), fmt, out, "similar items")


# ---------------------------------------------------------------------------------------------- compare
def _print_tables(result: Any, title: str, protocol: str) -> None:
    """The leaderboard and the rating table, each model beside what it learns from, the protocol explained."""
    from recforge.evaluation import get_protocol, print_leaderboard
    from recforge.models import get_model_class

    kinds = {label: get_model_class(trials[0].model).learns for label, trials in result.trials.items() if trials}
    note = get_protocol(protocol).description
    if len(result.leaderboard):
        print_leaderboard(result.leaderboard, title=title, kinds=kinds, note=note)
    if result.ratings is not None:
        print_leaderboard(result.ratings, title=f"{title} · rating models", kinds=kinds,
                          note=None if len(result.leaderboard) else note)


def _winner(result: Any, dataset: str, folder: Path, columns: dict[str, str]) -> None:
    """The best model of the leaderboard fitted on the whole dataset with the parameters it was tested with, saved
    as ``FOLDER/winner``, its top 5 for one user, and the commands to go on with. Models trained by the neural
    trainer are not refitted here (minutes on a CPU): the command to train one is printed instead."""
    import time

    from recforge.models import create_model, get_model_class

    table = result.leaderboard if len(result.leaderboard) else result.ratings
    if table is None or not len(table) or not result.trials.get(str(table.loc[0, "model"])):
        return
    label = str(table.loc[0, "model"])
    name = result.trials[label][0].model
    cls = get_model_class(name)
    defaults = cls.default_params()
    changed = {k: v for k, v in result.params.get(label, {}).items() if k != "progress" and defaults.get(k) != v}
    sets = "".join(f" --set {k}={json.dumps(v)}" for k, v in sorted(changed.items()))
    if cls.uses_trainer:
        typer.echo(f"next: recforge train --model {name} -d {dataset}{sets} --out artifacts/{name}")
        return
    data = _load(dataset, columns)
    started = time.perf_counter()
    model = create_model(name, **{**changed, **({"progress": False} if "progress" in defaults else {})})
    model.fit(data)
    path = model.save(folder / "winner")
    user = data.user_map.ids[0]
    typer.echo(f"\nwinner: {label}, refitted on all of {dataset} in {time.perf_counter() - started:.1f} s and "
               f"saved; its top 5 for user {user}:")
    typer.echo(model.recommend([user], k=5, with_titles=True).to_string(index=False))
    typer.echo(f"next: recforge recommend {path} --user {user}   |   recforge serve {path}")


def _records(table: Any) -> list[dict[str, Any]] | None:
    return None if table is None else json.loads(table.to_json(orient="records"))


def _default_compare_folder(dataset: str, protocol: str, k: int | None, seed: int, validation: str,
                            exclude_seen: bool = True, dedupe: str | None = None, metric: str | None = None) -> Path:
    """results/compare/<dataset>-<protocol>[-k<k>][-seed<seed>][-<validation>][-seen][-dedupe<policy>][-by-<metric>]:
    the name of an experiment's runs (a second run gets ``-2``, see :func:`_run_folder`)."""
    from recforge.evaluation import get_protocol
    from recforge.experiments.compare import dataset_slug

    parts = [dataset_slug(dataset), get_protocol(protocol).name]
    parts += [f"k{k}"] if k is not None else []
    parts += [f"seed{seed}"] if seed else []
    parts += [validation] if validation != "warm" else []
    parts += [] if exclude_seen else ["seen"]
    parts += [f"dedupe{dedupe}"] if dedupe else []
    parts += [f"by-{metric}"] if metric else []
    return Path("results") / "compare" / "-".join(parts)


def _run_folder(out: Path | None, default: Path, resume: bool, overwrite: bool) -> Path:
    """Where a compare writes: ``--out``, refused when it holds results unless resumed or overwritten; without
    ``--out`` a new run of the default name (``name``, ``name-2``, ...), or its latest run with ``--resume`` /
    ``--overwrite``. Only a results folder (one with a ``config.json``) is ever deleted."""
    if resume and overwrite:
        raise typer.BadParameter("give --resume or --overwrite, not both", param_hint="--overwrite")

    def used(folder: Path) -> bool:
        return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))

    if out is None:
        def run(i: int) -> Path:
            return default if i == 1 else default.with_name(f"{default.name}-{i}")

        n_used = sum(1 for _ in itertools.takewhile(used, map(run, itertools.count(1))))
        if not n_used or not (resume or overwrite):
            return run(n_used + 1)
        out = run(n_used)
    if used(out) and not resume:
        if not overwrite:
            raise typer.BadParameter(f"{str(out)!r} holds an earlier run: --resume adds to it, --overwrite "
                                     "replaces it, or give another --out", param_hint="--out")
        if not (out / "config.json").is_file():
            raise typer.BadParameter(f"{str(out)!r} is not a results folder (no config.json); --overwrite "
                                     "deletes only results", param_hint="--out")
        shutil.rmtree(out)
    return out


@app.command("compare")
def compare_cmd(
    dataset: DatasetOpt = DEFAULT_DATASET,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    rating_col: RatingColOpt = None,
    time_col: TimeColOpt = None,
    sep: SepOpt = None,
    models: Annotated[str, typer.Option(help="Comma-separated model names.")] = DEFAULT_MODELS,
    protocol: Annotated[str, typer.Option(help="A protocol of the registry (see `recforge protocols`): loo, "
                                          "random, temporal, cold-items, folds, next-event, sequence-mrr, ...")] = "loo",
    k: Annotated[int | None, typer.Option("--k", "-k", min=1, help="List length for the metrics (default: the "
                                          "protocol's).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Model parameter as MODEL.PARAM=VALUE; "
                                                   "repeatable.")] = None,
    metrics: Annotated[str | None, typer.Option(help="Comma-separated leaderboard columns (every model in one "
                                                "table).")] = None,
    metric: Annotated[str | None, typer.Option(help="Sort the leaderboard by this metric, and tune on it "
                                               "(default: the protocol's first, e.g. ndcg@10).")] = None,
    validation: ValidationOpt = "warm",
    tune: TuneOpt = True,
    tune_budget: TuneBudgetOpt = "8",
    rank_rating_models: Annotated[bool, typer.Option(help="Rank rating models in the top-N leaderboard too.")] = False,
    exclude_seen: Annotated[bool, typer.Option(help="Leave each user's earlier items out of the rankings (--no-"
                                               "exclude-seen counts re-consumption).")] = True,
    dedupe: Annotated[str | None, typer.Option(help="Keep one event per user-item pair before splitting: first, "
                                               "last, sum or mean (of the ratings or weights).")] = None,
    workers: WorkersOpt = 1,
    backend: BackendOpt = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Results folder (default: a new run in "
                                             "results/compare/<dataset>-<protocol>[-N]).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out (default: the latest run): "
                                         "its finished trials are kept.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out (default: the latest "
                                            "run).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the tables as JSON.")] = False,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Fit, tune and test several models on the same split(s) and print a leaderboard with 95% CIs (rating
    models in a separate rating table); every trial is saved, and --resume continues an interrupted run."""
    from recforge.experiments import compare

    names = [m.strip() for m in models.split(",") if m.strip()]
    default = _default_compare_folder(dataset, protocol, k, seed, validation, exclude_seen, dedupe, metric)
    folder = _run_folder(out, default, resume, overwrite)
    trials, seconds = _tune_budget(tune_budget)
    columns = _columns(user_col, item_col, rating_col, time_col, sep)
    result = compare(_with_columns(dataset, columns), names, protocol=protocol, k=k, seed=seed,
                     params=_model_params(set_, names),
                     metrics=[m.strip() for m in metrics.split(",")] if metrics else None,
                     progress=not quiet, out=folder, workers=workers, backend=backend,
                     validation=validation, rank_rating_models=rank_rating_models, tune=tune,
                     tune_trials=trials, tune_seconds=seconds, exclude_seen=exclude_seen, dedupe=dedupe,
                     metric=metric)
    if as_json:
        _echo_json({"leaderboard": _records(result.leaderboard), "ratings": _records(result.ratings),
                    "params": result.params, "skipped": result.skipped, "out": str(folder)})
        return
    _print_tables(result, f"{dataset} · {result.leaderboard.attrs.get('title', protocol)}", protocol)
    if tune:
        typer.echo("parameters chosen on validation (selected_params.json):")
        for label, chosen in result.params.items():
            shown = {k: v for k, v in chosen.items() if k != "progress"}
            typer.echo(f"  {label}: {json.dumps(shown, sort_keys=True, default=str)}")
    for key, value in result.notes.items():
        typer.echo(f"{key}: {value}")
    typer.echo(f"saved: {folder}")
    _winner(result, dataset, folder, columns)


# ---------------------------------------------------------------------------------------------- run
def _print_config_reference(value: bool) -> None:
    if value:
        from recforge.experiments.config import config_reference

        typer.echo(config_reference())
        raise typer.Exit()


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="Experiment config (.yaml, .toml or .json).")],
    help_config: Annotated[bool, typer.Option("--help-config", callback=_print_config_reference, is_eager=True,
                                              help="Describe every field of a config and exit.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Results folder (default: results/<name>).")] = None,
    workers: Annotated[int | None, typer.Option(help="Trials in parallel (default: the config's).")] = None,
    backend: Annotated[str, typer.Option(
        help="auto (Ray when installed and workers > 1, else a process pool), serial, process or ray.")] = "auto",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Run the trials on this Ray cluster ('auto', or ray://head:10001).")] = None,
    threads_per_worker: Annotated[int | None, typer.Option(
        help="BLAS/numba/torch threads per trial (default: all cores serially, 1 per worker).")] = None,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Run an experiment config: tuned on validation, refitted and tested, every trial saved, resumable; prints
    the leaderboard. Under torchrun, neural models train data-parallel across the processes and only rank 0
    writes."""
    from recforge.experiments import ExperimentConfig, run_experiment
    from recforge.neural.distributed import is_main_process

    cfg = ExperimentConfig.from_file(config)
    folder = out or Path("results") / cfg.name
    result = run_experiment(cfg, folder, workers=workers, progress=not quiet, backend=backend,
                            ray_address=ray_address, threads_per_worker=threads_per_worker)
    if is_main_process():
        _print_tables(result, result.leaderboard.attrs.get("title", cfg.name), cfg.protocol)
        typer.echo(f"results: {folder}")


@app.command("protocols")
def protocols_list() -> None:
    """List the evaluation protocols."""
    from recforge.evaluation import PROTOCOLS

    for name, proto in PROTOCOLS.items():
        typer.echo(f"{name:<13} {proto.description}")


# ---------------------------------------------------------------------------------------------- serve
@app.command("serve")
def serve_cmd(
    artifact: Annotated[Path, typer.Argument(help="Model artifact folder written by `recforge train`.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (each loads the model; feedback is shared).")] = 1,
    feedback_dir: Annotated[
        Path | None, typer.Option(help="Folder of the durable feedback log (default: ARTIFACT/feedback).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="RECFORGE_API_KEY",
                                 help="The write key: POST /feedback needs it in X-API-Key; it opens reads too.")
    ] = None,
    read_key: Annotated[
        str | None, typer.Option(envvar="RECFORGE_READ_KEY", help="A key that opens the read endpoints only.")
    ] = None,
    open_reads: Annotated[
        bool, typer.Option(help="Serve /recommend, /similar and /metrics without a key even when keys are set.")
    ] = False,
    allow_include_seen: Annotated[
        bool, typer.Option(help="Let clients pass exclude_seen=false (it lists a user's history).")
    ] = False,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes.")] = 1 << 20,
    max_id_length: Annotated[int, typer.Option(help="Longest string id a request may carry.")] = 64,
    max_new_users: Annotated[int, typer.Option(help="New users one feedback batch may introduce.")] = 1000,
    max_new_items: Annotated[int, typer.Option(help="New items one feedback batch may introduce.")] = 100,
    ann_min_items: Annotated[int | None, typer.Option(
        help="Catalogue size from which factor and two-tower models answer /recommend from an HNSW index "
        "(default: recforge.retrieval.ANN_MIN_ITEMS, 1,000,000).")
    ] = None,
    overload_seconds: Annotated[float, typer.Option(
        help="Load shedding: while the service runs this many seconds behind, GET /recommend answers 503 at once.")
    ] = 0.1,
    explore: Annotated[str, typer.Option(
        help="epsilon:E: GET /recommend shows a uniformly random slate with probability E and logs every answer, "
        "with its probabilities and a request_id that feedback can carry (recforge impressions exports the log for "
        "recforge ope); none: the top-k.")
    ] = "none",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
    device: DeviceOpt = None,
) -> None:
    """Serve a saved model over HTTP: /recommend, /similar, /feedback (durable), /health, /metrics, /docs."""
    import uvicorn

    from recforge.errors import DataError
    from recforge.models import Recommender
    from recforge.serve.app import ServeSettings
    from recforge.serve.events import Limits
    from recforge.serve.feedback import check_folder, default_feedback_dir
    from recforge.serve.impressions import parse_explore

    for name, value, low in (("--workers", workers, 1), ("--max-body", max_body, 1),
                             ("--max-id-length", max_id_length, 1), ("--max-new-users", max_new_users, 0),
                             ("--max-new-items", max_new_items, 0), ("--ann-min-items", 1 if ann_min_items is None else ann_min_items, 1)):
        if value < low:
            raise DataError(f"{name} must be at least {low}, got {value}")
    if not overload_seconds > 0:  # also refuses NaN
        raise DataError(f"--overload-seconds must be positive, got {overload_seconds}")
    parse_explore(explore)
    model = Recommender.load(artifact)  # fail here, with a one-line message, on a missing or corrupt artifact
    check_folder(feedback_dir or default_feedback_dir(artifact))
    settings = ServeSettings(
        feedback_dir=None if feedback_dir is None else str(feedback_dir), api_key=api_key, read_key=read_key,
        open_reads=open_reads, allow_include_seen=allow_include_seen, max_body_bytes=max_body,
        limits=Limits(max_id_length=max_id_length, max_new_users=max_new_users, max_new_items=max_new_items),
        overload_seconds=overload_seconds, explore=explore,
        **({} if ann_min_items is None else {"ann_min_items": ann_min_items}),
    )
    os.environ["RECFORGE_SERVE_ARTIFACT"] = str(artifact)
    os.environ.update(settings.to_env())
    typer.echo(f"serving {model.name} ({model.n_users_:,} users, {model.n_items_:,} items) on "
               f"http://{host}:{port} (docs: /docs)", err=True)
    metrics_dir = None
    if workers > 1:  # Prometheus multiprocess mode: each worker writes its series to files that /metrics merges
        metrics_dir = tempfile.mkdtemp(prefix="recforge-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("recforge.serve.app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, access_log=False)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command("impressions")
def impressions_cmd(
    feedback_dir: Annotated[Path, typer.Argument(help="The feedback folder of a service run with --explore "
                                                 "(default of recforge serve: <artifact>/feedback).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The logged-impression Parquet file to write.")],
) -> None:
    """Export an exploring service's impressions, joined with the feedback that carries their request ids, as a
    logged-impression table (docs/ope.md) for recforge ope."""
    from recforge.data.impressions import write_impressions
    from recforge.data.io import table_format
    from recforge.serve.impressions import impression_frame

    if table_format(out) != "parquet":
        raise DataError(f"--out: impression logs are Parquet files; use a .parquet name, not {str(out)!r}")
    frame = impression_frame(feedback_dir)
    path = write_impressions(frame, out)
    clicked = int(sum(any(r) for r in frame["reward"]))
    typer.echo(f"saved {path}: {len(frame):,} impressions, {clicked:,} with a click")


@app.command("refit")
def refit_cmd(
    artifact: Annotated[Path, typer.Argument(help="The artifact a service is serving.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to write (not one holding the live "
                                      "feedback log).")],
    dataset: DatasetOpt = DEFAULT_DATASET,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    rating_col: RatingColOpt = None,
    time_col: TimeColOpt = None,
    sep: SepOpt = None,
    feedback_dir: Annotated[
        Path | None, typer.Option(help="The service's feedback log (default: ARTIFACT/feedback).")
    ] = None,
) -> None:
    """Train a new artifact of the same model and parameters on the original data plus the service's feedback
    log; load it into the running service with POST /admin/reload (or SIGHUP when written over ARTIFACT)."""
    from recforge.errors import DataError
    from recforge.serve.feedback import default_feedback_dir
    from recforge.serve.refit import refit_with_feedback

    folder = (feedback_dir or default_feedback_dir(artifact)).resolve()
    if folder == out.resolve() or out.resolve() in folder.parents:
        raise DataError(f"--out {out} holds the feedback log {folder}: replacing it would lose acknowledged "
                        "events; write the new artifact elsewhere, or keep the log outside (serve --feedback-dir)")
    model = refit_with_feedback(artifact, _load(dataset, _columns(user_col, item_col, rating_col, time_col, sep)), folder)
    model.save(out)
    typer.echo(f"refitted {model.name} on {dataset} plus the feedback log in {model.fit_seconds_:.2f}s -> {out}")


# ---------------------------------------------------------------------------------------------- simulate
DEFAULT_POLICIES = "random,pop,greedy-static,greedy,hybrid,linucb,thompson"


def _policy_plan(policies: str, assignments: list[str] | None, seed: int) -> list[tuple[str, str, dict, bool]]:
    """``(label, registered name, parameters, whether its slate probabilities are known)`` per policy of
    ``--policies``, with ``--set policy.param=value`` applied; ``greedy-static`` is greedy without learning. Every
    name and parameter is checked (one line for the first problem)."""
    from recforge.interactive import policy_class
    from recforge.models import parse_params

    labels = [p.strip().lower() for p in policies.split(",") if p.strip()]
    if not labels:
        raise DataError("--policies names no policy")
    settings: dict[str, dict] = {}
    for key, value in parse_params(assignments or []).items():
        policy, _, param = key.partition(".")
        if not param:
            raise DataError(f"--set {key}=...: name the policy, as in linucb.alpha=0.2")
        if policy.replace("_", "-") not in labels:
            raise DataError(f"--set {key}=...: {policy!r} is not one of --policies ({', '.join(labels)})")
        settings.setdefault(policy.replace("_", "-"), {})[param] = value
    plan = []
    for label in labels:
        name, params = label, {"seed": seed, **settings.get(label, {})}
        if label == "greedy-static":
            name, params = "greedy", {"learn": False, **params}
        cls = policy_class(name, [*params, *(["truth"] if label == "oracle" else [])])
        plan.append((label, name, params, cls.known_probabilities))
    return plan


def _make_policy(name: str, params: dict, envs: Any) -> Any:
    """A policy of a plan for the simulator ``envs`` (the oracle is given the hidden preferences)."""
    from recforge.interactive import create_policy

    return create_policy(name, **({**params, "truth": envs.truth} if name == "oracle" else params))


def _logging_policy(log: Any, envs: Any, seed: int) -> Any:
    """The static policy a simulator log was written by (``simulate --log`` labels it ``<policy>+<explore>``),
    fitted, for estimators that need more of it than its probabilities (pi)."""
    from recforge.interactive import ExploringPolicy, parse_explore

    labels = sorted(set(log["policy"].astype(str)))
    base, _, explore = labels[0].partition("+") if len(labels) == 1 else ("", "", "")
    if not base or "(" in base or "," in base:
        raise DataError("--estimators pi needs a log written by one epsilon-greedy (or deterministic) policy; this one "
                        f"holds {', '.join(labels[:5])}")
    (_, name, params, _), = _policy_plan(base, None, seed)
    policy = _make_policy(name, params, envs)
    if policy.learns:
        raise DataError(f"--estimators pi: the logging policy {base!r} learns online, so replaying it cannot give "
                        "the state it logged in; log a static policy (greedy-static, pop, ...)")
    sampler = parse_explore(explore or "none", policy.slate_size)
    return (policy if sampler is None else ExploringPolicy(policy, sampler)).fit(envs.visible)


def _mixture_plan(spec: str, seed: int) -> tuple[list[tuple[str, str, dict, bool]], list[float]]:
    """``--mix name=weight,...``: the components' plans (checked, deterministic) and their weights (summing to 1)."""
    pairs = [p.strip() for p in spec.split(",") if p.strip()]
    names, weights = [], []
    for pair in pairs:
        name, sep, weight = pair.partition("=")
        try:
            value = float(weight) if sep else float("nan")
        except ValueError:
            value = float("nan")
        if not name.strip() or not value >= 0:
            raise DataError(f"--mix: give policy=weight pairs, as in greedy-static=0.7,pop=0.3; got {pair!r}")
        names.append(name.strip())
        weights.append(value)
    if len(names) < 2 or abs(sum(weights) - 1) > 1e-9:
        raise DataError(f"--mix: give two or more policy=weight pairs whose weights sum to 1, got {spec!r}")
    plan = _policy_plan(",".join(names), None, seed)
    randomised = [label for label, _, params, known in plan if not known or label == "random"]
    if randomised:
        raise DataError(f"--mix: {', '.join(randomised)} draw slates at random; mix deterministic policies "
                        "(greedy-static, greedy, pop, linucb, sequential)")
    return plan, weights


@app.command("simulate")
def simulate_cmd(
    dataset: DatasetOpt = DEFAULT_DATASET,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    rating_col: RatingColOpt = None,
    time_col: TimeColOpt = None,
    sep: SepOpt = None,
    policies: Annotated[
        str,
        typer.Option(help="Comma-separated policies: random, pop, greedy (ALS updated by clicks), greedy-static, "
                     "egreedy, hybrid (notebook 000), linucb, thompson, sequential, oracle."),
    ] = DEFAULT_POLICIES,
    assignments: Annotated[
        list[str] | None, typer.Option("--set", help="Policy parameter as policy.name=value; repeatable.")
    ] = None,
    train_episodes: Annotated[int, typer.Option(help="Training episodes (the policy learns online).")] = 1,
    test_episodes: Annotated[int, typer.Option(help="Test episodes, each from the best training state.")] = 5,
    train_users: Annotated[int | None, typer.Option(help="Training users (default: a third of the eligible).")] = None,
    test_users: Annotated[int | None, typer.Option(help="Testing users (default: the other eligible users).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results and per-user scores.")] = Path(
        "results/simulate"
    ),
    explore: Annotated[
        str, typer.Option(help="Make every policy stochastic with known slate probabilities: none, epsilon:E "
                          "(a uniformly random slate with probability E) or swap:S (two adjacent positions "
                          "exchanged with probability S).")
    ] = "none",
    mix: Annotated[
        str | None, typer.Option(help="Also simulate a mixture: each slate comes from one of these deterministic "
                                 "policies (default parameters), drawn with the given weights, as in "
                                 "greedy-static=0.7,pop=0.3; a log of it supports each of them as a target.")
    ] = None,
    log: Annotated[
        Path | None, typer.Option(help="Write every test slate shown, with its probabilities and clicks, to this "
                                  "Parquet file (the logged-impression format of docs/ope.md).")
    ] = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Simulate slate recommendation on a real dataset: train policies online, test them, save scores and plots."""
    from recforge.data.impressions import write_impressions
    from recforge.data.io import table_format
    from recforge.errors import DataError
    from recforge.interactive import (
        ExploringPolicy,
        ImpressionRecorder,
        MixturePolicy,
        make_environments,
        parse_explore,
        save_results,
        simulate,
    )
    from recforge.interactive.harness import markdown_table, results_table

    if train_episodes < 0 or test_episodes < 1:
        raise DataError("--train-episodes must be >= 0 and --test-episodes >= 1")
    plan = _policy_plan(policies, assignments, seed)  # checked before the data is loaded or any policy runs
    unknown = [label for label, *_, known in plan if not known]
    if unknown and (log is not None or parse_explore(explore, 5) is not None):
        if len(unknown) == len(plan):
            raise DataError(f"{', '.join(unknown)} draw slates with probabilities they do not know, so they cannot "
                            "be logged or explored around; add a deterministic policy (greedy, greedy-static, pop, "
                            "linucb, sequential, oracle)")
        logging.getLogger(__name__).warning(
            "%s draw slates with probabilities they do not know: simulated as they are, not logged", ", ".join(unknown))
    if log is not None and table_format(log) != "parquet":
        raise DataError(f"--log: impression logs are Parquet files; use a .parquet name, not {str(log)!r}")
    mixture = _mixture_plan(mix, seed) if mix is not None else None
    data = _load(dataset, _columns(user_col, item_col, rating_col, time_col, sep))
    envs = make_environments(data, n_train_users=train_users, n_test_users=test_users, seed=seed)
    recorder = None if log is None else ImpressionRecorder(data.user_map, data.item_map, f"seed {seed}")
    results = []
    for label, name, params, known in plan:
        policy = _make_policy(name, params, envs)
        sampler = parse_explore(explore, policy.slate_size)
        if sampler is not None and policy.deterministic:  # random is logged as it is
            policy = ExploringPolicy(policy, sampler)
            label = f"{label}+{explore.strip().lower()}"
        results.append(simulate(policy, envs, train_episodes, test_episodes, progress=not quiet, name=label,
                                recorder=recorder if known else None))
    if mixture is not None:
        components, weights = mixture
        policy = MixturePolicy([_make_policy(name, params, envs) for _, name, params, _ in components], weights)
        label = "mix(" + ",".join(f"{c[0]}={w:g}" for c, w in zip(components, weights)) + ")"
        results.append(simulate(policy, envs, train_episodes, test_episodes, progress=not quiet, name=label,
                                recorder=recorder))
    typer.echo(markdown_table(results_table(results)), nl=False)
    paths = save_results(results, out)
    if recorder is not None and log is not None:
        paths["log"] = write_impressions(recorder.frame(), log)
    typer.echo("saved: " + ", ".join(str(p) for p in paths.values()))


@app.command("ope")
def ope_cmd(
    log: Annotated[Path, typer.Argument(help="A logged-impression Parquet file (recforge simulate --log).")],
    dataset: DatasetOpt = DEFAULT_DATASET,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    rating_col: RatingColOpt = None,
    time_col: TimeColOpt = None,
    sep: SepOpt = None,
    policies: Annotated[
        str, typer.Option(help="Comma-separated target policies to estimate (greedy-static, pop, sequential, oracle, "
                          "random; learning ones such as linucb are frozen after --train-episodes).")
    ] = "greedy-static,pop,random",
    train_episodes: Annotated[int, typer.Option(min=0, help="Episodes a learning target (linucb, greedy) trains on the "
                                                "simulator's training users before it is frozen and estimated.")] = 1,
    assignments: Annotated[
        list[str] | None, typer.Option("--set", help="Policy parameter as policy.name=value; repeatable.")
    ] = None,
    estimators: Annotated[str, typer.Option(help="Comma-separated: ips, snips, iips, rips, pi (a log of one static "
                                            "epsilon-greedy policy); dm, dr, switch with --reward-model.")
                          ] = "ips,snips,iips,rips",
    reward_model: Annotated[
        str | None, typer.Option(help="A recforge model (e.g. als) fitted on the visible data and calibrated to the "
                                 "log's clicks: the direct method's reward model (dm, dr, switch).")
    ] = None,
    sizes: Annotated[str, typer.Option(help="Log sizes to report (the first N impressions), comma-separated; the "
                                       "whole log is always reported.")] = "1000,10000,100000",
    train_users: Annotated[int | None, typer.Option(help="As given to simulate (rebuilds its visible data).")] = None,
    test_users: Annotated[int | None, typer.Option(help="As given to simulate (rebuilds its visible data).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the table and its plot.")] = Path("results/ope"),
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Estimate target policies' click-through rate from a simulator log, each estimator with a 95% interval, as
    the log grows; the data, --seed and user counts must be those the log was simulated with."""
    import numpy as np

    from recforge.data.impressions import read_impressions
    from recforge.data.io import atomic_path, write_table
    from recforge.interactive import FrozenPolicy, make_environments, play_episode
    from recforge.interactive.harness import markdown_table
    from recforge.models import get_model_class
    from recforge.ope import ESTIMATORS
    from recforge.ope.report import estimates_by_log_size, plot_estimates

    names = [e.strip().lower() for e in estimators.split(",") if e.strip()]
    bad = [e for e in names if e not in ESTIMATORS]
    if not names or bad:
        raise DataError(f"--estimators: choose from {', '.join(ESTIMATORS)}" + (f"; unknown: {', '.join(bad)}" if bad else ""))
    needs_model = [e for e in names if e in ("dm", "dr", "switch")]
    if needs_model and reward_model is None:
        raise DataError(f"--estimators {','.join(needs_model)} need a reward model: add --reward-model als (or any model)")
    if reward_model is not None:
        get_model_class(reward_model)  # an unknown name is one line before any work
    try:
        counts = [int(v) for v in sizes.split(",") if v.strip()]
    except ValueError:
        raise DataError(f"--sizes must be comma-separated whole numbers, got {sizes!r}") from None
    plan = _policy_plan(policies, assignments, seed)
    frame = read_impressions(log)
    data = _load(dataset, _columns(user_col, item_col, rating_col, time_col, sep))
    envs = make_environments(data, n_train_users=train_users, n_test_users=test_users, seed=seed)

    targets = {}
    for label, name, params, _ in plan:
        policy = _make_policy(name, params, envs).fit(envs.visible)
        for e in range(train_episodes if policy.learns else 0):
            play_episode(policy, envs.train, not quiet, f"{label} train {e + 1}/{train_episodes}")
        # a sequential policy's weights never change: what it "learns" is the history it is replayed with
        frozen = policy.learns and name != "sequential"
        targets[label] = FrozenPolicy(policy).fit(envs.visible) if frozen else policy
    model = None
    if reward_model is not None:
        cls = get_model_class(reward_model)
        model = cls(**({"progress": False} if "progress" in cls._param_names() else {})).fit(envs.visible)
    logger = _logging_policy(frame, envs, seed) if "pi" in names else None
    table = estimates_by_log_size(frame, envs.visible, targets, names, counts, seed=seed, reward_model=model,
                                  logger=logger)
    shown = table.assign(estimate=[f"{v:.4f} [{lo:.4f}, {hi:.4f}]" if np.isfinite(v) else "none" for v, lo, hi in
                                   zip(table["value"], table["ci_low"], table["ci_high"])])
    pivot = shown.pivot_table(index=["target", "estimator"], columns="impressions", values="estimate",
                              aggfunc="first", sort=False).reset_index()
    pivot.columns = [str(c) if isinstance(c, str) else f"{c:,} impressions" for c in pivot.columns]
    notes = sorted({f"{t}, {e}: {n}" for t, e, n in zip(table["target"], table["estimator"], table["note"]) if n})
    text = markdown_table(pivot) + "".join(f"\nnone = {note}" for note in notes[:5]) + ("\n" if notes else "")
    typer.echo(text, nl=False)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_table(table, out / "ope.csv")]
    with atomic_path(out / "ope.md") as tmp:
        tmp.write_text(text)
    paths += [out / "ope.md", plot_estimates(table, out / "ope.png")]
    typer.echo("saved: " + ", ".join(str(p) for p in paths))


def main() -> None:
    """Entry point: run the CLI; recforge errors become one line and exit status 2, usage errors click's one line
    and usage hint (exit 2), Ctrl-C exit status 130."""
    # before any GPU work, so a deterministic=True model can rely on it (trial workers and torchrun ranks inherit it)
    fix_cublas_workspace()
    # a typo there is one line before any work, as --device's (which replaces it; help needs no device)
    chosen = os.environ.get(DEVICE_ENV, "")
    asks_otherwise = {"--device", "--help", "-h", "--version"} & {a.split("=")[0] for a in sys.argv[1:]}
    if chosen.strip() and device_name(chosen) is None and not asks_otherwise:
        typer.echo(f"error: {DEVICE_ENV}={chosen!r}: a device must be {DEVICE_NAMES}", err=True)
        sys.exit(2)
    try:
        with settings_named_as_options():
            code = app(standalone_mode=False, prog_name="recforge")
        sys.exit(code if isinstance(code, int) else 0)  # --version and --help end in an exit code here
    except RecforgeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.TyperException as exc:  # usage errors of typer's own click: bad options, values, arguments
        exc.show()
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
