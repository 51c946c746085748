"""Tests of the dataset layer: MovieLens readers, the embedded dataset, the registry and downloads (offline)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import io
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from recforge.data import Interactions
from recforge.data.datasets import describe_dataset, download, fetch, list_datasets, load, load_movielens
from recforge.errors import DataError, DownloadError, UnknownDatasetError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"

GENRES_100K = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- fixtures
def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES_100K)


def write_100k(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("1\t10\t5\t881250949\n2\t10\t3\t891717742\n2\t20\t1\t878887116\n1\t30\t4\t884182806\n")
    items = [
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{_flags('Animation', 'Comedy')}",
        f"20|Les Misérables|05-Mar-1996||http://y|{_flags('Drama')}",
        f"30|unknown||||{_flags('unknown')}",
        f"40|Never Rated (1990)|01-Jan-1990||http://z|{_flags('Action')}",
    ]
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES_100K)) + "\n")
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n3|30|M|writer|00000\n")
    return folder


def write_dat(folder: Path, *, ten_m: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3.5::978302109\n2::1193::4::978298413\n" if ten_m
        else "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    )  # fmt: skip
    movies = [
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
        '661::"Great Performances" Cats: Zoë (1998)::Children\'s|Musical',
        "5::Unrated Movie (2000)::Comedy",
    ]
    (folder / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    if ten_m:
        (folder / "tags.dat").write_text(
            "1::1193::Jack Nicholson::1188263867\n2::1193:: jack nicholson ::1188263868\n"
            "2::1193::Mental Illness::1188263869\n1::661::a::b::1188263870\n"
        )
    else:
        (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    return folder


def write_csv(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n7,1,0.5,1445714994\n"
        "7,100,3.0,1445714995\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n"
        '3,"American President, The (1995)",Comedy|Drama|Romance\n'
        "100,Babylon 5 ,Sci-Fi\n200,Twin Peaks (1990\u20131991),(no genres listed)\n",
        encoding="utf-8",
    )
    (folder / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n2,1,Pixar,1445714994\n7,1,pixar ,1445714995\n7,1,Fun,1445714996\n"
        '2,3,"politics, drama",1445714997\n2,999,orphan,1445714998\n',
        encoding="utf-8",
    )
    return folder


def zip_folder(folder: Path, dest: Path, top: str | None) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{top}/{f.name}" if top else f.name)
    return dest


# ---------------------------------------------------------------------------------------------- readers
def test_100k_folder(tmp_path: Path) -> None:
    inter = load_movielens(write_100k(tmp_path / "ml-100k"))
    assert len(inter) == 4
    assert inter.user_map.ids.tolist() == [1, 2]
    # Movie 40 is in u.item but nobody rated it: it is no item; user 3 likewise.
    assert inter.item_map.ids.tolist() == [10, 20, 30]
    frame = inter.to_frame().sort_values(["user_id", "item_id"]).reset_index(drop=True)
    assert frame["rating"].tolist() == [5.0, 4.0, 3.0, 1.0]
    assert frame["timestamp"].tolist() == [881250949, 884182806, 891717742, 878887116]
    items = inter.item_data
    assert items.index.tolist() == [10, 20, 30]
    assert items.loc[10, "title"] == "Toy Story (1995)"
    assert items.loc[20, "title"] == "Les Misérables"  # latin-1 decoded
    assert items.loc[10, "genres"] == "Animation|Comedy"
    assert items.loc[10, "year"] == 1995
    assert items.loc[20, "year"] == 1996  # no year in the title: taken from the release date
    assert pd.isna(items.loc[30, "year"])
    users = inter.user_data
    assert users.index.tolist() == [1, 2]
    assert users.loc[1].tolist() == [24, "M", "technician", "85711"]
    assert users.loc[2, "zip"] == "T8H1N"


def test_100k_zip_with_top_folder(tmp_path: Path) -> None:
    archive = zip_folder(write_100k(tmp_path / "src"), tmp_path / "ml-100k.zip", "ml-100k")
    inter = load_movielens(archive)
    assert len(inter) == 4 and inter.item_data.loc[10, "genres"] == "Animation|Comedy"
    # A folder holding the release one level down works the same way.
    write_100k(tmp_path / "outer" / "ml-100k")
    assert len(load_movielens(tmp_path / "outer")) == 4


def test_1m_dat(tmp_path: Path) -> None:
    inter = load_movielens(write_dat(tmp_path / "ml-1m", ten_m=False))
    assert len(inter) == 3
    assert inter.item_map.ids.tolist() == [661, 1193]
    items = inter.item_data
    assert items.loc[661, "title"] == '"Great Performances" Cats: Zoë (1998)'
    assert items.loc[661, "genres"] == "Children's|Musical"
    assert items.loc[1193, "year"] == 1975
    assert "tags" not in items.columns
    users = inter.user_data
    assert users.loc[1].tolist() == [1, "F", "K-12 student", "48067"]
    assert users.loc[2, "occupation"] == "self-employed" and users.loc[2, "age"] == 56
    assert inter.ratings.dtype == np.float32 and inter.timestamps.dtype == np.int64


def test_10m_dat_zip_with_tags(tmp_path: Path) -> None:
    archive = zip_folder(write_dat(tmp_path / "src", ten_m=True), tmp_path / "ml-10m.zip", "ml-10M100K")
    inter = load_movielens(archive, variant="ml-10m")
    assert sorted(inter.ratings.tolist()) == [3.5, 4.0, 5.0]
    assert inter.user_data is None
    tags = inter.item_data["tags"]
    assert tags.loc[1193] == "jack nicholson|mental illness"
    assert tags.loc[661] == "a::b"  # a tag that itself holds the separator survives


def test_csv_layout(tmp_path: Path) -> None:
    inter = load_movielens(write_csv(tmp_path / "ml-latest-small"))
    assert inter.user_map.ids.tolist() == [1, 7]
    assert inter.item_map.ids.tolist() == [1, 3, 100]
    assert sorted(inter.ratings.tolist()) == [0.5, 3.0, 4.0, 4.5]
    items = inter.item_data
    assert items.loc[3, "title"] == "American President, The (1995)"
    assert items.loc[100, "title"] == "Babylon 5"
    assert pd.isna(items.loc[100, "year"])
    assert items.loc[1, "genres"] == "Adventure|Animation"
    assert items.loc[1, "tags"] == "fun|pixar"
    assert items.loc[3, "tags"] == "politics, drama"
    assert items.loc[100, "tags"] == ""
    assert 999 not in items.index and 200 not in items.index


def test_series_year_range(tmp_path: Path) -> None:
    folder = write_csv(tmp_path / "d")
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,200,4.0,1\n")
    assert load_movielens(folder).item_data.loc[200, "year"] == 1990


def test_variant_and_missing_sources(tmp_path: Path) -> None:
    folder = write_100k(tmp_path / "ml-100k")
    with pytest.raises(DataError, match="ratings.dat"):
        load_movielens(folder, variant="ml-1m")
    with pytest.raises(DataError, match="unknown MovieLens variant"):
        load_movielens(folder, variant="ml-7m")
    with pytest.raises(DataError, match="not found"):
        load_movielens(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="does not look like a MovieLens release"):
        load_movielens(tmp_path / "empty")
    write_dat(tmp_path / "two" / "ml-1m", ten_m=False)
    write_100k(tmp_path / "two" / "ml-100k")
    with pytest.raises(DataError, match="several MovieLens releases"):
        load_movielens(tmp_path / "two")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="zip"):
        load_movielens(tmp_path / "bad.zip")


def test_damaged_ratings_file(tmp_path: Path) -> None:
    folder = write_csv(tmp_path / "d")
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,x,4,5\n")
    with pytest.raises(DataError, match="ratings.csv"):
        load_movielens(folder)
    (folder / "ratings.csv").write_text("user,item,rating,timestamp\n1,1,4.0,964982703\n")
    with pytest.raises(DataError, match="ratings.csv"):
        load_movielens(folder)


# ---------------------------------------------------------------------------------------------- embedded
def test_embedded_latest_small() -> None:
    resource = importlib.resources.files("recforge.data.datasets") / "embedded" / "ml-latest-small.zip"
    assert resource.is_file()
    with zipfile.ZipFile(io.BytesIO(resource.read_bytes())) as zf:
        assert "ml-latest-small/README.txt" in zf.namelist()
    start = time.perf_counter()
    inter = load("ml-latest-small")
    elapsed = time.perf_counter() - start
    assert (len(inter), inter.n_users, inter.n_items) == (100_836, 610, 9_724)
    assert inter.item_data.loc[1, "title"] == "Toy Story (1995)"
    assert inter.item_data.loc[1, "year"] == 1995
    assert "pixar" in inter.item_data.loc[1, "tags"].split("|")
    assert inter.item_data["title"].notna().all()
    assert elapsed < 2.0  # well under a second in practice; generous for loaded CI machines


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "u.data").exists(), reason="shared ml-100k copy absent")
def test_shared_ml_100k() -> None:
    inter = load(SHARED_DATA / "ml-100k")
    assert (len(inter), inter.n_users, inter.n_items) == (100_000, 943, 1_682)
    assert inter.item_data["title"].notna().all()
    assert inter.user_data["age"].notna().all()


# ---------------------------------------------------------------------------------------------- registry
def test_list_and_describe() -> None:
    table = list_datasets()
    assert list(table.columns) == ["name", "description", "size", "license", "source"]
    assert {"ml-latest-small", "ml-100k", "ml-32m", "synthetic"} <= set(table["name"])
    assert table.set_index("name").loc["ml-latest-small", "source"] == "embedded"
    info = describe_dataset("ml-latest-small")
    assert info["name"] == "ml-latest-small" and info["interactions"] == 100_836 and info["license"]
    frame = pd.DataFrame({"user_id": [1, 2], "item_id": ["a", "b"]})
    assert describe_dataset(Interactions.from_frame(frame))["users"] == 2


def test_load_unknown_and_missing(tmp_path: Path) -> None:
    with pytest.raises(UnknownDatasetError, match="ml-latest-small") as info:
        load("movielens-7m")
    assert "ml-100k" in str(info.value)
    with pytest.raises(DataError, match="no such file or folder"):
        load(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="download=True"):
        load("ml-1m", cache_dir=tmp_path)
    with pytest.raises(DataError, match="takes no options"):
        load("ml-latest-small", user_col="x")


def test_load_paths(tmp_path: Path) -> None:
    archive = zip_folder(write_csv(tmp_path / "src"), tmp_path / "movies.zip", "ml-latest-small")
    assert len(load(archive)) == 4
    assert len(load(str(tmp_path / "src"), variant="ml-latest-small")) == 4
    with pytest.raises(DataError, match="variant"):
        load(tmp_path / "src", user_col="userId")
    table = tmp_path / "events.csv"
    table.write_text("u,i,ts\n1,a,5\n1,b,6\n2,a,7\n")
    inter = load(table, user_col="u", item_col="i", timestamp_col="ts")
    assert (len(inter), inter.n_items) == (3, 2) and inter.timestamps.tolist() == [5, 6, 7]


def test_load_from_cache(tmp_path: Path) -> None:
    write_dat(tmp_path / "ml-1m", ten_m=False)
    assert len(load("ML-1M", cache_dir=tmp_path)) == 3


def test_load_synthetic() -> None:
    inter = load("synthetic", n_users=30, n_items=20, n_interactions=300, seed=1)
    assert isinstance(inter, Interactions) and len(inter) > 0


# ---------------------------------------------------------------------------------------------- downloads
@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A local HTTP server standing in for files.grouplens.org; ``files`` maps URL paths to bodies."""
    files: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(download.BASE_URL_ENV, f"http://127.0.0.1:{httpd.server_port}/")
    monkeypatch.setenv(download.DATA_DIR_ENV, str(tmp_path / "default-cache"))
    yield SimpleNamespace(files=files, requests=requests)
    httpd.shutdown()
    httpd.server_close()


