"""Named datasets: the embedded MovieLens latest-small, the downloadable MovieLens releases and synthetic data.

``load`` also accepts a path: a MovieLens folder or zip, or a single interactions file (CSV, TSV, Parquet,
JSON lines).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from recforge.data.datasets.download import ARCHIVES, cached_path, default_cache_dir, fetch
from recforge.data.datasets.movielens import load_movielens
from recforge.data.datasets.synthetic import make_synthetic
from recforge.data.interactions import Interactions
from recforge.errors import DataError, UnknownDatasetError, setting

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "ml-latest-small"
_GROUPLENS_LICENSE = "GroupLens research license: research use, no redistribution without permission, cite"
_LATEST_LICENSE = "GroupLens research license: research use, non-commercial, redistribution with its README"


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`list_datasets` shows about one named dataset."""

    name: str
    description: str
    size: str
    license: str
    source: Literal["embedded", "download", "generated"]


_DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            "ml-latest-small", "MovieLens latest-small (2018): 0.5-5 star ratings, titles, genres, tags",
            "100,836 ratings, 610 users, 9,724 movies", _LATEST_LICENSE, "embedded",
        ),
        DatasetInfo(
            "ml-100k", "MovieLens 100K (1998): 1-5 star ratings, titles, genres, user demographics",
            "100,000 ratings, 943 users, 1,682 movies", _GROUPLENS_LICENSE, "download",
        ),
        DatasetInfo(
            "ml-1m", "MovieLens 1M (2003): 1-5 star ratings, titles, genres, user demographics",
            "1,000,209 ratings, 6,040 users, 3,706 movies", _GROUPLENS_LICENSE, "download",
        ),
        DatasetInfo(
            "ml-10m", "MovieLens 10M (2009): 0.5-5 star ratings, titles, genres, tags",
            "10,000,054 ratings", _GROUPLENS_LICENSE, "download",
        ),
        DatasetInfo(
            "ml-20m", "MovieLens 20M (2015): 0.5-5 star ratings, titles, genres, tags",
            "20,000,263 ratings", _GROUPLENS_LICENSE, "download",
        ),
        DatasetInfo(
            "ml-25m", "MovieLens 25M (2019): 0.5-5 star ratings, titles, genres, tags",
            "25,000,095 ratings", _GROUPLENS_LICENSE, "download",
        ),
        DatasetInfo(
            "ml-32m", "MovieLens 32M (2023): 0.5-5 star ratings, titles, genres, tags",
            "32,000,204 ratings", _GROUPLENS_LICENSE, "download",
        ),
        DatasetInfo(
            "synthetic", "Generated clustered interactions with popularity skew and sequential structure",
            "configurable (default 50,000 interactions, 1,000 users, 500 items)", "none (generated)", "generated",
        ),
    )
}  # fmt: skip


def list_datasets() -> pd.DataFrame:
    """The named datasets: name, description, size, license and source (embedded, download or generated)."""
    rows = []
    for info in _DATASETS.values():
        row = asdict(info)
        if info.source == "download":
            row["size"] += f" ({ARCHIVES[info.name].download_size} download)"
        rows.append(row)
    return pd.DataFrame(rows, columns=["name", "description", "size", "license", "source"])


def _load_embedded() -> Interactions:
    resource = importlib.resources.files("recforge.data.datasets") / "embedded" / f"{EMBEDDED_DEFAULT}.zip"
    if not resource.is_file():
        raise DataError(
            f"the embedded dataset {EMBEDDED_DEFAULT!r} is missing from this installation; reinstall recforge, or "
            "pass the path of a MovieLens folder or zip"
        )
    # as_file gives a real path even when the package itself is imported from a zip.
    with importlib.resources.as_file(resource) as path:
        return load_movielens(path, variant=EMBEDDED_DEFAULT)


