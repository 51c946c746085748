"""Run the notebook reproduction configs (``examples/nb00*``) and print their tables next to the notebooks' figures.

Usage (from the repository root)::

    python benchmarks/bench_reproductions.py                    # every config, full settings
    python benchmarks/bench_reproductions.py --quick            # neural epochs capped at 2, FunkSVD at 10 epochs,
                                                                # 1 test episode: checks the wiring in a few minutes
    python benchmarks/bench_reproductions.py --only nb001,nb004-explicit
    /work/peers/bin/python benchmarks/bench_reproductions.py --only nb001-lenskit   # notebook 001's library

Each config runs through :func:`recforge.experiments.run_experiment` exactly as ``recforge run CONFIG`` would,
into ``results/repro/<config name>`` (``--quick`` runs go to ``results/repro-quick/``; a finished run is read back,
not rerun). Notebook 000's interactive workflow runs ``recforge simulate`` (``examples/nb000_interactive.sh``).

Threads: ``--threads N`` (default 2) limits BLAS, numba and torch; models with ``num_threads`` use them all.
Results: ``benchmarks/results/reproductions.json`` (``--quick``: ``reproductions_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: config key → (file, what the notebook ran on).
CONFIGS: dict[str, tuple[str, str]] = {
    "nb001": ("nb001_funksvd.yaml", "MovieLens-20M, LensKit FunkSVD 40 features / 120 iterations, 1 of the 5 folds run"),
    "nb002": ("nb002_gru_session.yaml", "own session data (a movie catalogue), GRU stopped on validation MAP@20"),
    "nb003": ("nb003_sasrec_losses.yaml", "MovieLens-1M, early stopping on validation"),
    "nb004-explicit": ("nb004_homework_explicit.yaml", "ML-100K random 80/20, Spotlight ExplicitFactorizationModel"),
    "nb004-sequence": ("nb004_homework_sequence.yaml", "ML-100K held-out users, Spotlight pooling (n_iter=3)"),
}
#: The notebooks' own figures: config key → our row label → metric → value.
NOTEBOOK: dict[str, dict[str, dict[str, float]]] = {
    "nb001": {"FunkSVD 40f/120ep": {"rmse": 0.8577, "rating_ndcg": 0.9695}},
    "nb002": {"GRU (notebook 002)": {"map@20": 0.02989, "precision@1": 0.037141, "precision@5": 0.038634,
                                     "precision@10": 0.040309, "precision@20": 0.044984}},
    "nb003": {
        "SASRec BCE (original)": {"dcg@5": 0.02677, "dcg@10": 0.04128, "dcg@20": 0.05957, "hr@5": 0.05037,
                                  "hr@10": 0.09571, "hr@20": 0.16853, "coverage@5": 0.74678,
                                  "coverage@10": 0.78893, "coverage@20": 0.82992},
        "SASRec full softmax": {"dcg@5": 0.03322, "dcg@10": 0.04847, "dcg@20": 0.06610, "hr@5": 0.05689,
                                "hr@10": 0.10446, "hr@20": 0.17449, "coverage@5": 0.91013, "coverage@10": 0.93794,
                                "coverage@20": 0.96253},
        "SASRec in-batch": {"dcg@5": 0.01115, "dcg@10": 0.01996, "dcg@20": 0.03258, "hr@5": 0.02086,
                            "hr@10": 0.04856, "hr@20": 0.09898, "coverage@5": 0.86680, "coverage@10": 0.94438,
                            "coverage@20": 0.98331},
        "SASRec in-batch logQ": {"dcg@5": 0.01784, "dcg@10": 0.03048, "dcg@20": 0.04727, "hr@5": 0.03324,
                                 "hr@10": 0.07282, "hr@20": 0.13977, "coverage@5": 0.47395, "coverage@10": 0.57143,
                                 "coverage@20": 0.65369},
    },
    "nb004-explicit": {"FunkSVD": {"rmse": 0.9924}, "Global mean (notebook baseline)": {"rmse": 1.1218}},
    "nb004-sequence": {"Pooling": {"mrr": 0.0416}, "MostPopular": {"mrr": 0.0248}},
    #: notebook 000's test episode: 4,998 clicks in 16,990 slates in its own competition environment
    "nb000": {"hybrid": {"test ctr": 4998 / 16990}},
}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced epochs / episodes (a wiring check, not a result)")
    p.add_argument("--only", default=None, help="comma-separated keys: " + ",".join([*CONFIGS, "nb000"])
                   + "; nb001-lenskit (LensKit FunkSVD on nb001's folds, run with the peers' python)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np

from recforge.evaluation.rating import rating_gain_ndcg
from recforge.experiments import ExperimentConfig, run_experiment


def quick(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with neural epochs capped at 2 and FunkSVD / SVD++ at 10 epochs."""
    raw = cfg.to_dict()
    for spec in raw["models"]:
        if "epochs" in spec["params"]:
            spec["params"]["epochs"] = min(spec["params"]["epochs"], 10 if spec["name"] in ("funksvd", "svdpp") else 2)
        elif spec["name"] in ("gru4rec", "sasrec", "pooling", "bert4rec", "funksvd", "svdpp"):
            spec["params"]["epochs"] = 2 if spec["name"] not in ("funksvd", "svdpp") else 10
        if "epochs" in spec["grid"]:
            spec["grid"]["epochs"] = [1, 2]
    raw["name"] += "-quick"
    return ExperimentConfig.from_dict(raw)


def _clean(rec: dict) -> dict:
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in rec.items()}


