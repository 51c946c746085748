"""Memory at scale: 20M synthetic interactions through load → split → EASE → ALS / SASRec → evaluation.

Usage::

    python benchmarks/bench_scale.py                      # 200k users × 50k items, 20M interactions
    python benchmarks/bench_scale.py --n-interactions 2000000 --n-users 20000 --n-items 5000

Each stage reports its wall time and the process's peak resident memory so far (``ru_maxrss``). ALS: 64 factors,
15 epochs; SASRec: 64 factors, the last 50 events, logQ-corrected sampled softmax over 512 in-batch
negatives, or with ``--sasrec-loss softmax`` (``logq,softmax``: both) the full softmax over the catalogue (its
512 × 50 × 50k logits a step computed in chunks, :data:`recforge.neural.losses.SOFTMAX_CHUNK_LOGITS`), ``--sasrec-epochs`` epochs;
evaluation: full-catalogue ranking of ``--eval-users`` (10,000) sampled test users, seen items excluded.
``--models`` picks the stages (default ``ease,als,sasrec``; ``bpr`` adds BPR, 64 factors, 10 epochs;
``biasedals`` and ``funksvd`` the explicit-rating models with their defaults, fitted on the synthetic ratings, with
the test RMSE). Results: ``benchmarks/results/scale.json``, rewritten
after every stage (a run stopped by a time limit keeps what it finished).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synthetic(n_users: int, n_items: int, n_interactions: int):  # type: ignore[no-untyped-def]
    """The benchmark's synthetic interactions (50 taste clusters, seed 0)."""
    from recforge.data.datasets import make_synthetic

    return make_synthetic(n_users, n_items, n_interactions, n_clusters=50, seed=0)


def sampled_test(split, eval_users: int):  # type: ignore[no-untyped-def]
    """The test events of ``eval_users`` test users of ``split`` drawn with seed 0 (all of them when fewer)."""
    users = np.unique(split.test.users)
    pick = np.sort(np.random.default_rng(0).choice(users, min(eval_users, len(users)), replace=False))
    return split.test.subset(np.isin(split.test.users, pick))


def add_size_arguments(p: argparse.ArgumentParser) -> None:
    """The synthetic set's size and how many test users are ranked (200k × 50k, 20M interactions, 10,000)."""
    p.add_argument("--n-users", type=int, default=200_000)
    p.add_argument("--n-items", type=int, default=50_000)
    p.add_argument("--n-interactions", type=int, default=20_000_000)
    p.add_argument("--eval-users", type=int, default=10_000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_arguments(p)
    p.add_argument("--models", default="ease,als,sasrec", help="comma-separated stages to run")
    p.add_argument("--sasrec-epochs", type=int, default=1)
    p.add_argument("--sasrec-loss", default="logq",
                   help="logq (512 sampled negatives), softmax (full catalogue) or both, comma-separated")
    p.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = p.parse_args()

    import torch

    from recforge.core.device import resolve_device
    from recforge.core.metrics import rmse
    from recforge.errors import DataError
    from recforge.evaluation import evaluate, get_protocol
    from recforge.models import create_model

    rows = []
    out = Path(args.out)
    device = resolve_device("auto")  # where SASRec trains ($RECFORGE_DEVICE, else CUDA when present)
    gpu = device.type == "cuda"
    print(f"device: {torch.cuda.get_device_name(device) if gpu else 'cpu'}", flush=True)

    def stage(name: str, start: float, **extra) -> None:  # type: ignore[no-untyped-def]
        row = {"stage": name, "seconds": round(time.perf_counter() - start, 2), "peak GB": round(peak_gb(), 2)}
        if gpu:  # the GPU's own peak since the last stage
            row["peak GPU GB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        rows.append({**row, **extra})
        print(rows[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "device": str(device), "stages": rows}, indent=1))
        os.replace(tmp, out)

    t = time.perf_counter()
    data = synthetic(args.n_users, args.n_items, args.n_interactions)
    stage("generate", t, interactions=len(data))
    t = time.perf_counter()
    (split,) = get_protocol("random").splits(data, seed=0)
    stage("split (the 'random' protocol: 80/20)", t, train=len(split.train), test=len(split.test))
    models = {m.strip() for m in args.models.split(",")}
    test = sampled_test(split, args.eval_users)
    n_test_users = len(np.unique(test.users))
    if "ease" in models:
        t = time.perf_counter()
        try:
            create_model("ease").fit(split.train)
            stage("EASE", t, outcome="fitted")
        except DataError as exc:
            stage("EASE", t, outcome=f"refused: {str(exc)[:120]}")
    if "als" in models:
        t = time.perf_counter()
        als = create_model("als", n_factors=64, epochs=15, progress=False).fit(split.train)
        stage("ALS fit (64 factors, 15 epochs)", t)
        t = time.perf_counter()
        res = evaluate(als, test, k=10)
        stage(f"ALS: evaluate {n_test_users:,} users (full ranking)", t, ndcg10=round(res["ndcg@10"], 4),
              hr10=round(res["hr@10"], 4))
        del als
    for loss in args.sasrec_loss.split(",") if "sasrec" in models else ():
        t = time.perf_counter()
        sas = create_model("sasrec", n_factors=64, max_len=50, batch_size=512, loss=loss.strip(), n_negatives=512,
                           epochs=args.sasrec_epochs, all_windows=False, progress=True).fit(split.train)
        stage(f"SASRec fit (64 factors, last 50 events, {loss}, {args.sasrec_epochs} epoch(s))", t)
        t = time.perf_counter()
        res = evaluate(sas, test, k=10)
        stage(f"SASRec ({loss}): evaluate {n_test_users:,} users (full ranking)", t, ndcg10=round(res["ndcg@10"], 4),
              hr10=round(res["hr@10"], 4))
        del sas
    if "bpr" in models:  # the SGD kernel against its GPU blocks (device="auto" takes the GPU from 5M samples)
        t = time.perf_counter()
        bpr = create_model("bpr", n_factors=64, epochs=10, progress=False).fit(split.train)
        stage("BPR fit (64 factors, 10 epochs)", t)
        t = time.perf_counter()
        res = evaluate(bpr, test, k=10)
        stage(f"BPR: evaluate {n_test_users:,} users (full ranking)", t, ndcg10=round(res["ndcg@10"], 4))
        del bpr
    for name, label in (("biasedals", "BiasedALS (50 factors, 10 epochs)"), ("funksvd", "FunkSVD (100 factors, 60 epochs)")):
        if name in models:  # the explicit-rating models, on the synthetic ratings
            t = time.perf_counter()
            model = create_model(name, progress=False).fit(split.train)
            predicted = model.predict_indices(split.test.users, split.test.items)
            stage(f"{label} fit", t, test_rmse=round(rmse(split.test.ratings, predicted), 4))
            del model


if __name__ == "__main__":
    main()
