"""Reading and writing tables (CSV, TSV, Parquet, JSON-lines) and atomic file writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from recforge.errors import DataError

_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


def table_format(path: str | os.PathLike[str]) -> str:
    """The format implied by a file name (``.csv.gz`` etc. count as their inner extension)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zst", ".xz", ".zip"):
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {str(path)!r} from its extension; use .csv, .tsv, .parquet or .jsonl"
        )
    return fmt


def read_table(path: str | os.PathLike[str], sep: str | None = None) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet/JSON-lines file into pandas, with errors that name the file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"file not found: {str(p)!r}")
    if p.is_dir():
        raise DataError(f"{str(p)!r} is a directory; pass a data file (or use recforge.datasets.load for a dataset folder)")
    fmt = table_format(p)
    try:
        if fmt == "parquet":
            return pd.read_parquet(p)
        if fmt == "jsonl":
            try:
                return pd.read_json(p, lines=True)
            except ValueError:
                if p.suffix.lower() != ".json":
                    raise
                return pd.read_json(p)  # a plain JSON array of records
        if sep is None:
            sep = "\t" if fmt == "tsv" else ","
        return pd.read_csv(p, sep=sep)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many types; show them as one readable error
        raise DataError(f"could not read {str(p)!r} as {fmt}: {exc}") from None


def write_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a DataFrame in the format implied by the extension, atomically."""
    p = Path(path)
    fmt = table_format(p)
    with atomic_path(p) as tmp:
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        elif fmt == "jsonl":
            df.to_json(tmp, orient="records", lines=True)
        else:
            df.to_csv(tmp, sep="\t" if fmt == "tsv" else ",", index=False)
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``path`` in one rename, on error it is removed.

    A reader never sees a half-written file, and an existing file survives a failed write.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file should look like any other
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, p)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` (file or directory) when the block succeeds.

    The new files reach the disk (fsync) before anything is renamed. The previous content is moved aside first
    (``.<name>.old-<pid>-<random>``, a name no earlier run left) and deleted only after the new directory is in
    place, so a process stopped between the two renames leaves the old content there, whole.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for entry in [*tmp.rglob("*"), tmp]:
            if entry.is_dir():
                fsync_folder(entry)  # its entries, the files' names
            elif entry.is_file():
                with open(entry, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = None
        if p.exists() or p.is_symlink():
            old = p.with_name(f".{p.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.replace(p, old)
        os.replace(tmp, p)
        fsync_folder(p.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a folder's renames durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_figure(fig: object, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    p = Path(path)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return p
