"""Serving benchmark: a real `recforge serve` process on loopback under an open-loop load generator.

Usage::

    python benchmarks/bench_serve.py                       # EASE and SASRec on ml-latest-small, every part
    python benchmarks/bench_serve.py --models ease --parts sustained --seconds 20

The load generator (asyncio + aiohttp, one process) sends requests on a fixed schedule — request ``i`` at
``t0 + i / rate`` whatever the server does — and measures each latency from its *scheduled* time, so a stalled
server shows up as latency instead of silently slowing the load (no coordinated omission). Users are drawn
uniformly from the dataset's users.

Parts:

``sustained``  ``GET /recommend?user=..&k=10`` at ``--rate`` (500) requests/s for ``--seconds`` (60): p50/p95/p99,
               errors, achieved rate.
``max``        10-second steps at increasing rates; the highest rate with 0 errors and p99 under 25 ms.
``overload``   twice ``--rate`` for 10 s: how much is shed (503) and how fast those answers come, and the p99 of the
               requests that were served.
``mixed``      90% recommend, 10% ``POST /feedback`` (one event) at ``--rate`` for ``--seconds``, on a disk whose every
               ``fsync`` takes ``--fsync-ms`` (10) longer (simulated in the server process); then the server is
               killed with SIGKILL, restarted, and the acknowledged events are counted in the replayed log.
``swap``       the mixed load while ``POST /admin/reload`` hot-swaps the artifact every 5 s: failed requests, and the
               acknowledged feedback found in the log after a restart.

Models are trained on the embedded ml-latest-small (SASRec: softmax loss, 200 max length, 5 epochs — latency
does not depend on how long it trained). ``als-1m`` is a 64-factor ALS on a synthetic catalogue of a million items
(50,000 users, 3 million events): its artifact carries an HNSW graph, the service answers from it, and the recall@10
of those answers against exact scoring is reported for 1,000 users. One server worker, one thread for numpy/torch in the server; the load
generator runs on the other core. Results: ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ease,sasrec,als-1m")
    p.add_argument("--parts", default="sustained,max,overload,mixed,swap")
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--steps", default="500,750,1000,1250,1500,2000")
    p.add_argument("--fsync-ms", type=float, default=10.0)
    p.add_argument("--out", default=str(HERE / "results" / "serve.json"))
    p.add_argument("--artifacts", default=None, help="keep the trained models here and reuse them on later runs")
    return p.parse_args()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Starts the CLI with every ``fsync`` made slower by FSYNC_MS milliseconds: a slow disk, simulated.
_SLOW_DISK = ("import os, sys, time\n"
              "delay, real = float(os.environ['FSYNC_MS']) / 1000, os.fsync\n"
              "os.fsync = lambda fd: (time.sleep(delay), real(fd))[1]\n"
              "from recforge.cli import main\n"
              "sys.argv[0] = 'recforge'\n"
              "main()\n")


def start_server(artifact: Path, port: int, feedback: Path, fsync_ms: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "RECFORGE_API_KEY": "bench", "FSYNC_MS": str(fsync_ms)}
    launcher = ["-c", _SLOW_DISK] if fsync_ms else ["-m", "recforge"]
    proc = subprocess.Popen([sys.executable, *launcher, "serve", str(artifact), "--port", str(port),
                             "--feedback-dir", str(feedback)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def _reloads(session, base: str, every: float, until: float, codes: list) -> None:  # type: ignore[no-untyped-def]
    import aiohttp

    while time.perf_counter() + every < until:
        await asyncio.sleep(every)
        try:
            async with session.post(f"{base}/admin/reload", headers={"X-API-Key": "bench"},
                                    timeout=aiohttp.ClientTimeout(total=120)) as r:
                await r.read()
                codes.append(r.status)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            codes.append(-1)


async def _load(port: int, rate: float, seconds: float, users: list, items: list, feedback_share: float,
                seed: int = 0, reload_every: float = 0.0) -> dict:
    import aiohttp

    rng = random.Random(seed)
    n = int(rate * seconds)
    latencies = np.full(n, np.nan)
    status = np.zeros(n, np.int32)
    kinds = np.zeros(n, np.int8)
    base = f"http://127.0.0.1:{port}"
    conn = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=10),
                                     headers={"X-API-Key": "bench"}) as session:
        t0 = time.perf_counter() + 0.1
        reload_codes: list[int] = []
        reloader = (asyncio.create_task(_reloads(session, base, reload_every, t0 + seconds, reload_codes))
                    if reload_every else None)

        async def one(i: int) -> None:
            scheduled = t0 + i / rate
            try:
                if rng.random() < feedback_share:
                    kinds[i] = 1
                    body = {"events": [{"user": rng.choice(users), "item": rng.choice(items)}]}
                    async with session.post(f"{base}/feedback", json=body, headers={"X-API-Key": "bench"}) as r:
                        await r.read()
                        status[i] = r.status
                else:
                    async with session.get(f"{base}/recommend", params={"user": str(rng.choice(users)), "k": "10"}) as r:
                        await r.read()
                        status[i] = r.status
            except Exception:  # noqa: BLE001 - any failure is an error of the run
                status[i] = -1
            latencies[i] = time.perf_counter() - scheduled

        running: set[asyncio.Task] = set()
        for i in range(n):  # open loop: each request is started at its scheduled time, answered or not
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i))
            running.add(task)
            task.add_done_callback(running.discard)
        while running:
            await asyncio.gather(*list(running))
        elapsed = time.perf_counter() - t0
        if reloader is not None:
            await reloader
    ok = status == 200
    lat = latencies[ok] * 1000
    by_kind = {}
    for kind, label in ((0, "recommend"), (1, "feedback")):
        sel = latencies[ok & (kinds == kind)] * 1000
        if len(sel) and feedback_share > 0:
            by_kind[f"{label} p99 ms"] = float(np.percentile(sel, 99))
    shed = status == 503
    extra = {"shed (503)": int(shed.sum()), "503 p99 ms": float(np.percentile(latencies[shed] * 1000, 99))} \
        if shed.any() else {}
    if reload_every:
        extra["reloads ok"] = f"{reload_codes.count(200)}/{len(reload_codes)}"
    return {**by_kind, **extra,
        "rate": rate, "seconds": seconds, "requests": n, "errors": int((~ok).sum()),
        "achieved rps": n / elapsed, "p50 ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p95 ms": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
        "p99 ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "max ms": float(lat.max()) if len(lat) else float("nan"),
        "feedback acked": int((ok & (kinds == 1)).sum()),
    }


def load(port: int, rate: float, seconds: float, users: list, items: list, feedback_share: float = 0.0,
         reload_every: float = 0.0) -> dict:
    """Run one open-loop load. The generator's own garbage collector is paused meanwhile: a full collection in
    the client would stall its event loop and be measured as server latency."""
    import gc

    gc.collect()
    gc.disable()
    try:
        return asyncio.run(_load(port, rate, seconds, users, items, feedback_share, reload_every=reload_every))
    finally:
        gc.enable()


def _health(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


#: The million-item catalogue: synthetic events (clustered tastes, mild popularity skew) and a 64-factor ALS.
LARGE = {"n_users": 50_000, "n_items": 1_000_000, "n_interactions": 3_000_000, "n_clusters": 64,
         "popularity_alpha": 0.5, "ratings": False, "seed": 0}


def train(name: str, folder: Path):  # type: ignore[no-untyped-def]
    from recforge.datasets import load as load_dataset
    from recforge.datasets import make_synthetic
    from recforge.models import Recommender, create_model

    if (folder / name / "model.json").exists():  # --artifacts: trained by an earlier run
        model = Recommender.load(folder / name)
        return folder / name, [int(u) for u in model.user_map_.ids], [int(i) for i in model.item_map_.ids]
    started = time.perf_counter()
    if name == "als-1m":
        data = make_synthetic(**LARGE)
        model = create_model("als", n_factors=64, epochs=3, progress=False).fit(data)
    else:
        data = load_dataset("ml-latest-small")
        params = {"ease": {}, "sasrec": {"loss": "softmax", "max_len": 200, "epochs": 5, "progress": False}}[name]
        model = create_model(name, **params).fit(data)
    path = model.save(folder / name)  # a million items and more: with its HNSW graph
    print(f"{name}: trained and saved in {time.perf_counter() - started:.0f} s", flush=True)
    return path, [int(u) for u in data.user_map.ids], [int(i) for i in data.item_map.ids]


def ann_recall(path: Path, n_users: int = 1000, k: int = 10) -> dict:
    """recall@k of what the service answers from its HNSW index against exact scoring of every item, for a
    seeded sample of users (seen items excluded both ways)."""
    from recforge.models import Recommender
    from recforge.serve.app import Loaded

    model = Recommender.load(path)
    served = Loaded(model, path, ann_min_items=1)
    users = np.sort(np.random.default_rng(0).choice(model.n_users_, min(n_users, model.n_users_), replace=False))
    started = time.perf_counter()
    approx, _ = served.top_k(users, k, exclude_seen=True)
    ann_ms = (time.perf_counter() - started) * 1000 / len(users)
    started = time.perf_counter()
    exact, _ = model.recommend_indices(users, k, model.seen_)
    exact_ms = (time.perf_counter() - started) * 1000 / len(users)
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approx, exact)]
    return {f"recall@{k}": float(np.mean(hits)), "users": len(users), "ann ms/user": ann_ms,
            "exact ms/user": exact_ms, "items": model.n_items_}


def md(rows: list[dict]) -> str:
    cols = list(rows[0].keys())
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        out += "| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |\n"
    return out


def main() -> None:
    args = _args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            artifact, users, items = train(name, Path(args.artifacts or tmp))
            port, feedback = _free_port(), Path(tmp) / f"feedback-{name}"
            rows = results.setdefault(name, {})
            if name == "als-1m":
                rows["recall"] = ann_recall(artifact)
                print(name, "ANN against exact", rows["recall"], flush=True)
            proc = start_server(artifact, port, feedback)
            try:
                load(port, 200, 3, users, items)  # warm-up: JIT, caches
                if "sustained" in parts:
                    rows["sustained"] = load(port, args.rate, args.seconds, users, items)
                    print(name, "sustained", rows["sustained"], flush=True)
                if "max" in parts:
                    steps = []
                    for rate in [float(r) for r in args.steps.split(",")]:
                        res = load(port, rate, 10, users, items)
                        steps.append(res)
                        print(name, "step", res, flush=True)
                        if res["errors"] or res["p99 ms"] >= 25:
                            break
                    good = [s["rate"] for s in steps if not s["errors"] and s["p99 ms"] < 25]
                    rows["max"] = {"steps": steps, "max sustainable rps": max(good) if good else 0.0}
                if "overload" in parts:
                    rows["overload"] = load(port, 2 * args.rate, 10, users, items)
                    print(name, "overload", rows["overload"], flush=True)
                if "mixed" in parts or "swap" in parts:  # on a slow disk, from an empty log
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=20)
                    feedback = Path(tmp) / f"feedback-{name}-slow"
                    proc = start_server(artifact, port, feedback, args.fsync_ms)
                    load(port, 200, 3, users, items)
                    acked = 0
                    for part in ("mixed", "swap"):
                        if part not in parts:
                            continue
                        res = load(port, args.rate, args.seconds, users, items, feedback_share=0.1,
                                   reload_every=5.0 if part == "swap" else 0.0)
                        acked += res["feedback acked"]
                        os.kill(proc.pid, signal.SIGKILL)  # nothing acknowledged may be lost, even so
                        proc.wait()
                        proc = start_server(artifact, port, feedback, args.fsync_ms)
                        replayed = _health(port)["feedback_events"]
                        res["fsync ms added"] = args.fsync_ms
                        res["replayed after kill -9"] = replayed
                        res["lost"] = max(0, acked - replayed)
                        rows[part] = res
                        print(name, part, res, flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    cols = ["model", "load", "rate", "achieved rps", "errors", "shed (503)", "p50 ms", "p95 ms", "p99 ms", "max ms",
            "recommend p99 ms", "feedback p99 ms", "feedback acked", "replayed after kill -9", "lost", "reloads ok"]
    rows = []
    for name in args.models.split(","):
        r = results.get(name, {})
        for part in ("sustained", "overload", "mixed", "swap"):
            if part in r:
                rows.append({c: r[part].get(c, "") for c in cols} | {"model": name, "load": part})
        if "max" in r:
            for step in r["max"]["steps"]:
                rows.append({c: step.get(c, "") for c in cols} | {"model": name, "load": "step"})
            print(f"{name}: max sustainable {r['max']['max sustainable rps']:.0f} rps (0 errors, p99 < 25 ms)")
        if "recall" in r:
            print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in r["recall"].items()))
    if rows:
        print(md(rows))

if __name__ == "__main__":
    main()