def run_config(key: str, is_quick: bool) -> dict:
    file, setting = CONFIGS[key]
    cfg = ExperimentConfig.from_file(ROOT / "examples" / file)
    if is_quick:
        cfg = quick(cfg)
    out = ROOT / "results" / ("repro-quick" if is_quick else "repro") / cfg.name
    start = time.perf_counter()
    table = run_experiment(cfg, out, progress=False).leaderboard
    seconds = time.perf_counter() - start
    selected = json.loads((out / "selected_params.json").read_text())
    import pandas as pd

    per_label = pd.read_csv(out / "trials.csv").groupby("label")["seconds"].sum()  # fit + evaluation, all trials
    rows = [{**_clean(rec), "params": selected.get(rec["model"]), "trial_seconds": float(per_label[rec["model"]]),
             "notebook": NOTEBOOK[key].get(rec["model"], {})} for rec in table.to_dict("records")]
    # "seconds": this invocation's wall time (near 0 when every trial was read back from an earlier run);
    # "trial_seconds": fit + evaluation of every trial of the experiment, whenever it ran
    return {"config": f"examples/{file}", "out": str(out.relative_to(ROOT)), "notebook_setting": setting,
            "metrics": cfg.metrics, "seconds": seconds, "trial_seconds": float(per_label.sum()), "rows": rows}


def run_nb000(is_quick: bool) -> dict:
    """Notebook 000's workflow through ``recforge simulate`` (the command of examples/nb000_interactive.sh)."""
    out = ROOT / "results" / ("repro-quick" if is_quick else "repro") / "nb000-interactive"
    cmd = [sys.executable, "-m", "recforge", "simulate", "-d", "ml-latest-small",
           "--policies", "random,pop,greedy-static,hybrid,linucb", "--train-episodes", "1",
           "--test-episodes", "1" if is_quick else "5", "--seed", "0", "-o", str(out), "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    import pandas as pd

    table = pd.read_csv(out / "results.csv")
    rows = [{**_clean(r), "notebook": NOTEBOOK["nb000"].get(r["policy"], {})} for r in table.to_dict("records")]
    return {"config": "examples/nb000_interactive.sh", "out": str(out.relative_to(ROOT)),
            "command": " ".join(["recforge", *cmd[3:]]), "seconds": seconds, "rows": rows,
            "notebook_setting": "DataLab Cup 4 news environment (not available); hybrid FunkSVD + content slate"}


def run_lenskit_nb001() -> dict:
    """Notebook 001's own library on our splits: LensKit FunkSVD (40 features, 120 epochs, its other defaults,
    bias fallback) on the same seeded user folds as ``examples/nb001_funksvd.yaml`` (needs the peers' venv)."""
    sys.path.insert(0, str(HERE))
    from bench_explicit import lenskit_runner
    from lenskit.funksvd import FunkSVDScorer

    from recforge.experiments.trials import make_splits

    cfg = ExperimentConfig.from_file(ROOT / "examples" / CONFIGS["nb001"][0])
    rmses, ndcgs, seconds = [], [], []
    for split in make_splits(cfg):
        pred, fit_s = lenskit_runner(lambda: FunkSVDScorer(embedding_size=40, epochs=120))(split)
        truth = split.test.ratings.astype(np.float64)
        rmses.append(float(np.sqrt(np.mean((pred - truth) ** 2))))
        ndcgs.append(rating_gain_ndcg(split.test.users, truth, pred)[1])
        seconds.append(fit_s)
    return {"model": "LensKit FunkSVD 40f/120ep (peer, same folds)", "rmse": float(np.mean(rmses)),
            "rating_ndcg": float(np.concatenate(ndcgs).mean()), "fit_seconds_per_fold": float(np.mean(seconds))}


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def markdown(key: str, res: dict) -> str:
    took = res.get("trial_seconds", res["seconds"])
    lines = [f"### {key} ({res['config']}, {took:.0f} s)", ""]
    if key == "nb000":
        cols = ["policy", "test ctr", "test ctr ci", "avg score", "train ctr"]
        cols = [c for c in cols if c in res["rows"][0]] or list(res["rows"][0])[:5]
    else:
        cols = ["model"]
        for m in res["metrics"]:
            cols.append(m)
    lines.append("| " + " | ".join([*cols, "notebook"]) + " |")
    lines.append("|" + "---|" * (len(cols) + 1))
    for r in res["rows"]:
        cells = []
        for c in cols:
            v = r.get(c)
            lo, hi = r.get(f"{c}_lo"), r.get(f"{c}_hi")
            cells.append(f"{fmt(v)} ({lo:.4f}–{hi:.4f})" if lo is not None and hi is not None else fmt(v))
        nb = ", ".join(f"{k} {v:.4f}" for k, v in r["notebook"].items())
        lines.append("| " + " | ".join([*cells, nb]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    assert ARGS is not None
    keys = [k.strip() for k in (ARGS.only or ",".join([*CONFIGS, "nb000"])).split(",") if k.strip()]
    path = Path(ARGS.out or HERE / "results" / ("reproductions_quick.json" if ARGS.quick else "reproductions.json"))
    results = json.loads(path.read_text()) if path.exists() else {}
    for key in keys:
        if key == "nb001-lenskit":
            results.setdefault("nb001", {})["peer"] = peer = run_lenskit_nb001()
            print(peer, flush=True)
            path.write_text(json.dumps(results, indent=2, default=str))
            continue
        res = run_nb000(ARGS.quick) if key == "nb000" else run_config(key, ARGS.quick)
        old = results.get(key, {})
        if "peer" in old:
            res["peer"] = old["peer"]
        res["threads"] = ARGS.threads
        results[key] = res
        print(markdown(key, res), flush=True)
        path.write_text(json.dumps(results, indent=2, default=str))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
