"""Readers for the MovieLens archives published by GroupLens (100K, 1M, 10M, 20M, 25M, 32M, latest).

Every variant becomes one :class:`~recforge.data.interactions.Interactions` with int user and movie ids, float
ratings and Unix-second timestamps, plus item side data (``title``, ``genres``, ``year`` and, where the archive
has tags, ``tags``) and, for 100K and 1M, user side data (``age``, ``gender``, ``occupation``, ``zip``).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Literal

import numpy as np
import pandas as pd

from recforge.data.interactions import Interactions
from recforge.data.split import Split
from recforge.errors import DataError

log = logging.getLogger(__name__)

Layout = Literal["100k", "dat", "csv"]

# The file whose presence identifies each layout; the id map and the row count come from it.
_RATINGS_FILE: dict[Layout, str] = {"100k": "u.data", "dat": "ratings.dat", "csv": "ratings.csv"}

_VARIANT_LAYOUT: dict[str, Layout] = {
    "100k": "100k",
    "1m": "dat",
    "10m": "dat",
    "20m": "csv",
    "25m": "csv",
    "32m": "csv",
    "latest": "csv",
    "latest-small": "csv",
}

# MovieLens 1M stores occupations as codes; the 1M README lists their names.
_ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
]  # fmt: skip

# "Title (1995)" and, for TV series in the newer files, "Title (2006-2007)"; the first year is kept.
_YEAR_IN_TITLE = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{4})?\)\s*$")

# A separator byte that never occurs in MovieLens text: "::" becomes it, so one-character CSV parsers apply.
_UNIT_SEP = "\x1f"


class _Archive:
    """The files of one MovieLens release, in a folder or a zip, at the top level or under one folder."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self._zip: zipfile.ZipFile | None = None
        if source.is_dir():
            self._members = _folder_members(source)
        else:
            try:
                self._zip = zipfile.ZipFile(source)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"cannot open {str(source)!r} as a zip archive: {exc}") from None
            self._members = _zip_members(self._zip)
        self.prefix = ""

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def prefixes(self, layout: Layout) -> list[str]:
        """The folders ("" for the top level, else "name/") that hold the ratings file of ``layout``."""
        wanted = _RATINGS_FILE[layout]
        return sorted(m[: -len(wanted)] for m in self._members if PurePosixPath(m).name == wanted)

    def has(self, name: str) -> bool:
        return self.prefix + name in self._members

    def open(self, name: str) -> IO[bytes]:
        member = self.prefix + name
        if self._zip is not None:
            return self._zip.open(member)
        return open(self.source / member, "rb")

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as fh:
            return fh.read()

    def read_text(self, name: str) -> str:
        """Decode as UTF-8, falling back to Latin-1 (the encoding of the older MovieLens files)."""
        data = self.read_bytes(name)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def _folder_members(folder: Path) -> set[str]:
    """Relative POSIX paths of the files in ``folder`` and in its direct subfolders."""
    members = set()
    for entry in folder.iterdir():
        if entry.is_file():
            members.add(entry.name)
        elif entry.is_dir() and not entry.name.startswith(("__MACOSX", ".")):
            members.update(f"{entry.name}/{sub.name}" for sub in entry.iterdir() if sub.is_file())
    return members


def _zip_members(zf: zipfile.ZipFile) -> set[str]:
    return {
        n for n in zf.namelist() if not n.endswith("/") and n.count("/") <= 1 and not n.startswith("__MACOSX")
    }


def _layout_of(variant: str | None) -> Layout | None:
    if variant is None:
        return None
    key = variant.lower().removeprefix("ml-").removeprefix("movielens-")
    if key not in _VARIANT_LAYOUT:
        known = ", ".join(f"ml-{k}" for k in _VARIANT_LAYOUT)
        raise DataError(f"unknown MovieLens variant {variant!r}; use one of {known}, or None to detect it")
    return _VARIANT_LAYOUT[key]


