"""Content, hybrid and two-tower benchmark: leave-one-out and cold-item tables, encoder and neighbour speed.

Usage::

    python benchmarks/bench_content.py                              # everything, both datasets
    python benchmarks/bench_content.py --parts tune --datasets ml-100k
    python benchmarks/bench_content.py --parts speed

Parts:

Every protocol comes from recforge's registry and every model goes through its fitting pipeline
(:func:`recforge.experiments.compare`: tuned on validation, refitted on train + validation, tested).

``tune``  the content model's defaults: encoder × genre_weight × half_life_events as a grid on the validation event
          of the ``loo`` protocol (never the test event); the same for SlateMix's anchor and content share.
``loo``   leave-last-one-out, seen items excluded. Classic rows use the parameters chosen in
          ``bench_implicit.py``; models fit on train + validation and are tested on the last event. ``ScoreBlend``
          tunes its weights on the validation event with members fitted on train (neural members stop early on
          it), then is refitted on train + validation with those weights and epochs. The two-tower model and SASRec
          stop early on the validation event and are refitted for their best epoch count. ``top100`` is TFRS's
          FactorizedTopK: the share of test events whose item is in the model's top 100 of the whole catalogue,
          nothing excluded.
``cold``  the ``cold-items`` protocol (10% of the items held out of training entirely); NDCG/HR@10 rank the cold
          items only (random tie-break), ``cold_share@10`` is the share of full-catalogue top-10 slots given to
          cold items.
``speed`` MiniLM encoding of all 9,742 ml-latest-small titles (``movies.csv``) in a fresh cache, the cached re-run,
          and item-to-item top-100 for every item, exact and HNSW (with HNSW's recall against exact).

Threads: ``--threads N`` (default 1) limits torch, BLAS and numba (set before numpy is imported) and every model's
``num_threads``. Tables print as markdown; results go to ``benchmarks/results/content.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="ml-100k,ml-latest-small")
    p.add_argument("--parts", default="loo,cold,speed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default=None, help="comma-separated row labels of loo/cold (default: all)")
    p.add_argument("--work", default="results/bench/content", help="folder of the trials (resumable)")
    p.add_argument("--out", default=str(HERE / "results" / "content.json"))
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np

sys.path.insert(0, str(HERE))
from bench_sequential import CLASSIC, dataset, md

from recforge.data.datasets import load
from recforge.evaluation import factorized_top_k, get_protocol
from recforge.experiments import compare
from recforge.models import available_models, get_model_class

CONTENT = {"Content TF-IDF": ("content", {"encoder": "tfidf"}), "Content MiniLM": ("content", {"encoder": "minilm"})}


def _spec(name: str, params: dict, threads: int, grid: dict | None = None) -> dict:
    cls = get_model_class(name)
    extra = {k: v for k, v in (("num_threads", threads), ("progress", False)) if k in cls._param_names()}
    return {"name": name, "params": {**extra, **params}, **({"grid": grid} if grid else {})}


def _run(ds: str, protocol: str, models: dict[str, dict], tag: str = "", keep: bool = False):  # type: ignore[no-untyped-def]
    assert ARGS is not None
    work = Path(ARGS.work) / f"{ds}-{protocol}{tag}-t{ARGS.threads}"
    return compare(dataset(ds), models, protocol=protocol, out=work, backend="serial", keep_models=keep)


def _members(threads: int, encoder: str = "tfidf") -> dict:
    ease = CLASSIC["EASE"][1]
    return {"ease": ease, "content": {"encoder": encoder, "num_threads": threads}}


def rows_wanted() -> set[str] | None:
    return None if ARGS is None or ARGS.rows is None else set(ARGS.rows.split(","))


def _row(label: str, res, extra: dict | None = None) -> dict:  # type: ignore[no-untyped-def]
    row = {"model": label, "ndcg@10": res["ndcg@10"], "hr@10": res["hr@10"], "coverage@10": res["coverage@10"],
           "fit s": res["fit_seconds"], **(extra or {})}
    print(row, flush=True)
    return row


def top100(model, test) -> float:  # type: ignore[no-untyped-def]
    """FactorizedTopK-style top-100 accuracy: test events whose item is in the top 100, nothing excluded."""
    return factorized_top_k(model, test, ks=(100,))["top100_accuracy"]


def part_tune(ds: str, threads: int) -> list[dict]:
    grid = {"encoder": ["tfidf", "minilm"], "genre_weight": [0.0, 0.3, 0.6], "half_life_events": [None, 3.0, 10.0, 30.0]}
    res = _run(ds, "loo", {"content": _spec("content", {}, threads, grid),
                           "slatemix": _spec("slatemix", {"params": _members(threads)}, threads,
                                             {"anchor": ["last", "profile"], "n_content": [1, 2, 3]})}, "-tune")
    rows = []
    for label, keys in (("content", list(grid)), ("slatemix", ["anchor", "n_content"])):
        for t in res.trials[label]:
            if t.part == "select":
                rows.append({"model": label, **{k: str(t.params[k]) for k in keys},
                             "valid ndcg@10": t.metrics["ndcg@10"], "valid hr@10": t.metrics["hr@10"],
                             "fit s": t.metrics["fit_seconds"]})
                print(rows[-1], flush=True)
    return rows


def _loo_models(threads: int) -> dict[str, dict]:
    models = {label: _spec(name, params, threads) for label, (name, params) in
              {**{k: CLASSIC[k] for k in ("MostPopular", "EASE", "BPR")}, **CONTENT}.items()}
    for encoder, tag in (("tfidf", "TF-IDF"), ("minilm", "MiniLM")):
        models[f"SlateMix EASE+{tag}"] = _spec("slatemix", {"params": _members(threads, encoder)}, threads)
        models[f"ScoreBlend EASE+{tag}"] = _spec("scoreblend", {"params": _members(threads, encoder)}, threads)
    if "twotower" in available_models():
        models["TwoTower"] = _spec("twotower", {}, threads)
        models["ScoreBlend EASE+TwoTower+TF-IDF"] = _spec("scoreblend", {
            "models": ["ease", "twotower", "content"],
            "params": {**_members(threads), "twotower": {"num_threads": threads}}}, threads)
    models["SASRec"] = _spec("sasrec", {"loss": "softmax", "epochs": 200}, threads)
    want = rows_wanted()
    return {k: v for k, v in models.items() if want is None or k in want}


def part_loo(ds: str, threads: int) -> list[dict]:
    models = _loo_models(threads)
    res = _run(ds, "loo", models, keep=True)
    (split,) = get_protocol("loo").splits(load(dataset(ds)))
    rows = []
    for label in models:
        extra = {"top100": top100(res.models[label][0], split.test)}
        tuned = res.params[label]
        if "weights" in tuned:
            extra["weights"] = str([round(w, 2) for w in tuned["weights"]])
        epochs = tuned.get("epochs", (tuned.get("params") or {}).get("twotower", {}).get("epochs"))
        if epochs is not None:
            extra["epochs"] = epochs
        rows.append(_row(label, res.results[label], extra))
    return rows


def part_cold(ds: str, threads: int) -> list[dict]:
    models = {"Random": _spec("random", {}, threads), "MostPopular": _spec("pop", {}, threads),
              "EASE": _spec(*CLASSIC["EASE"], threads),
              **{label: _spec(name, params, threads) for label, (name, params) in CONTENT.items()}}
    for encoder, tag in (("tfidf", "TF-IDF"), ("minilm", "MiniLM")):
        models[f"SlateMix EASE+{tag}"] = _spec("slatemix", {"params": _members(threads, encoder)}, threads)
        models[f"ScoreBlend EASE+{tag}"] = _spec("scoreblend", {"params": _members(threads, encoder)}, threads)
    if "twotower" in available_models():
        models["TwoTower"] = _spec("twotower", {}, threads)
    want = rows_wanted()
    models = {k: v for k, v in models.items() if want is None or k in want}
    res = _run(ds, "cold-items", models)
    return [_row(label, res.results[label], {"cold_share@10": res.results[label]["cold_share@10"]})
            for label in models]


def part_speed(threads: int) -> list[dict]:
    import pandas as pd

    from recforge.features import SentenceEncoder
    from recforge.retrieval import all_neighbors, make_index

    titles = pd.read_csv(DATA / "ml-latest-small" / "movies.csv")["title"].astype(str).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        enc = SentenceEncoder("minilm", cache_dir=cache, num_threads=threads)
        t0 = time.perf_counter()
        vecs = enc.encode(titles)
        rows.append({"task": f"MiniLM encode {len(titles):,} titles (fresh cache)", "seconds": time.perf_counter() - t0})
        t0 = time.perf_counter()
        again = SentenceEncoder("minilm", cache_dir=cache, num_threads=threads).encode(titles)
        rows.append({"task": "same, cached (new encoder object, model never loaded)", "seconds": time.perf_counter() - t0})
        assert np.array_equal(vecs, again)
    t0 = time.perf_counter()
    exact = all_neighbors(make_index(vecs, "exact", num_threads=threads), 100)[0]
    rows.append({"task": "item-to-item top-100, all items, exact", "seconds": time.perf_counter() - t0})
    t0 = time.perf_counter()
    hnsw_index = make_index(vecs, "hnsw", num_threads=threads)
    build = time.perf_counter() - t0
    approx = all_neighbors(hnsw_index, 100)[0]
    recall = float(np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(exact, approx)]))
    rows.append({"task": f"same, HNSW (build {build:.2f} s incl.; recall@100 vs exact {recall:.3f})",
                 "seconds": time.perf_counter() - t0})
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    assert ARGS is not None
    out = Path(ARGS.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["meta"] = {"threads": ARGS.threads, "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}
    parts = ARGS.parts.split(",")
    for ds in ARGS.datasets.split(","):
        for part, fn in (("tune", part_tune), ("loo", part_loo), ("cold", part_cold)):
            if part in parts:
                rows = fn(ds, ARGS.threads)
                key = results.setdefault(ds, {}).setdefault(part, [])
                done = {r.get("model") for r in rows}  # re-run rows replace their old versions (tune: all)
                results[ds][part] = rows if part == "tune" else [r for r in key if r.get("model") not in done] + rows
                cols = list(rows[0].keys()) if rows else []
                print(f"\n### {ds} — {part}\n\n" + md(results[ds][part], cols))
    if "speed" in parts:
        results["speed"] = part_speed(ARGS.threads)
        print("\n### speed\n\n" + md(results["speed"], ["task", "seconds"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
