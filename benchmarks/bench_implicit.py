"""Implicit-feedback top-N benchmark: recforge's implicit models against their peer libraries, same splits.

Usage (peers need the peer venv; without it the peer rows are skipped)::

    /work/peers/bin/python benchmarks/bench_implicit.py                    # ML-100K and ml-latest-small
    /work/peers/bin/python benchmarks/bench_implicit.py --quick            # ML-100K only, smaller grids
    /work/peers/bin/python benchmarks/bench_implicit.py --no-peers         # recforge models only
    /work/peers/bin/python benchmarks/bench_implicit.py --skip-slow-peers  # no RecTools EASE on latest-small
    python benchmarks/bench_implicit.py --threads 2 --models ease,rp3beta

Protocol (for every model, ours and the peers' alike):

1. leave-last-one-out (the registry's ``loo`` protocol): each user's last event is test, the one before it
   validation, the rest train (users with fewer than 3 events stay in train);
2. every combination of the model's grid (``GRIDS`` / ``PEER_GRIDS`` below) is fitted on ``train`` and scored on
   the validation event by NDCG@10 (seen = train items excluded); the best wins (ties: the first listed);
3. the winner is refitted on train + validation (``split.train_valid``) and evaluated on the test event ranking
   the whole catalogue minus the user's train + validation items: HR@10, NDCG@10 with a 95% percentile bootstrap
   CI over users (:func:`recforge.evaluation.bootstrap_ci`), MRR@100 (reciprocal rank of the test item when in
   the top 100, else 0), Coverage@10 (share of the catalogue in anybody's top 10) and the seconds of that
   final fit.

Peers are scored with the same code: their factors or item-item weights give a dense user × item score matrix,
wrapped in a tiny :class:`~recforge.models.Recommender` and passed to :func:`recforge.evaluation.evaluate`
(identical ranking, tie-break and exclusion). Fit seconds are wall-clock around the final fit call only, after
the grid search has already fitted the same model (so numba kernels are compiled/loaded from the disk cache and
not counted; implicit and RecTools are compiled ahead of time).

Threads: ``--threads N`` (default 1) sets OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS and
NUMBA_NUM_THREADS to N *before* numpy/numba are imported; recforge models get ``num_threads=N``, implicit
models ``num_threads=N``; RecTools EASE (``np.linalg.inv``) runs under the BLAS limit.

``GRIDS`` maps each table row to a registry name, fixed parameters and a grid; rows whose model is not
registered (yet) are skipped with a note, so the lead can fill in grids for models added later.
"""

from __future__ import annotations

import argparse
import os
import sys

from early_threads import early_threads

THREADS = early_threads(sys.argv[1:], 1)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import itertools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from recforge.data import Interactions
from recforge.data.datasets import load
from recforge.data.split import Split
from recforge.evaluation import bootstrap_ci, evaluate, get_protocol
from recforge.experiments import compare
from recforge.models import Recommender, available_models, get_model_class

REPO_ROOT = Path(__file__).resolve().parent.parent
ML100K_DIR = (REPO_ROOT / ".." / "shared" / "data" / "ml-100k").resolve()
log = logging.getLogger("bench_implicit")

