"""Sequential-model benchmark: SASRec (four losses), BERT4Rec, GRU4Rec and pooling against classic models and
RecTools, on three protocols.

Usage::

    python benchmarks/bench_sequential.py                        # everything, ML-100K and ml-latest-small
    python benchmarks/bench_sequential.py --parts loo,speed       # some parts only
    python benchmarks/bench_sequential.py --datasets ml-100k --threads 2

Parts (every protocol comes from recforge's registry, every model is fitted, tuned and tested by recforge's
fitting pipeline, :func:`recforge.experiments.compare`, as ``recforge compare`` does):

``loo``      leave-last-one-out. Each neural model trains on ``train`` with the validation event for early stopping
             (NDCG@10, seen items excluded, ``patience`` of the model); it is then refitted on train + validation
             for the best number of epochs and tested on the last event (seen items excluded); ``--validation
             reuse`` tests the early-stopped model instead (the validation event added to its history). Classic
             models use the parameters chosen in ``bench_implicit.py``. RecTools' SASRec and BERT4Rec figures come
             from ``benchmarks/results/rectools_seq.json``, written by ``/work/peers/bin/python
             benchmarks/peers_rectools_seq.py --threads 1`` on the same split (RecTools needs its own virtualenv);
             ratios compare NDCG@10 and the training time to the best validation score.
``temporal`` notebook 003's protocol (``next-event``): 5-core, global cuts at the 80% / 90% timestamp quantiles,
             every test event a sample whose history is all earlier events; HR/DCG/Coverage at 5/10/20, seen items
             not excluded (validation the same). Neural models stop early on the validation events and are
             refitted; classic models fit on train + validation.
``mrr``      notebook 004's protocol (``sequence-mrr``): 20% of users held out for test and 20% of the others for
             validation, their events cut into windows of 10; MRR of the 10th item given the first 9 (nothing
             excluded). Neural models (``max_len`` 50) stop early on the validation users' events and are refitted
             on all training users.
``speed``    seconds per SASRec epoch on ml-latest-small (2 layers, 64 dims, max_len 200, full softmax) and the
             time to score every user of ml-latest-small.

Threads: ``--threads N`` (default 1) limits torch, BLAS and numba to N threads (set before numpy is imported);
every model gets ``num_threads=N``. Trials are kept (and resumed) under ``--work``; results are printed as
markdown and saved to ``benchmarks/results/sequential.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("RECFORGE_BENCH_DATA", HERE.parent.parent / "shared" / "data"))  # a copy elsewhere (GPU)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="ml-100k,ml-latest-small")
    p.add_argument("--parts", default="loo,temporal,mrr,speed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-epochs", type=int, default=200, help="upper bound for early-stopped neural models")
    p.add_argument("--neural", default=None, help="comma-separated neural rows of the loo and temporal parts (default: all; '' = none)")
    p.add_argument("--validation", default="refit", help="refit (default), reuse or off: see recforge.experiments")
    p.add_argument("--work", default="results/bench/sequential", help="folder of the trials (resumable)")
    p.add_argument("--out", default=str(HERE / "results" / "sequential.json"))
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np

from recforge.data.datasets import load
from recforge.experiments import compare
from recforge.models import create_model

#: Neural models of the tables: registry name and parameters (the rest are the defaults).
NEURAL = {
    "SASRec softmax": ("sasrec", {"loss": "softmax"}),
    "SASRec BCE": ("sasrec", {"loss": "bce"}),
    "SASRec in-batch": ("sasrec", {"loss": "inbatch"}),
    "SASRec logQ": ("sasrec", {"loss": "logq"}),
    "BERT4Rec": ("bert4rec", {}),
    "GRU4Rec": ("gru4rec", {}),
    "Pooling": ("pooling", {}),
}
LOO_NEURAL = ("SASRec softmax", "BERT4Rec", "GRU4Rec", "Pooling")
#: Classic rows with the parameters bench_implicit.py selected on validation.
CLASSIC = {
    "MostPopular": ("pop", {}),
    "EASE": ("ease", {"reg": 300.0}),
    "BPR": ("bpr", {"n_factors": 128, "epochs": 100, "lr": 0.05, "reg": 0.001}),
}


def dataset(name: str) -> str:
    local = DATA / name
    return str(local) if local.exists() else name


def neural(label: str, threads: int, max_epochs: int, **extra: object) -> dict:
    name, params = NEURAL[label]
    return {"name": name, "params": {"epochs": max_epochs, "num_threads": threads, "progress": False, **params,
                                     **extra}}


def classic(label: str, threads: int) -> dict:
    name, params = CLASSIC[label]
    owned = create_model(name).get_params()
    extra = {k: v for k, v in (("num_threads", threads), ("progress", False)) if k in owned}
    return {"name": name, "params": {**params, **extra}}


def md(rows: list[dict], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) and c not in ("fit s", "to best s", "epochs") else
                         (f"{v:.1f}" if isinstance(v, float) else str(v)))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def run_part(ds: str, protocol: str, models: dict[str, dict], metrics: list[str]) -> list[dict]:
    """Every model through the fitting pipeline on one protocol; one row per model."""
    assert ARGS is not None
    work = Path(ARGS.work) / f"{ds}-{protocol}-{ARGS.validation}-t{ARGS.threads}"
    res = compare(dataset(ds), models, protocol=protocol, out=work, validation=ARGS.validation,
                  backend="serial", progress=True)
    rows = []
    for label in models:
        if label in res.skipped:
            print(f"{label}: skipped ({res.skipped[label]})")
            continue
        summary = res.results[label].summary
        row = {"model": label, **{m: summary[m] for m in metrics if m in summary}, "fit s": summary["fit_seconds"]}
        select = [t for t in res.trials[label] if t.part == "select" and not t.pruned]
        if "epochs" in res.params[label] and select:
            row["epochs"] = res.params[label]["epochs"] if ARGS.validation == "refit" else select[0].tuned_params.get(
                "epochs")
            row["to best s"] = select[0].metrics.get("seconds_to_best", float("nan"))
            row["valid ndcg@10"] = select[0].metrics.get("ndcg@10", float("nan"))
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def part_loo(ds: str, threads: int, max_epochs: int) -> list[dict]:
    labels = LOO_NEURAL if ARGS is None or ARGS.neural is None else [x for x in ARGS.neural.split(",") if x]
    models = {label: neural(label, threads, max_epochs) for label in labels}
    models.update({label: classic(label, threads) for label in CLASSIC})
    rows = run_part(ds, "loo", models, ["ndcg@10", "hr@10", "coverage@10"])
    peers = HERE / "results" / "rectools_seq.json"
    if peers.exists():
        ref = json.loads(peers.read_text()).get(ds, {})
        ours = next((r for r in rows if r["model"] == "SASRec softmax"), None)
        for key, label in (("sasrec", "RecTools SASRec"), ("bert4rec", "RecTools BERT4Rec")):
            if key in ref and ours is not None:
                r = ref[key]
                tuning = r.get("tuning", [])
                to_best = next((t["fit_seconds"] for t in tuning if t.get("epochs") == r.get("epochs")), r["fit_seconds"])
                rows.append({"model": label, "ndcg@10": r["ndcg@10"], "hr@10": r["hr@10"],
                             "coverage@10": r["coverage@10"], "epochs": r.get("epochs"), "to best s": float(to_best),
                             "fit s": r["fit_seconds"],
                             "ours/peer ndcg": ours["ndcg@10"] / max(r["ndcg@10"], 1e-12),
                             "ours/peer to-best time": ours.get("to best s", float("nan")) / max(float(to_best), 1e-12)})
    else:
        print(f"(no {peers.name}: run benchmarks/peers_rectools_seq.py in the peer venv for the RecTools rows)")
    return rows


def part_temporal(ds: str, threads: int, max_epochs: int) -> list[dict]:
    labels = list(NEURAL) if ARGS is None or ARGS.neural is None else [x for x in ARGS.neural.split(",") if x]
    models = {label: neural(label, threads, max_epochs) for label in labels}
    models.update({label: classic(label, threads) for label in CLASSIC})
    return run_part(ds, "next-event", models, ["hr@5", "hr@10", "hr@20", "dcg@5", "dcg@10", "dcg@20",
                                                "coverage@5", "coverage@10", "coverage@20"])


def part_mrr(ds: str, threads: int, max_epochs: int) -> list[dict]:
    models = {label: neural(label, threads, max_epochs, max_len=50) for label in ("SASRec softmax", "GRU4Rec", "Pooling")}
    models["MostPopular"] = classic("MostPopular", threads)
    rows = run_part(ds, "sequence-mrr", models, ["mrr", "hr@10"])
    rows.append({"model": "Spotlight pooling (notebook 004)", "mrr": 0.0416})
    return rows


def part_speed(threads: int) -> list[dict]:
    data = load(dataset("ml-latest-small"))
    model = create_model("sasrec", n_layers=2, n_factors=64, max_len=200, epochs=2, num_threads=threads,
                         progress=False)
    model.fit(data)
    epoch_s = float(np.diff([0.0, *model.training_history_["seconds"].tolist()])[-1])
    times = []
    for _ in range(2):  # the first call encodes every user's history once; later calls reuse the vectors
        t = time.perf_counter()
        model.recommend(k=10)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    model.score_histories([data.sequences()[u] for u in range(data.n_users)])
    sessions = time.perf_counter() - t
    return [{"what": "SASRec epoch, ml-latest-small (2x64, max_len 200, softmax)", "seconds": epoch_s},
            {"what": f"recommend top-10 for all {data.n_users} users, first call (encodes histories)", "seconds": times[0]},
            {"what": f"recommend top-10 for all {data.n_users} users, later calls", "seconds": times[1]},
            {"what": f"score {data.n_users} new sessions (recommend_for_history path)", "seconds": sessions}]


def main() -> None:
    assert ARGS is not None
    out_path = Path(ARGS.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["meta"] = {"threads": ARGS.threads, "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}
    parts = ARGS.parts.split(",")
    for ds in ARGS.datasets.split(","):
        for part, fn in (("loo", part_loo), ("temporal", part_temporal), ("mrr", part_mrr)):
            if part in parts and not (part == "mrr" and ds != "ml-100k"):
                start = time.perf_counter()
                rows = fn(ds, ARGS.threads, ARGS.max_epochs)
                results.setdefault(ds, {})[part] = rows
                cols = sorted({c for r in rows for c in r}, key=lambda c: (c != "model", c))
                print(f"\n### {part} on {ds} ({time.perf_counter() - start:.0f} s)\n\n{md(rows, cols)}", flush=True)
                tmp = out_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(results, indent=1))
                os.replace(tmp, out_path)
    if "speed" in parts:
        rows = part_speed(ARGS.threads)
        results[f"speed_threads{ARGS.threads}"] = rows
        print(f"\n### speed ({ARGS.threads} threads)\n\n{md(rows, ['what', 'seconds'])}")
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