def load_movielens(source: str | os.PathLike[str], variant: str | None = None) -> Interactions:
    """Load a MovieLens release from its folder or its official zip archive.

    ``source`` may hold the files directly or inside one top folder (as the GroupLens archives do, e.g.
    ``ml-100k/u.data``). The format is detected from the files present unless ``variant`` (``"ml-100k"``,
    ``"ml-1m"``, ``"ml-10m"``, ``"ml-20m"``, ``"ml-25m"``, ``"ml-32m"``, ``"ml-latest-small"``) names it.
    The id maps come from the ratings: movies that nobody rated are not items; side data is aligned to them.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"MovieLens source not found: {str(path)!r}; pass the folder or .zip of a MovieLens release")
    wanted = _layout_of(variant)
    archive = _Archive(path)
    try:
        layouts: tuple[Layout, ...] = (wanted,) if wanted else ("100k", "dat", "csv")
        found = [(prefix, lay) for lay in layouts for prefix in archive.prefixes(lay)]
        if not found:
            expected = " or ".join(_RATINGS_FILE[lay] for lay in layouts)
            raise DataError(
                f"{str(path)!r} does not look like a MovieLens release: no {expected} at its top level or in "
                "one folder below it; pass the folder (or zip) that contains the MovieLens files"
            )
        top = [(prefix, lay) for prefix, lay in found if prefix == ""]
        if not top and len({prefix for prefix, _ in found}) > 1:
            folders = ", ".join(sorted({prefix.rstrip("/") for prefix, _ in found}))
            raise DataError(f"{str(path)!r} holds several MovieLens releases ({folders}); pass one of those folders")
        archive.prefix, layout = (top or found)[0]
        log.debug("reading MovieLens %s layout from %s", layout, path)
        reader = {"100k": _read_100k, "dat": _read_dat, "csv": _read_csv}[layout]
        ratings, items, users = reader(archive)
    finally:
        archive.close()
    return Interactions.from_frame(
        ratings,
        user_col="user_id",
        item_col="item_id",
        rating_col="rating",
        timestamp_col="timestamp",
        item_data=items,
        user_data=users,
        item_data_id_col="item_id",
        user_data_id_col="user_id",
    )


Tables = tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]
_RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
_CSV_HEADER = {"userId": "user_id", "movieId": "item_id", "rating": "rating", "timestamp": "timestamp"}
_RATING_DTYPES = {"user_id": np.int64, "item_id": np.int64, "rating": np.float32, "timestamp": np.int64}


def _read_ratings(fh: IO[bytes], name: str, sep: str, header: bool) -> pd.DataFrame:
    """Parse a ratings table (user, movie, rating, time) into a frame with the ``_RATING_COLUMNS``.

    Files with a header are matched by column name (``userId,movieId,rating,timestamp``), the others by
    position. pyarrow parses with several threads and hands back plain numpy columns: ml-20m's 20M rows take
    under two seconds on two cores, about half of what pandas' C parser needs.
    """
    renames = _CSV_HEADER if header else dict(zip(_RATING_COLUMNS, _RATING_COLUMNS))
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
    except ImportError:  # pragma: no cover - pyarrow is a dependency, the C parser is only a fallback
        frame = pd.read_csv(fh, sep=sep, header=0 if header else None, names=None if header else _RATING_COLUMNS)
        return _rename_ratings(frame, renames, name).astype(_RATING_DTYPES)
    arrow_types = {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()}
    try:
        table = pacsv.read_csv(
            fh,
            read_options=pacsv.ReadOptions(column_names=None if header else _RATING_COLUMNS),
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(
                column_types={src: arrow_types[dst] for src, dst in renames.items()}, include_columns=list(renames)
            ),
        )
    except (pa.ArrowInvalid, KeyError) as exc:
        raise DataError(f"could not parse MovieLens {name}: {exc}") from None
    if any(table.column(c).null_count for c in table.column_names):
        raise DataError(f"MovieLens {name} has empty fields; the file is damaged, fetch it again")
    frame = pd.DataFrame({c: table.column(c).to_numpy() for c in table.column_names})
    return _rename_ratings(frame, renames, name)


def _rename_ratings(frame: pd.DataFrame, renames: dict[str, str], name: str) -> pd.DataFrame:
    missing = [c for c in renames if c not in frame.columns]
    if missing:
        raise DataError(f"MovieLens {name} lacks the columns {missing}; it has {list(frame.columns)}")
    return frame[list(renames)].rename(columns=renames)


def _year_from_title(titles: pd.Series) -> pd.Series:
    return pd.to_numeric(titles.str.extract(_YEAR_IN_TITLE, expand=False), errors="coerce").astype("Int64")


def _read_100k(archive: _Archive) -> Tables:
    with archive.open("u.data") as fh:
        ratings = _read_ratings(fh, "u.data", "\t", header=False)
    items = None
    if archive.has("u.item"):
        items = _read_100k_items(archive)
    users = None
    if archive.has("u.user"):
        users = pd.read_csv(
            io.StringIO(archive.read_text("u.user")),
            sep="|",
            header=None,
            names=["user_id", "age", "gender", "occupation", "zip"],
            dtype={"user_id": np.int64, "age": np.int64, "gender": str, "occupation": str, "zip": str},
            quoting=csv.QUOTE_NONE,
        )
    return ratings, items, users


def _read_100k_items(archive: _Archive) -> pd.DataFrame:
    if archive.has("u.genre"):
        genre_table = pd.read_csv(
            io.StringIO(archive.read_text("u.genre")), sep="|", header=None, names=["name", "index"],
            quoting=csv.QUOTE_NONE,
        )  # fmt: skip
        genre_names = genre_table.sort_values("index")["name"].astype(str).tolist()
    else:
        genre_names = []
    raw = pd.read_csv(
        io.StringIO(archive.read_text("u.item")), sep="|", header=None, quoting=csv.QUOTE_NONE, dtype=str,
        keep_default_na=False,
    )  # fmt: skip
    flags = raw.iloc[:, 5:].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy(dtype=bool)
    if len(genre_names) != flags.shape[1]:
        # Without a matching u.genre the flags cannot be named; number them rather than mislabel them.
        log.warning("u.genre lists %d genres but u.item has %d flags", len(genre_names), flags.shape[1])
        genre_names = [f"genre_{i}" for i in range(flags.shape[1])]
    names = np.asarray(genre_names, dtype=object)
    titles = raw[1].str.strip()
    release_year = pd.to_datetime(raw[2], format="%d-%b-%Y", errors="coerce").dt.year.astype("Int64")
    return pd.DataFrame(
        {
            "item_id": raw[0].astype(np.int64),
            "title": titles,
            "genres": ["|".join(names[row]) for row in flags],
            # The title's year is the film's; the release date is a fallback for titles without one.
            "year": _year_from_title(titles).fillna(release_year),
        }
    )


def _read_dat(archive: _Archive) -> Tables:
    # The "::" separator is two characters, which only the slow Python engine accepts; swap it for one byte.
    raw = archive.read_bytes("ratings.dat").replace(b"::", _UNIT_SEP.encode())
    ratings = _read_ratings(io.BytesIO(raw), "ratings.dat", _UNIT_SEP, header=False)
    del raw
    movies = tags = None
    if archive.has("movies.dat"):
        rows = _split_dat(archive.read_text("movies.dat"), 3, "movies.dat", free=1)
        movies = pd.DataFrame(rows, columns=["item_id", "title", "genres"])
    if archive.has("tags.dat"):
        rows = _split_dat(archive.read_text("tags.dat"), 4, "tags.dat", free=2)
        tags = _tags_frame(pd.DataFrame(rows, columns=["user_id", "item_id", "tag", "timestamp"]))
    items = _movies_frame(movies, tags)
    users = None
    if archive.has("users.dat"):
        users = pd.DataFrame(
            _split_dat(archive.read_text("users.dat"), 5, "users.dat"),
            columns=["user_id", "gender", "age", "occupation", "zip"],
        )
        users = users.astype({"user_id": np.int64, "age": np.int64})
        codes = users["occupation"].astype(np.int64)
        users["occupation"] = [_ML1M_OCCUPATIONS[c] if 0 <= c < len(_ML1M_OCCUPATIONS) else str(c) for c in codes]
        users = users[["user_id", "age", "gender", "occupation", "zip"]]
    return ratings, items, users


def _split_dat(text: str, n_fields: int, name: str, free: int | None = None) -> list[list[str]]:
    """Split ``::``-separated lines; field ``free`` (a title or a tag) may itself contain ``::``."""
    rows = []
    n_tail = 0 if free is None else n_fields - free - 1
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) > n_fields and free is not None:
            end = len(parts) - n_tail
            parts = [*parts[:free], "::".join(parts[free:end]), *parts[end:]]
        if len(parts) != n_fields:
            raise DataError(f"{name} line {lineno} has {len(parts)} fields, expected {n_fields}: {line[:80]!r}")
        rows.append(parts)
    return rows


def _read_csv(archive: _Archive) -> Tables:
    with archive.open("ratings.csv") as fh:
        ratings = _read_ratings(fh, "ratings.csv", ",", header=True)
    movies = None
    if archive.has("movies.csv"):
        with archive.open("movies.csv") as fh:
            movies = pd.read_csv(fh, dtype={"movieId": np.int64, "title": str, "genres": str}, encoding="utf-8")
        movies = movies.rename(columns={"movieId": "item_id"})[["item_id", "title", "genres"]]
    tags = None
    if archive.has("tags.csv"):
        with archive.open("tags.csv") as fh:
            raw = pd.read_csv(fh, usecols=["movieId", "tag"], dtype={"movieId": np.int64, "tag": str})
        tags = _tags_frame(raw.rename(columns={"movieId": "item_id"}))
    return ratings, _movies_frame(movies, tags), None


def _tags_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per movie: its distinct tags, lower-cased and stripped, sorted and joined by ``|``."""
    frame = pd.DataFrame({"item_id": raw["item_id"].astype(np.int64), "tag": raw["tag"]}).dropna(subset=["tag"])
    # "|" separates tags in the joined column, so it cannot stay inside one.
    tag = frame["tag"].astype(str).str.replace("|", " ", regex=False).str.strip().str.lower()
    frame = frame.assign(tag=tag)[tag != ""].drop_duplicates()
    joined = frame.sort_values(["item_id", "tag"]).groupby("item_id", sort=True)["tag"].agg("|".join)
    return joined.rename("tags").reset_index()