# ====================================================================== grids (row -> model, fixed, grid)
#: Each row: ``model`` (registry name), ``fixed`` parameters, ``grid`` (name -> values; the cartesian product
#: is tried on the validation event), ``quick`` (a smaller grid for --quick; default: the full grid),
#: ``peer`` (the PEERS row it is compared with).
GRIDS: dict[str, dict[str, Any]] = {
    "pop": {"model": "pop", "grid": {}},
    "itemknn cosine": {
        "model": "itemknn",
        "fixed": {"weighting": "none"},
        "grid": {"n_neighbors": [2, 3, 5, 10, 20, 50, 100, 200], "shrink": [0, 10, 50]},
        "quick": {"n_neighbors": [10, 50], "shrink": [0, 10]},
        "peer": "implicit Cosine",
    },
    "itemknn bm25": {
        "model": "itemknn",
        "fixed": {"weighting": "bm25", "B": 0.75},
        "grid": {"n_neighbors": [5, 10, 20, 50, 100, 200], "K1": [1.2, 100.0], "similarity": ["dot", "cosine"]},
        "quick": {"n_neighbors": [10, 100], "similarity": ["dot", "cosine"]},
        "peer": "implicit BM25",
    },
    "ease": {
        "model": "ease",
        "grid": {"reg": [10, 20, 50, 100, 200, 300, 500, 1000]},
        "quick": {"reg": [50, 300]},
        "peer": "RecTools EASE",
    },
    "rp3beta": {
        "model": "rp3beta",
        "grid": {"alpha": [0.5, 0.75, 1.0], "beta": [0.0, 0.3, 0.6], "n_neighbors": [10, 50, 200]},
        "quick": {"alpha": [0.75, 1.0], "beta": [0.3, 0.6], "n_neighbors": [200]},
    },
    # Grids around the values the models' own tuning picked per dataset (see their docstrings).
    "als": {
        "model": "als",
        "grid": {"reg": [3, 10, 30, 100], "alpha": [0.1, 1.0, 10.0, 20.0]},
        "quick": {"reg": [10, 100], "alpha": [0.25, 20.0]},
        "peer": "implicit ALS",
    },
    "bpr": {
        "model": "bpr",
        "grid": {"lr": [0.01, 0.02], "reg": [0.001, 0.003, 0.01]},
        "quick": {"lr": [0.02], "reg": [0.003]},
        "peer": "implicit BPR",
    },
    "pointwise": {
        "model": "pointwise",
        "grid": {"n_negatives": [4, 8], "lr": [0.05, 0.1]},
        "quick": {"n_negatives": [8]},
    },
}

#: Peer grids, tuned on the validation event the same way (all cheap except RecTools EASE on big catalogues).
PEER_GRIDS: dict[str, dict[str, Any]] = {
    "implicit ALS": {"grid": {"regularization": [1.0, 10.0, 30.0, 100.0], "alpha": [1.0, 10.0]},
                     "quick": {"regularization": [10.0], "alpha": [1.0]}},
    "implicit BPR": {"grid": {}},
    "implicit Cosine": {"grid": {"K": [2, 3, 5, 10, 20, 50, 100, 200]}, "quick": {"K": [10, 50]}},
    "implicit BM25": {"grid": {"K": [5, 10, 20, 50, 100, 200], "K1": [1.2, 100.0]}, "quick": {"K": [100]}},
    "RecTools EASE": {"grid": {"regularization": [10, 20, 50, 100, 200, 300, 500, 1000]}, "quick": {"regularization": [50, 300]}},
}  # fmt: skip

#: Reference figures from the issue: HR@10, NDCG@10, MRR@100, Coverage@10, fit seconds.
REFERENCE: dict[str, list[tuple[str, str]]] = {
    "ML-100K": [
        ("MostPopular", "0.0498 / 0.0253 / 0.0232 / 0.054"),
        ("implicit ALS (64f, 15 it, reg 10, alpha 1)", "0.0859 / 0.0398 / 0.0377 / 0.304, 0.37 s"),
        ("implicit BPR", "0.1007 / 0.0498 / 0.0451 / 0.561, 1.61 s"),
        ("implicit item-kNN cosine K=10", "0.0721 / 0.0337 / 0.0318 / 0.192, 0.05 s"),
        ("implicit item-kNN BM25 K=100", "0.0689 / 0.0340 / 0.0329 / 0.180, 0.10 s"),
        ("RecTools EASE reg 50", "0.0965 / 0.0443 / 0.0397 / 0.354, 0.99 s"),
    ],
    "ml-latest-small": [
        ("MostPopular", "0.0426 / 0.0194 / 0.0166 / 0.012"),
        ("implicit ALS (reg 30, alpha 10)", "0.0656 / 0.0315 / 0.0309 / 0.088, 0.81 s"),
        ("implicit BPR", "0.0705 / 0.0337 / 0.0302 / 0.134, 1.83 s"),
        ("implicit item-kNN cosine K=5", "0.0754 / 0.0347 / 0.0288 / 0.085, 0.36 s"),
        ("RecTools EASE reg 100 (one thread)", "0.0902 / 0.0422 / 0.0372 / 0.067, 161.8 s"),
    ],
}


