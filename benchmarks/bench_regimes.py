"""The regime suite: data of different shapes built from what is at hand, and every model's score with its
defaults, auto-tuned, and after a long search.

Usage::

    python benchmarks/bench_regimes.py                                   # every regime, the default models
    python benchmarks/bench_regimes.py --regimes sessions,playcounts --models pop,ease,als --long-trials 20
    python benchmarks/bench_regimes.py --source ../shared/data/ml-100k   # the regimes cut from ML-100K

Regimes, all cut from one MovieLens source (default: the embedded ml-latest-small):

``movielens``   as it is
``sessions``    each user's history cut at gaps of more than 30 minutes; every session of 3+ events is a "user"
``playcounts``  no timestamps, one row per (user, item) with a play count in the ``weight`` column (log-normal,
                median 20, a long tail into the thousands), no ratings, rows shuffled (file order is not time)
``sparse``      MovieLens is too small for it: the synthetic generator's 6,000 users × 20,000 items, 60,000 events
                (density 0.06%), clustered tastes, popularity skew
``short``       each user's last 5 events only
``ratings-10``  ratings mapped linearly onto −10…10 (jokes)
``ratings-1-10``  ratings doubled onto 1–10 (books)
``sparse-ratings``  the ``sparse`` generator with its ratings mapped onto 1–10 (books are sparse too)

Top-N models run on the regimes without a rating scale of their own (``movielens`` to ``short``), rating models on
those with ratings (``movielens`` and the three rating regimes).

Every regime is split leave-last-one-out (without timestamps the last row, which the shuffle makes a random one) and
run through the one fitting pipeline three times: ``--no-tune`` (the defaults), auto-tuned (the default budget), and
a long search (``--long-trials`` trials of the same search space, without the keep-the-defaults rule). Top-N
models report test NDCG@10 against popularity; rating models test RMSE against the bias model. Results:
``benchmarks/results/regimes.json`` and a table per regime.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
TOP_N = ("pop", "itemknn", "ease", "als", "bpr")
RATING = ("bias", "funksvd", "svdpp", "biasedals")
REGIMES = ("movielens", "sessions", "playcounts", "sparse", "short", "ratings-10", "ratings-1-10", "sparse-ratings")
#: Regimes that only rescale or re-draw ratings: top-N models would score as on the regime they came from.
RATING_ONLY = ("ratings-10", "ratings-1-10", "sparse-ratings")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="ml-latest-small", help="a MovieLens dataset name or folder")
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--models", default=",".join(TOP_N + RATING))
    p.add_argument("--long-trials", type=int, default=40)
    p.add_argument("--modes", default="default,tuned,long", help="which of default, tuned, long to run")
    p.add_argument("--out", default=str(HERE / "results" / "regimes.json"))
    return p.parse_args()


def _keep_users(frame: pd.DataFrame, column: str, at_least: int) -> pd.DataFrame:
    counts = frame[column].map(frame[column].value_counts())
    return frame[counts >= at_least]


def build(regime: str, frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The regime's events as a frame (user_id, item_id[, rating][, timestamp])."""
    rng = np.random.default_rng(seed)
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    if regime == "movielens":
        return frame
    if regime == "sessions":
        gap = frame.groupby("user_id")["timestamp"].diff().fillna(np.inf) > 30 * 60
        session = gap.cumsum()
        out = frame.assign(user_id=session).drop(columns="rating")
        return _keep_users(out, "user_id", 3)
    if regime == "playcounts":  # one row per (user, item) with its play count, as music logs are published
        plays = np.maximum(1, np.round(rng.lognormal(np.log(20), 1.5, len(frame)))).astype(np.int64)
        out = frame[["user_id", "item_id"]].assign(weight=plays)
        return out.iloc[rng.permutation(len(out))].reset_index(drop=True)
    if regime in ("sparse", "sparse-ratings"):  # MovieLens is too small to be this sparse: the generator
        from recforge.datasets import make_synthetic

        rated = regime == "sparse-ratings"
        frame = make_synthetic(n_users=6000, n_items=20000, n_interactions=60000, ratings=rated, seed=seed).to_frame()
        if rated:
            low, high = frame["rating"].min(), frame["rating"].max()
            frame = frame.assign(rating=1 + 9 * (frame["rating"] - low) / (high - low))
        return frame
    if regime == "short":
        return frame.groupby("user_id").tail(5)
    if regime == "ratings-10":
        low, high = frame["rating"].min(), frame["rating"].max()
        return frame.assign(rating=-10 + 20 * (frame["rating"] - low) / (high - low))
    if regime == "ratings-1-10":
        return frame.assign(rating=2 * frame["rating"])
    raise SystemExit(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}")