def _release_zip(tmp_path: Path, name: str) -> bytes:
    folder = write_100k(tmp_path / f"src-{name}") if name == "ml-100k" else write_csv(tmp_path / f"src-{name}")
    return zip_folder(folder, tmp_path / f"{name}.zip", name).read_bytes()


def _pin(monkeypatch: pytest.MonkeyPatch, name: str, md5: str) -> None:
    archives = dict(download.ARCHIVES)
    archives[name] = dataclasses.replace(archives[name], md5=md5)
    monkeypatch.setattr(download, "ARCHIVES", archives)


def test_fetch_with_sidecar_and_cache_reuse(server: SimpleNamespace, tmp_path: Path) -> None:
    body = _release_zip(tmp_path, "ml-latest-small")
    server.files["/ml-latest-small.zip"] = body
    server.files["/ml-latest-small.zip.md5"] = f"MD5 (ml-latest-small.zip) = {hashlib.md5(body).hexdigest()}\n".encode()
    cache = tmp_path / "cache"
    folder = fetch("ml-latest-small", cache_dir=cache, progress=False)
    assert folder == cache / "ml-latest-small"
    assert (folder / "ratings.csv").is_file()  # the archive's top folder is flattened
    assert [p.name for p in cache.iterdir()] == ["ml-latest-small"]  # no temporary file left behind
    assert folder.stat().st_mode & 0o777 == cache.stat().st_mode & 0o777
    assert len(load_movielens(folder)) == 4
    n_requests = len(server.requests)
    assert fetch("ml-latest-small", cache_dir=cache, progress=False) == folder
    assert len(server.requests) == n_requests  # served from the cache
    fetch("ml-latest-small", cache_dir=cache, progress=False, force=True)
    assert len(server.requests) == n_requests + 2