# ====================================================================== helpers
@dataclass
class Row:
    """One line of the table."""

    name: str
    params: dict[str, Any]
    hr: float = float("nan")
    ndcg: float = float("nan")
    ci: tuple[float, float] = (float("nan"), float("nan"))
    mrr: float = float("nan")
    cov: float = float("nan")
    fit_s: float = float("nan")
    peer: str | None = None
    is_peer: bool = False
    note: str = ""
    valid_scores: list[tuple[dict[str, Any], float]] = field(default_factory=list)


def combos(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of a grid as a list of parameter dicts (``{}`` for an empty grid)."""
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def ndcg10(model: Recommender, test: Interactions) -> float:
    return evaluate(model, test, k=10)["ndcg@10"]


def final_metrics(row: Row, model: Recommender, test: Interactions, exclude: sp.csr_matrix | None = None) -> None:
    res = evaluate(model, test, k=[10, 100], exclude=exclude)
    row.hr, row.ndcg, row.mrr, row.cov = res["hr@10"], res["ndcg@10"], res["mrr@100"], res["coverage@10"]
    row.ci = bootstrap_ci(res.per_user["ndcg@10"].to_numpy())


def runtime_params(name: str) -> dict[str, Any]:
    """Thread count and a silent progress bar for models that take them."""
    names = get_model_class(name)._param_names()
    out: dict[str, Any] = {}
    if "num_threads" in names:
        out["num_threads"] = THREADS
    if "progress" in names:
        out["progress"] = False
    return out


def run_ours(label: str, spec: dict[str, Any], data: Interactions, quick: bool, work: Path) -> Row:
    """Tune one of our models on the validation event, refit on train + valid, evaluate on test: recforge's
    fitting pipeline (:func:`recforge.experiments.compare`, the grid tuned on validation NDCG@10)."""
    name = spec["model"]
    grid = spec.get("quick", spec["grid"]) if quick else spec["grid"]
    fixed = {**spec.get("fixed", {}), **runtime_params(name)}
    res = compare(data, {label: {"name": name, "params": fixed, "grid": grid}}, protocol="loo", k=[10, 100],
                  out=work / label.replace(" ", "-"), backend="serial", progress=False)
    row = Row(label, {k: v for k, v in res.params[label].items() if k not in runtime_params(name)},
              peer=spec.get("peer"))
    for trial in res.trials[label]:
        if trial.part == "select":
            row.valid_scores.append(({k: trial.params[k] for k in grid}, trial.metrics["ndcg@10"]))
    final = res.results[label]
    row.hr, row.ndcg, row.mrr = final["hr@10"], final["ndcg@10"], final["mrr@100"]
    row.cov, row.fit_s = final["coverage@10"], final["fit_seconds"]
    row.ci = bootstrap_ci(final.per_user["ndcg@10"].to_numpy())
    return row


class ScoreMatrix(Recommender):
    """Wraps a peer's dense user × item score matrix so recforge's evaluator ranks it like our models."""

    def __init__(self, scores: np.ndarray | None = None) -> None:
        self.scores = scores

    def fit_from(self, interactions: Interactions, scores: np.ndarray) -> ScoreMatrix:
        self.user_map_ = interactions.user_map
        self.item_map_ = interactions.item_map
        csr = interactions.csr("ones")
        self.seen_ = sp.csr_matrix((np.ones(csr.nnz, np.float32), csr.indices, csr.indptr), shape=csr.shape)
        self.scores_ = np.ascontiguousarray(scores, dtype=np.float32)
        return self

    def _score(self, users: np.ndarray) -> np.ndarray:
        return self.scores_[users]


def binary(inter: Interactions) -> sp.csr_matrix:
    x = inter.csr("ones").copy()
    x.data[:] = 1.0
    return x


# ---------------------------------------------------------------------- peers: fit -> dense scores
def peer_fitters() -> dict[str, Callable[[Interactions, dict[str, Any]], np.ndarray]]:
    """Peer name -> function(train interactions, params) returning dense scores; empty without peers."""
    out: dict[str, Callable[[Interactions, dict[str, Any]], np.ndarray]] = {}
    try:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking
        from implicit.nearest_neighbours import BM25Recommender, CosineRecommender
    except ImportError:
        log.warning("implicit is not importable: its rows are skipped (run with /work/peers/bin/python)")
    else:

        def als(inter: Interactions, p: dict[str, Any]) -> np.ndarray:
            m = AlternatingLeastSquares(factors=64, iterations=15, num_threads=THREADS, random_state=0, **p)
            m.fit(binary(inter), show_progress=False)
            return m.user_factors @ m.item_factors.T

        def bpr(inter: Interactions, p: dict[str, Any]) -> np.ndarray:
            kw = {"factors": 64, "iterations": 100, "learning_rate": 0.01, "regularization": 0.01, **p}
            m = BayesianPersonalizedRanking(num_threads=THREADS, random_state=0, **kw)
            m.fit(binary(inter), show_progress=False)
            return m.user_factors @ m.item_factors.T

        def knn(cls: type) -> Callable[[Interactions, dict[str, Any]], np.ndarray]:
            def fit(inter: Interactions, p: dict[str, Any]) -> np.ndarray:
                x = binary(inter)
                m = cls(num_threads=THREADS, **p)
                m.fit(x, show_progress=False)
                return (x @ m.similarity).toarray()

            return fit

        out.update({"implicit ALS": als, "implicit BPR": bpr, "implicit Cosine": knn(CosineRecommender),
                    "implicit BM25": knn(BM25Recommender)})  # fmt: skip
    try:
        import pandas as pd
        from rectools.dataset import Dataset
        from rectools.models import EASEModel
    except ImportError:
        log.warning("rectools is not importable: RecTools EASE is skipped")
    else:

        def rectools_ease(inter: Interactions, p: dict[str, Any]) -> np.ndarray:
            frame = pd.DataFrame({"user_id": inter.users, "item_id": inter.items, "weight": 1.0, "datetime": 0})
            ds = Dataset.construct(frame)
            m = EASEModel(**p)
            m.fit(ds)
            weight = np.asarray(m.weight, dtype=np.float32)
            uids = ds.user_id_map.external_ids.astype(np.int64)
            iids = ds.item_id_map.external_ids.astype(np.int64)
            # Items RecTools never saw are outside its catalogue: they rank last.
            scores = np.full((inter.n_users, inter.n_items), np.finfo(np.float32).min, np.float32)
            scores[np.ix_(uids, iids)] = binary(inter)[uids][:, iids] @ weight
            return scores

        out["RecTools EASE"] = rectools_ease
    return out


def run_peer(label: str, fit: Callable[..., np.ndarray], split: Split, quick: bool, fixed_params: dict | None) -> Row:
    """Tune a peer on the validation event (unless ``fixed_params``), refit on train + valid, evaluate."""
    spec = PEER_GRIDS.get(label, {"grid": {}})
    grid = spec.get("quick", spec["grid"]) if quick else spec["grid"]
    candidates = [fixed_params] if fixed_params is not None else combos(grid)
    row = Row(label, {}, is_peer=True)
    best: tuple[float, dict[str, Any]] | None = None
    if len(candidates) > 1:
        for params in candidates:
            model = ScoreMatrix().fit_from(split.train, fit(split.train, params))
            score = ndcg10(model, split.valid)
            row.valid_scores.append((params, score))
            log.info("%s %s valid NDCG@10 %.4f", label, params, score)
            if best is None or score > best[0]:
                best = (score, params)
    params = best[1] if best is not None else candidates[0]
    row.params = params
    t0 = time.perf_counter()
    scores = fit(split.train_valid, params)
    row.fit_s = time.perf_counter() - t0
    final_metrics(row, ScoreMatrix().fit_from(split.train_valid, scores), split.test)
    return row


# ====================================================================== report
def fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def markdown(title: str, rows: list[Row]) -> str:
    by_name = {r.name: r for r in rows}
    lines = [
        f"### {title}",
        "",
        "| model | params (tuned on validation) | HR@10 | NDCG@10 [95% CI] | MRR@100 | Cov@10 | fit s | NDCG ours/peer | fit ours/peer |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.note:
            lines.append(f"| {r.name} | {r.note} | | | | | | | |")
            continue
        ratio_n = ratio_t = ""
        peer = by_name.get(r.peer) if r.peer else None
        if peer is not None and not peer.note and peer.ndcg > 0:
            ratio_n = f"{r.ndcg / peer.ndcg:.2f}"
            ratio_t = f"{r.fit_s / peer.fit_s:.2f}" if peer.fit_s > 0 else ""
        name = f"{r.name} (peer)" if r.is_peer else r.name
        lines.append(
            f"| {name} | {fmt_params(r.params)} | {r.hr:.4f} | {r.ndcg:.4f} [{r.ci[0]:.4f}, {r.ci[1]:.4f}] | "
            f"{r.mrr:.4f} | {r.cov:.3f} | {r.fit_s:.2f} | {ratio_n} | {ratio_t} |"
        )
    return "\n".join(lines)


# ====================================================================== main
def run_dataset(title: str, data: Interactions, args: argparse.Namespace, peers: dict[str, Callable]) -> list[Row]:
    (split,) = get_protocol("loo").splits(data)
    print(f"\n{title}: {len(data):,} interactions, {data.n_users:,} users x {data.n_items:,} items; "
          f"test users {split.test.csr('ones').getnnz(axis=1).astype(bool).sum():,}", flush=True)  # fmt: skip
    registered = set(available_models())
    wanted = set(args.models.split(",")) if args.models else None
    rows: list[Row] = []
    for label, spec in GRIDS.items():
        if wanted is not None and label not in wanted and spec["model"] not in wanted:
            continue
        if spec["model"] not in registered:
            rows.append(Row(label, {}, note=f"skipped: model {spec['model']!r} is not registered"))
            continue
        t0 = time.perf_counter()
        row = run_ours(label, spec, data, args.quick, Path(args.work) / f"{title}-t{THREADS}")
        rows.append(row)
        print(f"  {label}: NDCG@10 {row.ndcg:.4f}, fit {row.fit_s:.2f}s ({time.perf_counter() - t0:.0f}s with tuning)", flush=True)
        peer_name = spec.get("peer")
        if peer_name and peer_name in peers:
            if peer_name == "RecTools EASE" and title != "ML-100K":
                if args.skip_slow_peers:
                    rows.append(Row(peer_name, {}, is_peer=True, note="skipped (--skip-slow-peers)"))
                    continue
                # ~160 s per fit on one thread: no grid search; the regularisation our EASE chose (same model).
                fixed = {"regularization": row.params["reg"]}
            else:
                fixed = None
            t0 = time.perf_counter()
            prow = run_peer(peer_name, peers[peer_name], split, args.quick, fixed)
            rows.append(prow)
            print(f"  {peer_name}: NDCG@10 {prow.ndcg:.4f}, fit {prow.fit_s:.2f}s ({time.perf_counter() - t0:.0f}s with tuning)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ML-100K only, smaller grids")
    parser.add_argument("--no-peers", action="store_true", help="skip implicit and RecTools")
    parser.add_argument("--skip-slow-peers", action="store_true", help="skip RecTools EASE on ml-latest-small (~160 s)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every library (default 1)")
    parser.add_argument("--models", default="", help="comma-separated row labels or registry names to run")
    parser.add_argument("--verbose", action="store_true", help="log every validation score")
    parser.add_argument("--work", default="results/bench/implicit", help="folder of recforge's trials (resumable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", module="implicit")
    peers = {} if args.no_peers else peer_fitters()

    datasets: list[tuple[str, Callable[[], Interactions]]] = []
    if ML100K_DIR.is_dir():
        datasets.append(("ML-100K", lambda: load(ML100K_DIR)))
    else:
        print(f"ML-100K not found at {ML100K_DIR}; skipped")
    if not args.quick:
        datasets.append(("ml-latest-small", lambda: load("ml-latest-small")))

    print(f"threads: {THREADS} (OPENBLAS/OMP/MKL/NUMBA_NUM_THREADS={THREADS}; models num_threads={THREADS})")
    tables = []
    for title, loader in datasets:
        rows = run_dataset(title, loader(), args, peers)
        tables.append(markdown(f"{title}, leave-last-one-out", rows))
        ref = "\n".join(f"- {name}: {vals}" for name, vals in REFERENCE.get(title, []))
        tables.append(f"Reference figures from the issue (HR@10 / NDCG@10 / MRR@100 / Coverage@10, fit s):\n{ref}")
    print()
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
