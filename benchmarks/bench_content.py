"""Content, hybrid and two-tower benchmark: leave-one-out and cold-item tables, encoder and neighbour speed.

Usage::

    python benchmarks/bench_content.py                              # everything, both datasets
    python benchmarks/bench_content.py --parts tune --datasets ml-100k
    python benchmarks/bench_content.py --parts speed

Parts:

``tune``  the content model's defaults: encoder × genre_weight × half_life, fitted on ``train`` of a leave-one-out
          split and scored on its validation event (never the test event).
``loo``   leave-last-one-out (:func:`recforge.split.leave_one_out`), seen items excluded. Classic rows use the
          parameters chosen in ``bench_implicit.py``; models fit on train + validation and are tested on the last
          event. ``ScoreBlend`` tunes its weights on the validation event with members fitted on train, then is
          refitted on train + validation with those weights. The two-tower model and SASRec stop early on the
          validation event and are refitted for their best epoch count (SASRec on ml-latest-small uses the 54
          epochs ``bench_sequential.py`` selected, to save 30 minutes). ``top100`` is TFRS's FactorizedTopK: the
          share of test events whose item is in the model's top 100 of the whole catalogue, nothing excluded.
``cold``  :func:`recforge.evaluation.cold_start.cold_item_split` (10% of the items held out of training
          entirely); NDCG/HR@10 rank the cold items only (random tie-break), ``cold_share@10`` is the share of
          full-catalogue top-10 slots given to cold items.
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
    p.add_argument("--out", default=str(HERE / "results" / "content.json"))
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np

sys.path.insert(0, str(HERE))
from bench_sequential import CLASSIC, dataset, md

from recforge import split as S
from recforge.evaluation import evaluate, factorized_top_k
from recforge.evaluation.cold_start import cold_item_split, evaluate_cold_items
from recforge.models import create_model, get_model_class

#: SASRec epochs on ml-latest-small from bench_sequential.py's validation (its run to best takes ~30 min).
SASREC_EPOCHS = {"ml-latest-small": 54}
CONTENT = {"Content TF-IDF": ("content", {"encoder": "tfidf"}), "Content MiniLM": ("content", {"encoder": "minilm"})}


def _with_threads(name: str, params: dict, threads: int):  # type: ignore[no-untyped-def]
    cls = get_model_class(name)
    extra = {k: v for k, v in (("num_threads", threads), ("progress", False)) if k in cls._param_names()}
    return create_model(name, **{**extra, **params})


def _members(threads: int, encoder: str = "tfidf") -> dict:
    ease = CLASSIC["EASE"][1]
    return {"ease": ease, "content": {"encoder": encoder, "num_threads": threads}}


def rows_wanted() -> set[str] | None:
    return None if ARGS is None or ARGS.rows is None else set(ARGS.rows.split(","))


def _row(label: str, res, model, extra: dict | None = None) -> dict:  # type: ignore[no-untyped-def]
    row = {"model": label, "ndcg@10": res["ndcg@10"], "hr@10": res["hr@10"], "coverage@10": res["coverage@10"],
           "fit s": float(getattr(model, "fit_seconds_", 0.0)), **(extra or {})}
    print(row, flush=True)
    return row


def top100(model, test) -> float:  # type: ignore[no-untyped-def]
    """FactorizedTopK-style top-100 accuracy: test events whose item is in the top 100, nothing excluded."""
    return factorized_top_k(model, test, ks=(100,))["top100_accuracy"]


def part_tune(ds: str, threads: int) -> list[dict]:
    split = S.leave_one_out(dataset(ds))
    rows = []
    for encoder in ("tfidf", "minilm"):
        for gw in (0.0, 0.3, 0.6):
            for hl in (None, 3.0, 10.0, 30.0):
                model = _with_threads("content", {"encoder": encoder, "genre_weight": gw, "half_life": hl}, threads)
                res = evaluate(model.fit(split.train), split.valid)
                rows.append({"encoder": encoder, "genre_weight": gw, "half_life": str(hl),
                             "valid ndcg@10": res["ndcg@10"], "valid hr@10": res["hr@10"], "fit s": model.fit_seconds_})
                print(rows[-1], flush=True)
    for anchor in ("last", "profile"):
        for n_content in (1, 2, 3):
            model = _with_threads("slatemix", {"anchor": anchor, "n_content": n_content, "params": _members(threads)}, threads)
            res = evaluate(model.fit(split.train), split.valid)
            rows.append({"encoder": f"slatemix {anchor} {n_content}/5", "valid ndcg@10": res["ndcg@10"],
                         "valid hr@10": res["hr@10"], "fit s": model.fit_seconds_})
            print(rows[-1], flush=True)
    return rows


def _neural_refit(name: str, params: dict, split: S.Split, threads: int, fixed_epochs: int | None = None):  # type: ignore[no-untyped-def]
    if fixed_epochs:
        return _with_threads(name, {**params, "epochs": fixed_epochs}, threads).fit(split.train_valid), {"epochs": fixed_epochs}
    tuned = _with_threads(name, params, threads).fit(split.train, valid=split.valid)
    best = int(getattr(tuned, "best_epoch_", None) or params.get("epochs", 50))
    final = _with_threads(name, {**params, "epochs": best}, threads).fit(split.train_valid)
    return final, {"epochs": best, "to best s": float(getattr(tuned, "seconds_to_best_", 0.0) or 0.0)}


def part_loo(ds: str, threads: int) -> list[dict]:
    split = S.leave_one_out(dataset(ds))
    want = rows_wanted()
    rows = []

    def run(label: str, build) -> None:  # type: ignore[no-untyped-def]
        if want is not None and label not in want:
            return
        model, extra = build()
        rows.append(_row(label, evaluate(model, split.test), model, {"top100": top100(model, split.test), **extra}))

    for label, (name, params) in {**{k: CLASSIC[k] for k in ("MostPopular", "EASE", "BPR")}, **CONTENT}.items():
        run(label, lambda name=name, params=params: (_with_threads(name, params, threads).fit(split.train_valid), {}))
    for encoder in ("tfidf", "minilm"):
        tag = "TF-IDF" if encoder == "tfidf" else "MiniLM"
        run(f"SlateMix EASE+{tag}", lambda e=encoder: (
            _with_threads("slatemix", {"params": _members(threads, e)}, threads).fit(split.train_valid), {}))

        def blend(e: str = encoder):  # type: ignore[no-untyped-def]
            tuned = _with_threads("scoreblend", {"params": _members(threads, e)}, threads).fit(split.train, valid=split.valid)
            weights = [float(w) for w in tuned.weights_]
            final = _with_threads("scoreblend", {"params": _members(threads, e), "weights": weights}, threads)
            return final.fit(split.train_valid), {"weights": str([round(w, 2) for w in weights])}

        run(f"ScoreBlend EASE+{tag}", blend)
    if "twotower" in _registered():
        run("TwoTower", lambda: _neural_refit("twotower", {}, split, threads))

        def blend3():  # type: ignore[no-untyped-def]
            names = ["ease", "twotower", "content"]
            params = {**_members(threads), "twotower": {"num_threads": threads}}
            tuned = _with_threads("scoreblend", {"models": names, "params": params}, threads)
            tuned.fit(split.train, valid=split.valid)
            weights = [float(w) for w in tuned.weights_]
            epochs = int(tuned.members_[1].best_epoch_ or 30)
            params["twotower"] = {**params["twotower"], "epochs": epochs}
            final = _with_threads("scoreblend", {"models": names, "params": params, "weights": weights}, threads)
            return final.fit(split.train_valid), {"weights": str([round(w, 2) for w in weights]), "epochs": epochs}

        run("ScoreBlend EASE+TwoTower+TF-IDF", blend3)
    run("SASRec", lambda: _neural_refit("sasrec", {"loss": "softmax", "epochs": 200}, split, threads, SASREC_EPOCHS.get(ds)))
    return rows


def _registered() -> set[str]:
    from recforge.models import available_models

    return set(available_models())


def part_cold(ds: str, threads: int) -> list[dict]:
    split = cold_item_split(dataset(ds), fraction=0.1, seed=0)
    want = rows_wanted()
    models = {"Random": ("random", {}), "MostPopular": ("pop", {}), "EASE": CLASSIC["EASE"], **CONTENT}
    for encoder, tag in (("tfidf", "TF-IDF"), ("minilm", "MiniLM")):
        models[f"SlateMix EASE+{tag}"] = ("slatemix", {"params": _members(threads, encoder)})
        models[f"ScoreBlend EASE+{tag}"] = ("scoreblend", {"params": _members(threads, encoder)})
    if "twotower" in _registered():
        models["TwoTower"] = ("twotower", {})
    rows = []
    for label, (name, params) in models.items():
        if want is not None and label not in want:
            continue
        model = _with_threads(name, params, threads).fit(split.train)
        res = evaluate_cold_items(model, split, k=10)
        rows.append(_row(label, res, model, {"cold_share@10": res["cold_share@10"]}))
    return rows


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