def _movies_frame(movies: pd.DataFrame | None, tags: pd.DataFrame | None) -> pd.DataFrame | None:
    """Item side data with title, genres and year (and tags), one row per movie id of either file."""
    if movies is None and tags is None:
        return None
    if movies is None:
        out = tags.assign(title=pd.Series(dtype=object), genres=pd.Series(dtype=object))
    else:
        movies = movies.assign(item_id=movies["item_id"].astype(np.int64), title=movies["title"].str.strip())
        out = movies if tags is None else movies.merge(tags, on="item_id", how="outer")
    out = out.assign(year=_year_from_title(out["title"].astype("string")))
    if tags is not None:
        out["tags"] = out["tags"].fillna("")
    cols = ["item_id", "title", "genres", "year"] + (["tags"] if tags is not None else [])
    return out[cols].reset_index(drop=True)


def load_movielens_folds(
    source: str | os.PathLike[str], folds: tuple[str, ...] = ("u1", "u2", "u3", "u4", "u5")
) -> list[Split]:
    """The official ML-100K splits (``u1.base``/``u1.test`` … ``u5``, or ``ua``/``ub``) as :class:`Split` objects.

    All folds share the id maps and side data of the full release, so results are comparable across folds and
    with other protocols on the same data.
    """
    path = Path(source).expanduser()
    full = load_movielens(path, variant="100k")
    folder = path if (path / "u.data").exists() else next((p.parent for p in path.glob("*/u.data")), path)
    out = []
    for name in folds:
        parts = []
        for part in ("base", "test"):
            file = folder / f"{name}.{part}"
            if not file.exists():
                raise DataError(f"official fold file not found: {str(file)!r}; pass the ml-100k folder")
            frame = pd.read_csv(file, sep="\t", names=_RATING_COLUMNS, dtype=_RATING_DTYPES)
            inter = Interactions.from_frame(frame, user_map=full.user_map, item_map=full.item_map)
            inter.item_data, inter.user_data = full.item_data, full.user_data
            parts.append(inter)
        out.append(Split(train=parts[0], test=parts[1], name=f"ml-100k-{name}"))
    return out
