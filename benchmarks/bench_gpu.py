"""SASRec on a GPU: repeatability, mixed precision and batch size, on ML-100K leave-one-out validation.

Usage::

    python benchmarks/bench_gpu.py                                  # every configuration below
    python benchmarks/bench_gpu.py --configs default,deterministic  # some of them
    python benchmarks/bench_gpu.py --device cpu --configs default   # the CPU row

Each configuration fits SASRec (full softmax, seed 0, at most ``--max-epochs`` epochs) on the ``loo`` protocol's
train part, stopping early on its validation part (NDCG@10, seen items excluded: the validator of every
reported figure), and reports the best validation NDCG@10, its epoch, seconds per epoch (and, of them, training
alone; and seconds per validation) and seconds to the best epoch. The configurations answer issue 19's questions: do two runs of the same seed agree (``default`` twice,
``deterministic`` twice), what replaying each step from a CUDA graph saves (``eager``: without), what mixed
precision changes (``fp32``), and which batch size suits a GPU
(``batch64``, ``batch128``, ``batch256``, the learning rate scaled with the batch, or not). Results: markdown on stdout and
``benchmarks/results/gpu_sasrec.json``. ``RECFORGE_BENCH_DATA`` is a folder holding ``ml-100k/``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from recforge.core.gpu_environment import fix_cublas_workspace
from recforge.data.datasets import load
from recforge.evaluation import get_protocol
from recforge.models import create_model

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("RECFORGE_BENCH_DATA", HERE.parent.parent / "shared" / "data"))

#: Name → SASRec parameters on top of the defaults (full softmax). Repeated names are run twice.
CONFIGS: dict[str, dict] = {
    "default": {},
    "eager": {"cuda_graphs": False},
    "deterministic": {"deterministic": True},
    "deterministic-again": {"deterministic": True},
    "fp32": {"amp": False},
    "batch64": {"batch_size": 64, "lr": 3e-3},
    "batch128": {"batch_size": 128, "lr": 4e-3},
    "batch128-lr2e-3": {"batch_size": 128},
    "batch256": {"batch_size": 256, "lr": 6e-3},
    "default-again": {},
    "fp32-deterministic": {"amp": False, "deterministic": True},
}


def fit_row(name: str, params: dict, split, device: str, max_epochs: int) -> dict:  # type: ignore[no-untyped-def]
    """Fit one configuration with early stopping; its row of the table."""
    model = create_model("sasrec", loss="softmax", epochs=max_epochs, device=device, seed=0, progress=False,
                         **params)
    start = time.perf_counter()
    model.fit(split.train, valid=split.valid)
    total = time.perf_counter() - start
    history = model.training_history_
    seconds = np.asarray(history["seconds"], dtype=float)
    validating = np.asarray(history["validation_seconds"], dtype=float)
    weights = np.concatenate([p.detach().float().cpu().numpy().ravel() for p in model.net_.parameters()])
    # "seconds" is read before each validation: the training time is what the earlier validations did not take
    training = (seconds[-1] - validating[:-1].sum()) / len(seconds)
    return {"config": name, **params, "valid ndcg@10": round(float(model.best_score_), 4),
            "best epoch": int(model.best_epoch_), "epochs run": len(seconds),
            "s/epoch": round(float(seconds[-1] / len(seconds)), 3), "train s/epoch": round(float(training), 4),
            "valid s": round(float(validating.mean()), 4), "to best s": round(float(model.seconds_to_best_), 1),
            "fit s": round(total, 1), "weights checksum": float(np.float64(weights).sum())}


def main() -> None:
    fix_cublas_workspace()  # the deterministic rows follow others in this process: set before any GPU work
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--out", default=str(HERE / "results" / "gpu_sasrec.json"))
    args = p.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    local = DATA / "ml-100k"
    data = load(str(local) if local.exists() else "ml-100k")
    (split,) = get_protocol("loo").splits(data)
    out = Path(args.out)
    rows = []
    for name in names:
        try:
            row = fit_row(name, CONFIGS[name], split, args.device, args.max_epochs)
        except Exception as exc:  # noqa: BLE001 - a configuration the device cannot run is a result too
            row = {"config": name, **CONFIGS[name], "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append({"device": args.device, **row})
        print(rows[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, out)
    cols = ["config", "valid ndcg@10", "best epoch", "epochs run", "s/epoch", "train s/epoch", "valid s", "to best s",
            "fit s", "weights checksum"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, r.get("error", ""))) for c in cols) + " |")


if __name__ == "__main__":
    main()
