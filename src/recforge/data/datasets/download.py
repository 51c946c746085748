"""Download the official MovieLens archives from GroupLens into a local cache, verified and extracted.

The cache lives in ``$RECFORGE_DATA_DIR`` (default ``~/.cache/recforge``); each release is extracted to
``<cache>/<name>/`` with the archive's top folder removed, so ``<cache>/ml-100k/u.data`` holds the ratings.
The server can be replaced (a mirror, or a local server in tests) with ``$RECFORGE_MOVIELENS_URL``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recforge.core.progress import progress_bar
from recforge.data.io import atomic_directory
from recforge.errors import DownloadError, UnknownDatasetError

log = logging.getLogger(__name__)

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
BASE_URL_ENV = "RECFORGE_MOVIELENS_URL"
DATA_DIR_ENV = "RECFORGE_DATA_DIR"
_TIMEOUT_S = 60
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One downloadable MovieLens release: its zip name on the server and its published MD5 (if pinned)."""

    name: str
    filename: str
    md5: str | None
    download_size: str


# MD5 values published by GroupLens beside each archive (<url>.md5). ml-latest-small is not pinned: its
# sidecar is read at download time instead.
ARCHIVES: dict[str, Archive] = {
    a.name: a
    for a in (
        Archive("ml-100k", "ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", "5 MB"),
        Archive("ml-1m", "ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "6 MB"),
        Archive("ml-10m", "ml-10m.zip", "ce571fd55effeba0271552578f2648bd", "63 MB"),
        Archive("ml-20m", "ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", "190 MB"),
        Archive("ml-25m", "ml-25m.zip", "6b51fb2759a8657d3bfcbfc42b592ada", "250 MB"),
        Archive("ml-32m", "ml-32m.zip", "d472be332d4daa821edc399621853b57", "228 MB"),
        Archive("ml-latest-small", "ml-latest-small.zip", None, "1 MB"),
    )
}


def default_cache_dir() -> Path:
    """The dataset cache: ``$RECFORGE_DATA_DIR`` when set, else ``~/.cache/recforge``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recforge"


def base_url() -> str:
    """The server the archives come from: ``$RECFORGE_MOVIELENS_URL`` when set, else GroupLens."""
    url = os.environ.get(BASE_URL_ENV) or BASE_URL
    return url if url.endswith("/") else url + "/"


def archive_info(name: str) -> Archive:
    """The :class:`Archive` of a release name (``"ml-1m"``; ``"1m"`` works too)."""
    key = name.lower()
    key = key if key.startswith("ml-") else f"ml-{key}"
    if key not in ARCHIVES:
        raise UnknownDatasetError(
            f"no MovieLens archive named {name!r}; downloadable ones are {', '.join(ARCHIVES)}"
        )
    return ARCHIVES[key]


def cached_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The extracted folder of ``name`` in the cache, or ``None`` when it has not been fetched."""
    folder = _cache_root(cache_dir) / archive_info(name).name
    return folder if folder.is_dir() else None


def fetch(
    name: str, cache_dir: str | os.PathLike[str] | None = None, force: bool = False, progress: bool = True
) -> Path:
    """Download, verify and extract a MovieLens release; return its folder. A cached copy is reused.

    The archive is streamed to a temporary file, its MD5 compared with the published one, and only then
    extracted into a temporary folder that is renamed into place, so an interrupted or corrupt download never
    leaves a half-filled dataset behind. ``force=True`` downloads again even when a copy is cached.
    """
    info = archive_info(name)
    root = _cache_root(cache_dir)
    target = root / info.name
    if target.is_dir() and not force:
        log.info("using cached %s at %s", info.name, target)
        return target
    url = base_url() + info.filename
    expected = info.md5 or _published_md5(url)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{info.filename}.", suffix=".part", dir=root)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s", url)
        actual = _download(url, tmp, progress)
        if expected is not None and actual != expected:
            raise DownloadError(
                f"checksum mismatch for {url}: expected MD5 {expected}, got {actual}; the download was "
                "corrupted or the file on the server changed. Try again, or pass a verified local copy with "
                "--data PATH"
            )
        with atomic_directory(target) as staging:
            _extract(tmp, staging, url)
            # mkdtemp makes the folder private (0700); give it the cache's own permissions so shared caches work.
            staging.chmod(root.stat().st_mode & 0o777)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("extracted %s to %s", info.name, target)
    return target


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _network_error(url: str, exc: BaseException) -> DownloadError:
    reason = f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError) else str(exc) or repr(exc)
    return DownloadError(
        f"could not download {url}: {reason}. Check the network connection (or ${BASE_URL_ENV}), or download "
        "the archive yourself and pass its folder or zip with --data PATH"
    )


def _open(url: str) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": "recforge (MovieLens download)"})
    return urllib.request.urlopen(request, timeout=_TIMEOUT_S)


def _download(url: str, dest: Path, progress: bool) -> str:
    """Stream ``url`` into ``dest`` with a progress bar; return the MD5 of the bytes received."""
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    try:
        with _open(url) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with progress_bar(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name.split(".part")[0].lstrip("."),
                enabled=progress, leave=False,
            ) as bar:  # fmt: skip
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _network_error(url, exc) from None
    if total is not None and received != total:
        raise DownloadError(
            f"download of {url} stopped after {received:,} of {total:,} bytes; try again, or pass a local copy "
            "with --data PATH"
        )
    return digest.hexdigest()


def _published_md5(url: str) -> str | None:
    """The MD5 GroupLens publishes at ``<url>.md5`` (``MD5 (name.zip) = <hex>``); ``None`` if unavailable."""
    try:
        with _open(url + ".md5") as response:
            text = response.read(4096).decode("ascii", errors="replace")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        # The zip's own CRCs are still checked on extraction, so a missing sidecar is not fatal.
        log.warning("no published checksum for %s (%s); the download will not be verified by MD5", url, exc)
        return None
    match = re.search(r"\b([0-9a-fA-F]{32})\b", text)
    if match is None:
        log.warning("could not read a checksum from %s.md5; the download will not be verified by MD5", url)
        return None
    return match.group(1).lower()


def _extract(archive: Path, dest: Path, url: str) -> None:
    """Unzip into ``dest``, moving the contents of a single top folder (``ml-100k/``) up one level."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                parts = Path(member).parts
                if Path(member).is_absolute() or ".." in parts:
                    raise DownloadError(f"refusing to extract {url}: it holds an unsafe path {member!r}")
            zf.extractall(dest)  # also checks every member's CRC
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise DownloadError(f"the file downloaded from {url} is not a valid zip archive ({exc}); try again") from None
    shutil.rmtree(dest / "__MACOSX", ignore_errors=True)
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0].rename(dest / ".recforge-unpack")
        for child in inner.iterdir():
            child.rename(dest / child.name)
        inner.rmdir()
