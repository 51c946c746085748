"""Parallel trials: one 3-model × 3-fold experiment on ML-100K, serially and on 2 workers (Ray, process pool).

Usage::

    python benchmarks/bench_parallel.py                  # ../shared/data/ml-100k, every backend, 3 repeats
    python benchmarks/bench_parallel.py --backends serial,ray --repeats 1

The experiment is the same config for every backend: ``kfold3`` on ML-100K (every row in one test fold) and three
models. ``--grid sequential`` (default): SASRec, GRU4Rec and BERT4Rec, 10 epochs each, nine trials of 40-60 s
each on one thread. ``--grid mixed``: BPR 300 epochs, pointwise MF 60 epochs and SASRec 8 epochs, three long
trials and six short ones. ``--grid tuned``: ``recforge compare``'s default leaderboard on the embedded
ml-latest-small (leave-one-out), every model searched on validation (at most 8 trials each, one at a time per
model), then refitted: the workers pay there by running the models' searches side by side. Each figure is the wall time of the whole ``run_experiment`` call into a fresh folder, including
starting and stopping the workers (and Ray itself), and reading the data. Two serial baselines:

- ``serial``: one trial at a time with every core to each trial (BLAS, numba and torch threads), what a user gets
  without ``--workers``;
- ``serial-1t``: one trial at a time with one thread, the same per-trial resources as each parallel worker.

The median of ``--repeats`` runs is reported, with the ratio to both baselines, the sum of the trials' own
seconds (above serial-1t's when parallel trials slow each other down), and the best wall time any schedule of the
one-thread trial times could reach on the workers. Results:
``benchmarks/results/parallel_<grid>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
ML100K = HERE.parents[1] / "shared" / "data" / "ml-100k"


GRIDS = {
    "sequential": [{"name": "sasrec", "params": {"epochs": 10}}, {"name": "gru4rec", "params": {"epochs": 10}},
                   {"name": "bert4rec", "params": {"epochs": 10}}],
    "mixed": [{"name": "bpr", "params": {"epochs": 300}}, {"name": "pointwise", "params": {"epochs": 60}},
              {"name": "sasrec", "params": {"epochs": 8}}],
}


#: ``recforge compare``'s default leaderboard, every model searched in its own space (8 trials at most).
TUNED = ["random", "pop", "itemknn", "ease", "als", "bpr", "funksvd"]


def config(data: str, grid: str) -> dict:
    if grid == "tuned":
        return {"name": "parallel-tuned", "dataset": "ml-latest-small", "protocol": "loo", "seed": 0,
                "models": TUNED, "tune": True, "search": {"n_trials": 8}}
    return {"name": f"parallel-3x3-{grid}", "dataset": data, "protocol": "kfold3", "k": [10], "seed": 0,
            "models": GRIDS[grid]}


def best_makespan(seconds: list[float], workers: int) -> float:
    """The shortest wall time any schedule of these indivisible trials can reach on ``workers`` workers that do
    not slow each other down: exact for two workers (every split into two sets), a lower bound otherwise."""
    bound = max(max(seconds), sum(seconds) / workers)
    if workers != 2 or len(seconds) > 20:
        return bound
    total, best = sum(seconds), float("inf")
    for mask in range(1 << (len(seconds) - 1)):  # the last trial's side is fixed: halves the search
        side = sum(s for i, s in enumerate(seconds) if mask >> i & 1)
        best = min(best, max(side, total - side))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ML100K), help="the ml-100k folder (or any dataset name/path)")
    p.add_argument("--grid", choices=[*sorted(GRIDS), "tuned"], default="sequential")
    p.add_argument("--backends", default="serial,serial-1t,ray,process")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="default: benchmarks/results/parallel_<grid>.json")
    args = p.parse_args()

    from recforge.experiments import ExperimentConfig, run_experiment
    from recforge.experiments.executors import ray_available

    cfg = ExperimentConfig.from_dict(config(args.data, args.grid))
    runs: dict[str, list[float]] = {}
    ndcg: dict[str, float] = {}
    trials: dict[str, list[float]] = {}  # each trial's own seconds (fit + evaluation), last repeat
    for backend in [b.strip() for b in args.backends.split(",")]:
        if backend == "ray" and not ray_available():
            print("ray: not installed, skipped")
            continue
        for _ in range(args.repeats):
            folder = Path(tempfile.mkdtemp(prefix="recforge-par-"))
            kwargs = {"backend": "serial", "workers": 1}
            if backend == "serial-1t":
                kwargs["threads_per_worker"] = 1
            elif backend != "serial":
                kwargs = {"backend": backend, "workers": args.workers}
            start = time.perf_counter()
            table = run_experiment(cfg, folder, progress=False, **kwargs).leaderboard
            runs.setdefault(backend, []).append(time.perf_counter() - start)
            ndcg[backend] = float(table["ndcg@10"].max())
            trials[backend] = sorted(json.loads(f.read_text())["seconds"] for f in (folder / "trials").glob("*.json"))
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{backend}: {runs[backend][-1]:.1f} s", flush=True)
    med = {b: median(v) for b, v in runs.items()}
    what = (f"{len(TUNED)} models searched on ml-latest-small" if args.grid == "tuned"
            else f"3 models × 3 folds on {Path(args.data).name}")
    print(f"\n{args.grid} grid, {what}, {args.workers} workers, median of {args.repeats}\n")
    print("| backend | wall s | vs serial | vs serial-1t | sum of trial s | best NDCG@10 |")
    print("|---|---:|---:|---:|---:|---:|")
    for b, sec in med.items():
        r1 = f"{sec / med['serial']:.2f}" if "serial" in med else "-"
        r2 = f"{sec / med['serial-1t']:.2f}" if "serial-1t" in med else "-"
        print(f"| {b} | {sec:.1f} | {r1} | {r2} | {sum(trials[b]):.1f} | {ndcg[b]:.4f} |")
    if "serial-1t" in trials:
        floor = best_makespan(trials["serial-1t"], args.workers)
        print(f"\nwith {args.workers} workers and the one-thread trial times, no schedule beats {floor:.1f} s "
              f"({floor / med['serial-1t']:.2f} of serial-1t); a parallel 'sum of trial s' above serial-1t's is "
              "the trials slowing each other down (shared caches, memory bandwidth, the driver)")
    out = Path(args.out or HERE / "results" / f"parallel_{args.grid}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config(args.data, args.grid), "workers": args.workers, "runs": runs,
                               "median": med, "trial_seconds": trials, "best_ndcg@10": ndcg}, indent=1))


if __name__ == "__main__":
    main()