def test_fetch_pinned_checksum_and_load_download(
    server: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _release_zip(tmp_path, "ml-100k")
    server.files["/ml-100k.zip"] = body
    _pin(monkeypatch, "ml-100k", hashlib.md5(body).hexdigest())
    inter = load("ml-100k", download=True, cache_dir=tmp_path / "cache")
    assert len(inter) == 4 and inter.item_data.loc[10, "title"] == "Toy Story (1995)"
    assert server.requests == ["/ml-100k.zip"]  # a pinned checksum needs no sidecar
    assert len(load("ml-100k", cache_dir=tmp_path / "cache")) == 4


def test_fetch_checksum_mismatch(server: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/ml-100k.zip"] = _release_zip(tmp_path, "ml-100k")
    _pin(monkeypatch, "ml-100k", "0" * 32)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch("ml-100k", cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_fetch_not_a_zip(server: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/ml-1m.zip"] = b"<html>gateway error</html>"
    _pin(monkeypatch, "ml-1m", hashlib.md5(b"<html>gateway error</html>").hexdigest())
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="not a valid zip"):
        fetch("ml-1m", cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_fetch_http_404(server: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404") as info:
        fetch("ml-1m", cache_dir=tmp_path / "cache", progress=False)
    assert "ml-1m.zip" in str(info.value) and "--data PATH" in str(info.value)
    assert not (tmp_path / "cache" / "ml-1m").exists()


def test_fetch_unreachable_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Port 9 (discard) on localhost refuses connections on test machines: no traffic leaves the host.
    monkeypatch.setenv(download.BASE_URL_ENV, "http://127.0.0.1:9/")
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DownloadError, match="127.0.0.1:9"):
        fetch("ml-1m", cache_dir=tmp_path, progress=False)


def test_fetch_unknown_name_and_default_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(UnknownDatasetError, match="ml-100k"):
        fetch("ml-7m")
    monkeypatch.setenv(download.DATA_DIR_ENV, str(tmp_path))
    assert download.default_cache_dir() == tmp_path
    monkeypatch.delenv(download.DATA_DIR_ENV)
    assert download.default_cache_dir() == Path.home() / ".cache" / "recforge"