def _scores(result, models: list[str]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    out = {}
    for name in models:
        if name in result.results:
            summary = result.results[name].summary
            out[name] = float(summary["rmse"] if name in RATING else summary["ndcg@10"])
    return out


def _units(result, name: str) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    """What the score averages: squared errors per test row or, in results merged from the pipeline's trials,
    each test user's mean squared error (RMSE; one row per user under leave-one-out), or NDCG@10 per test user."""
    found = result.results[name]
    table = found.per_user.sort_values("user_id")  # paired by user across runs
    if name not in RATING:
        units = table.get("ndcg@10")
    elif found.squared_errors is not None:
        units = found.squared_errors
    elif {"rating_sse", "rating_n"} <= set(table.columns):
        units = table["rating_sse"] / table["rating_n"]
    else:
        units = None
    return None if units is None else np.asarray(units, np.float64)


def noise(a: np.ndarray, b: np.ndarray, name: str) -> float:
    """Half-width of the 95% interval of the paired difference between two runs on the same test rows/users
    (for RMSE through the difference of mean squared errors, divided by 2·RMSE)."""
    d = a - b
    half = 1.96 * float(d.std(ddof=1)) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return half / (2 * np.sqrt(b.mean())) if name in RATING else half


def run_regime(data, models: list[str], long_trials: int, folder: Path,  # type: ignore[no-untyped-def]
               rating_only: bool = False, modes: tuple[str, ...] = ("default", "tuned", "long"),
               before: dict | None = None) -> dict:
    from recforge.experiments import compare
    from recforge.models import get_model_class

    usable = [m for m in models if (m in RATING and data.ratings is not None) or (m not in RATING and not rating_only)]
    row: dict = {**(before or {}), "data": data.regime(), "noise": {}}
    units: dict[str, dict[str, np.ndarray]] = {}
    for mode in modes:
        started = time.perf_counter()
        if mode == "long":
            spec = {m: {"name": m, "space": dict(get_model_class(m).search_space)} for m in usable
                    if get_model_class(m).search_space}
            spec.update({m: {"name": m} for m in usable if m not in spec})
            result = compare(data, spec, progress=False, out=folder / mode, tune_trials=long_trials)
        else:
            result = compare(data, usable, progress=False, out=folder / mode, tune=mode == "tuned")
        row[mode] = _scores(result, usable)
        row[f"{mode} params"] = {name: {k: v for k, v in params.items() if k != "progress"}
                                 for name, params in result.params.items()}
        units[mode] = {name: found for name in row[mode] if (found := _units(result, name)) is not None}
        row[f"{mode} seconds"] = time.perf_counter() - started
        print(f"  {mode}: {row[mode]} ({row[f'{mode} seconds']:.0f} s)", flush=True)
    for name in row.get("tuned", {}) if {"tuned", "long"} <= set(units) else ():
        if name in units["long"] and name in units["tuned"] and len(units["long"][name]) == len(units["tuned"][name]):
            row["noise"][name] = noise(units["tuned"][name], units["long"][name], name)
    return row


def table(rows: dict) -> str:
    out = []
    for regime, row in rows.items():
        out.append(f"\n**{regime}** — {row['data']}\n")
        out.append("| model | default | auto-tuned | long search | tuned − long (95% noise) | floor |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for name in row["default"]:
            floor = row["default"].get("bias" if name in RATING else "pop")
            cells = [row.get(m, {}).get(name) for m in ("default", "tuned", "long")]
            text = [f"{c:.4f}" if c is not None else "" for c in cells]
            gap = ""
            if cells[1] is not None and cells[2] is not None and name in row.get("noise", {}):
                gap = f"{cells[1] - cells[2]:+.4f} (±{row['noise'][name]:.4f})"
            out.append(f"| {name} | " + " | ".join([*text, gap, f"{floor:.4f}" if floor is not None else ""]) + " |")
    return "\n".join(out)


def main() -> None:
    args = _args()
    from recforge.data import Interactions
    from recforge.datasets import load

    source = load(args.source).to_frame()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="recforge-regimes-") as tmp:
        for regime in [r.strip() for r in args.regimes.split(",") if r.strip()]:
            frame = build(regime, source)
            data = Interactions.from_frame(frame, weight_col="weight" if "weight" in frame else None)
            print(f"{regime}: {data.regime()}", flush=True)
            modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
            results[regime] = run_regime(data, models, args.long_trials, Path(tmp) / regime, regime in RATING_ONLY,
                                         modes, results.get(regime))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))


if __name__ == "__main__":
    main()