def load(
    name_or_path: str | os.PathLike[str],
    *,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Interactions:
    """Load a named dataset or a dataset file/folder as :class:`Interactions`.

    Names: ``"ml-latest-small"`` (embedded, always offline), ``"ml-100k"`` ... ``"ml-32m"`` (from the cache,
    or downloaded first when ``download=True``), ``"synthetic"`` (``kwargs`` go to ``make_synthetic``). A path
    to a MovieLens folder or zip goes to :func:`load_movielens` (``kwargs``: ``variant``); a path to a single
    file goes to :meth:`Interactions.from_file` with ``kwargs`` (column names, duplicate policy, ...).
    """
    if isinstance(name_or_path, str) and name_or_path.lower() in _DATASETS:
        return _load_named(name_or_path.lower(), download, cache_dir, kwargs)
    path = Path(name_or_path).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip" and _is_movielens_zip(path)):
        extra = sorted(set(kwargs) - {"variant"})
        if extra:
            raise DataError(f"a MovieLens folder or zip takes only the option 'variant', got {extra}")
        return load_movielens(path, **kwargs)
    if path.is_file():
        return Interactions.from_file(path, **kwargs)
    if _looks_like_path(name_or_path):
        raise DataError(f"no such file or folder: {str(path)!r} (resolved to {str(path.resolve())!r}); check the path")
    raise UnknownDatasetError(
        f"unknown dataset {str(name_or_path)!r} and no file or folder of that name exists; known datasets are "
        f"{', '.join(_DATASETS)} (see list_datasets()), or pass the path of a data file or MovieLens folder"
    )


def _load_named(name: str, download: bool, cache_dir: str | os.PathLike[str] | None, kwargs: dict) -> Interactions:
    if name == "synthetic":
        return make_synthetic(**kwargs)
    if kwargs:
        given = ", ".join(setting(k) for k in sorted(kwargs))
        raise DataError(f"dataset {name!r} has its own columns and takes no options ({given}: they are for data "
                        "files); filter the loaded data instead")
    if name == EMBEDDED_DEFAULT:
        return _load_embedded()
    folder = cached_path(name, cache_dir)
    if folder is None:
        if not download:
            where = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
            raise DataError(
                f"dataset {name!r} is not in the cache ({where}); pass download=True, run "
                f"`recforge datasets fetch {name}`, or pass the path of a local copy (folder or zip)"
            )
        folder = fetch(name, cache_dir=cache_dir)
    return load_movielens(folder, variant=name)


def _is_movielens_zip(path: Path) -> bool:
    """A zip whose ratings file sits at the top or one folder down; other zips are single compressed tables."""
    markers = {"u.data", "ratings.dat", "ratings.csv"}
    try:
        with zipfile.ZipFile(path) as zf:
            return any(Path(n).name in markers and n.count("/") <= 1 for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _looks_like_path(value: str | os.PathLike[str]) -> bool:
    text = os.fspath(value)
    return not isinstance(value, str) or os.sep in text or "/" in text or bool(Path(text).suffix)


def describe_dataset(name_or_interactions: str | os.PathLike[str] | Interactions) -> dict[str, Any]:
    """Summary of a dataset: name, description, license and source (for named ones) plus its statistics.

    A name or path is loaded first (without downloading); an :class:`Interactions` is described as it is.
    """
    if isinstance(name_or_interactions, Interactions):
        inter, info, name = name_or_interactions, None, None
    else:
        name = os.fspath(name_or_interactions)
        info = _DATASETS.get(name.lower())
        inter = load(name_or_interactions)
    out: dict[str, Any] = {
        "name": info.name if info else name,
        "description": info.description if info else None,
        "license": info.license if info else None,
        "source": info.source if info else None,
    }
    out.update(inter.describe())
    if inter.item_data is not None:
        out["item_features"] = list(inter.item_data.columns)
    if inter.user_data is not None:
        out["user_features"] = list(inter.user_data.columns)
    return out
