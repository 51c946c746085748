"""Peer figures for the sequential benchmark: RecTools' SASRec and BERT4Rec on recforge's leave-one-out split.

What it measures (per dataset, per model), on exactly recforge's ``loo`` protocol
(the ``loo`` protocol of recforge's registry: each user's last event is test, the one before it validation, the rest
train; users with fewer than 3 events stay whole in train):

1. epoch tuning: the model is fitted on ``train`` with the largest epoch count of its grid (``EPOCH_GRIDS``);
   the network weights are snapshotted at the end of every grid epoch count and each snapshot is scored on the
   validation event (NDCG@10, the user's train items excluded via ``filter_viewed=True``). With the same seed a
   fit with ``epochs=E`` follows the same trajectory as the first E epochs of the longer run (Adam, constant
   learning rate, no early stopping), so this equals separate fits per E at the cost of one fit. The recorded
   ``fit_seconds`` of a tuning entry is the wall time from the start of that single fit to the end of epoch E;
2. the best E (ties: the smaller) is refitted from scratch on train + validation and evaluated on the test
   event with the user's train + validation items excluded: HR@10, NDCG@10 (one relevant item per user:
   ``1 / log2(rank + 1)`` when it is in the top 10, else 0; every test user counts, a user RecTools returns
   nothing for counts as a miss), Coverage@10 (distinct items in all test users' top 10 / the full catalogue
   ``len(inter.item_map)``) and ``fit_seconds``, the wall time of that final ``fit`` call.

Events are handed to RecTools in recforge's per-user order (timestamp, then item index) with the row's rank in
that order as its datetime, so both libraries see identical sequences even where timestamps tie.

Model settings (from the issue): SASRec ``loss="softmax", n_blocks=2, n_factors=64, session_max_len=100``;
BERT4Rec ``n_factors=64`` and RecTools' other defaults; everything else RecTools' defaults. Seeded with
``lightning.seed_everything(0, workers=True)`` before every fit.

Threads: ``--threads N`` (default 1) sets OMP_NUM_THREADS, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS before torch is
imported, then ``torch.set_num_threads(N)`` and ``torch.set_num_interop_threads(N)``; the Lightning trainer is
built by a custom ``get_trainer_func`` with ``accelerator="cpu", devices=1`` (``--device cuda``: ``"gpu"``), no
checkpointing, no logger, no progress bar; data loading in the main process (``dataloader_num_workers=0``) and
ranking with torch on the same device (``recommend_torch_device``). ``RECFORGE_BENCH_DATA`` is a folder holding
``ml-100k/`` (default ``../shared/data``).

Run (needs the peers venv, which has RecTools with its torch extra)::

    /work/peers/bin/python benchmarks/peers_rectools_seq.py
    /work/peers/bin/python benchmarks/peers_rectools_seq.py --datasets ml-100k --threads 1 \\
        --out benchmarks/results/rectools_seq.json

At one thread the default grids take about 38 min on ML-100K (both models chose 80 epochs) and 27 min on
ml-latest-small on the 2-core dev machine. Results are merged into an existing ``--out`` measured with the same
thread count (``--datasets``/``--models`` redo only those entries; ``--fresh`` starts over), and the JSON is
written after every dataset. ``--epochs 3,10`` replaces every grid (quick runs).

The JSON is written atomically and read by recforge's sequential benchmark through :func:`load_results`; this
module imports RecTools/torch only inside the functions that run them, so it imports fine without them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from early_threads import early_threads

if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = str(early_threads(sys.argv[1:], 1))

import numpy as np
import pandas as pd

log = logging.getLogger("peers_rectools_seq")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "rectools_seq.json"
K = 10
SEED = 0

#: where each dataset name is loaded from (relative to the repo root, or a recforge embedded dataset name)
DATASETS: dict[str, str] = {
    "ml-100k": str(Path(os.environ.get("RECFORGE_BENCH_DATA", ROOT.parent / "shared" / "data")) / "ml-100k"),
    "ml-latest-small": "ml-latest-small",
}

#: fixed model settings (from the issue); everything not listed is RecTools' default
MODEL_PARAMS: dict[str, dict[str, Any]] = {
    "sasrec": {"loss": "softmax", "n_blocks": 2, "n_factors": 64, "session_max_len": 100},
    "bert4rec": {"n_factors": 64},
}

#: epoch counts tried on the validation event (from the issue); ml-latest-small starts at RecTools' default of 3.
#: One epoch at one thread costs about 6.5 s (SASRec) / 7.5 s (BERT4Rec) on ML-100K and about 12.5 s / 13.5 s on
#: ml-latest-small (9,724-way softmax), so a full run is about 70 minutes; ``--datasets`` runs one at a time.
EPOCH_GRIDS: dict[str, dict[str, list[int]]] = {
    "ml-100k": {"sasrec": [20, 40, 80], "bert4rec": [20, 40, 80]},
    "ml-latest-small": {"sasrec": [3, 10, 30], "bert4rec": [3, 10, 30]},
}
#: a line per dataset whose default grid was cut for run time (printed and stored in the JSON); none now
GRID_NOTES: dict[str, str] = {}


def load_results(path: str | os.PathLike[str] = DEFAULT_OUT) -> dict[str, Any]:
    """The results JSON written by this script: ``{dataset: {model: {...}}, "meta": {...}}``."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _previous_results(path: Path, threads: int) -> dict[str, Any]:
    """The results already at ``path`` when they were measured with the same thread count, else nothing."""
    try:
        previous = load_results(path)
    except (OSError, ValueError):
        return {}
    if previous.get("meta", {}).get("threads") != threads:
        log.warning("%s holds results for another thread count; starting afresh", path)
        return {}
    return previous


def _write_json_atomic(data: dict[str, Any], path: Path) -> None:
    """Write via a temporary file in the same folder and ``os.replace``, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------- metrics


def topk_metrics(reco: pd.DataFrame, targets: dict[Any, Any], n_items: int, k: int = K) -> dict[str, float]:
    """HR@k, NDCG@k and Coverage@k of a top-k list against one held-out item per user.

    ``reco`` has columns ``user_id``, ``item_id``, ``rank`` (1-based); ``targets`` maps every evaluated user to
    its held-out item. Users missing from ``reco`` count as misses; coverage counts the distinct items in the
    top k of the evaluated users over ``n_items`` (the full catalogue).
    """
    if not targets:
        raise ValueError("no evaluation users")
    reco = reco[(reco["rank"] <= k) & reco["user_id"].isin(targets.keys())]
    target_of_row = reco["user_id"].map(targets)
    hits = reco[reco["item_id"].to_numpy() == target_of_row.to_numpy()]
    # a user may appear at most once among the hits: a top-k list holds an item once
    ranks = hits.groupby("user_id")["rank"].min().to_numpy(dtype=np.float64)
    n_users = len(targets)
    return {
        f"hr@{k}": float(len(ranks) / n_users),
        f"ndcg@{k}": float(np.sum(1.0 / np.log2(ranks + 1.0)) / n_users),
        f"coverage@{k}": float(reco["item_id"].nunique() / n_items),
    }


def _check_metrics() -> None:
    """Hand example: 3 users, catalogue of 10 items.

    u1 finds its item at rank 1 (gain 1), u2 at rank 3 (gain 1/log2(4) = 0.5), u3 gets nothing (miss).
    HR = 2/3, NDCG = 1.5/3 = 0.5; top lists hold items {a, b, c, d} -> coverage 4/10. A row ranked past k is
    ignored (u3's hit at rank 11 must not count).
    """
    reco = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u2", "u3"],
            "item_id": ["a", "b", "b", "c", "d", "x"],
            "rank": [1, 2, 1, 2, 3, 11],
        }
    )
    got = topk_metrics(reco, {"u1": "a", "u2": "d", "u3": "x"}, n_items=10)
    want = {"hr@10": 2 / 3, "ndcg@10": 0.5, "coverage@10": 0.4}
    for key, value in want.items():
        if not math.isclose(got[key], value, rel_tol=1e-12):
            raise AssertionError(f"metric self-check failed: {key} = {got[key]}, expected {value}")


# -------------------------------------------------------------------------------------------------- RecTools


def _set_threads(threads: int) -> None:
    """Thread pools of OpenMP/MKL are sized at import, so the variables go in before torch is imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable once, before any inter-op work; harmless if already set
        log.warning("could not set torch inter-op threads (already in use)")


def _to_rectools_dataset(inter: Any) -> Any:
    """A RecTools Dataset of ``inter`` (weight 1), events dated by their rank in recforge's per-user order."""
    from rectools import Columns
    from rectools.dataset import Dataset

    order = inter.time_order()
    frame = pd.DataFrame(
        {
            Columns.User: inter.user_map.to_ids(inter.users[order]),
            Columns.Item: inter.item_map.to_ids(inter.items[order]),
            Columns.Weight: 1.0,
            Columns.Datetime: pd.Timestamp("2000-01-01") + pd.to_timedelta(np.arange(len(order)), unit="s"),
        }
    )
    return Dataset.construct(frame)


def _targets(part: Any) -> dict[Any, Any]:
    """Held-out item (original id) per user of a split part with one event per user."""
    frame = part.to_frame()
    if frame["user_id"].duplicated().any():
        raise ValueError("expected one held-out event per user")
    return dict(zip(frame["user_id"].tolist(), frame["item_id"].tolist()))


def _make_trainer(epochs: int, snapshot_epochs: list[int] | None = None, accelerator: str = "cpu") -> Any:
    """The Lightning trainer for every fit: one device, no checkpoints/logger/progress bar; with
    ``snapshot_epochs`` it carries an :func:`_epoch_snapshots_callback` (built here because RecTools keeps
    the trainer arguments in its serialisable model config)."""
    from pytorch_lightning import Trainer

    return Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        min_epochs=epochs,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_epoch_snapshots_callback(snapshot_epochs)] if snapshot_epochs else [],
    )


def _epoch_snapshots_callback(epochs: list[int]) -> Any:
    """A callback keeping a copy of the network weights and the elapsed seconds at the end of each epoch count."""
    from pytorch_lightning import Callback

    class EpochSnapshots(Callback):
        """Weights and elapsed seconds at the end of the chosen epoch counts."""

        def __init__(self) -> None:
            self.epochs = set(epochs)
            self.snapshots: dict[int, tuple[dict[str, Any], float]] = {}
            self.start = 0.0

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            done = trainer.current_epoch + 1
            if done in self.epochs:
                elapsed = time.perf_counter() - self.start
                state = {k: v.detach().clone() for k, v in pl_module.torch_model.state_dict().items()}
                self.snapshots[done] = (state, elapsed)

    return EpochSnapshots()


def _make_model(name: str, epochs: int, threads: int, device: str, snapshot_epochs: list[int] | None = None) -> Any:
    from rectools.models import BERT4RecModel, SASRecModel

    cls = {"sasrec": SASRecModel, "bert4rec": BERT4RecModel}[name]
    accelerator = "gpu" if device == "cuda" else "cpu"
    return cls(
        epochs=epochs,
        verbose=0,
        dataloader_num_workers=0,
        recommend_torch_device=device,
        recommend_n_threads=threads,
        get_trainer_func=_make_trainer,
        get_trainer_func_kwargs={"epochs": epochs, "snapshot_epochs": snapshot_epochs, "accelerator": accelerator},
        **MODEL_PARAMS[name],
    )


def _recommend(model: Any, dataset: Any, users: list[Any]) -> pd.DataFrame:
    from rectools import Columns

    reco = model.recommend(
        users=users, dataset=dataset, k=K, filter_viewed=True, on_unsupported_targets="warn"
    )
    return reco.rename(columns={Columns.User: "user_id", Columns.Item: "item_id", Columns.Rank: "rank"})


def _seed() -> None:
    from pytorch_lightning import seed_everything

    seed_everything(SEED, workers=True)


def tune_epochs(
    name: str, grid: list[int], train_ds: Any, valid_targets: dict[Any, Any], n_items: int, threads: int, device: str
) -> list[dict[str, Any]]:
    """Validation NDCG@10 of every epoch count in ``grid``, from snapshots of one fit with ``max(grid)`` epochs."""
    model = _make_model(name, max(grid), threads, device, snapshot_epochs=sorted(grid))
    _seed()
    model.fit(train_ds)
    # RecTools deep-copies the trainer (and with it the callback) for every fit: read the fitted copy
    fitted_cb = next(cb for cb in model.fit_trainer.callbacks if hasattr(cb, "snapshots"))
    users = list(valid_targets)
    out = []
    for epochs in sorted(grid):
        state, elapsed = fitted_cb.snapshots[epochs]
        model.torch_model.load_state_dict(state)
        metrics = topk_metrics(_recommend(model, train_ds, users), valid_targets, n_items)
        out.append(
            {
                "epochs": epochs,
                "valid_ndcg@10": metrics["ndcg@10"],
                "valid_hr@10": metrics["hr@10"],
                "fit_seconds": round(elapsed, 2),
            }
        )
        log.info(
            "  %s %d epochs: valid NDCG@10 %.4f (%.1f s into the fit)",
            name,
            epochs,
            metrics["ndcg@10"],
            elapsed,
        )
    return out


def run_model(name: str, split: Any, n_items: int, grid: list[int], threads: int, device: str) -> dict[str, Any]:
    """Tune epochs on the validation event, refit on train + validation, evaluate on the test event."""
    train_ds = _to_rectools_dataset(split.train)
    tuning = tune_epochs(name, grid, train_ds, _targets(split.valid), n_items, threads, device)
    best = max(tuning, key=lambda r: (r["valid_ndcg@10"], -r["epochs"]))["epochs"]

    full_ds = _to_rectools_dataset(split.train_valid)
    test_targets = _targets(split.test)
    model = _make_model(name, best, threads, device)
    _seed()
    t0 = time.perf_counter()
    model.fit(full_ds)
    fit_seconds = time.perf_counter() - t0
    metrics = topk_metrics(_recommend(model, full_ds, list(test_targets)), test_targets, n_items)
    log.info("  %s refit %d epochs: %s in %.1f s", name, best, metrics, fit_seconds)
    return {
        **metrics,
        "fit_seconds": round(fit_seconds, 2),
        "epochs": best,
        "params": {**MODEL_PARAMS[name], "epochs": best},
        "tuning": tuning,
        # the best epoch count is the largest tried: more epochs might still help, the figure may understate
        "best_at_grid_edge": best == max(grid) and len(grid) > 1,
        "n_test_users": len(test_targets),
    }


def run_dataset(name: str, threads: int, device: str, models: list[str], grids: dict[str, list[int]]) -> dict[str, Any]:
    from recforge.data.datasets import load
    from recforge.evaluation import get_protocol

    inter = load(DATASETS[name])
    (split,) = get_protocol("loo").splits(inter)
    n_items = len(inter.item_map)
    log.info("%s: %s, split %s", name, inter, split.summary())
    return {m: run_model(m, split, n_items, grids[m], threads, device) for m in models}


def markdown_table(results: dict[str, Any]) -> str:
    """One row per dataset and model."""
    lines = [
        "| dataset | model | HR@10 | NDCG@10 | Coverage@10 | epochs | fit s | valid NDCG@10 by epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ds, per_model in results.items():
        if ds == "meta":
            continue
        for model, r in per_model.items():
            tuning = ", ".join(f"{t['epochs']}: {t['valid_ndcg@10']:.4f}" for t in r["tuning"])
            lines.append(
                f"| {ds} | {model} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['coverage@10']:.3f} | "
                f"{r['epochs']} | {r['fit_seconds']:.1f} | {tuning} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--datasets", default="ml-100k,ml-latest-small", help="comma-separated; " + ", ".join(DATASETS)
    )
    parser.add_argument("--models", default="sasrec,bert4rec", help="comma-separated: sasrec, bert4rec")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where RecTools trains and ranks")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON path")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="drop the datasets already in --out instead of keeping those this run does not redo",
    )
    parser.add_argument(
        "--epochs",
        default="",
        help="comma-separated epoch grid replacing EPOCH_GRIDS for every dataset and model (e.g. 3,10,30)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    datasets = [d for d in args.datasets.split(",") if d]
    models = [m for m in args.models.split(",") if m]
    bad = [d for d in datasets if d not in DATASETS] + [m for m in models if m not in MODEL_PARAMS]
    if bad or args.threads < 1:
        parser.error(f"unknown dataset/model {bad}" if bad else "--threads must be >= 1")
    try:
        override = sorted({int(e) for e in args.epochs.split(",") if e.strip()})
    except ValueError:
        parser.error("--epochs must be comma-separated integers")
    if any(e < 1 for e in override):
        parser.error("--epochs values must be >= 1")
    grids = {
        d: ({m: override for m in models} if override else {m: EPOCH_GRIDS[d][m] for m in models})
        for d in datasets
    }

    _check_metrics()
    _set_threads(args.threads)
    import pytorch_lightning  # noqa: F401  (configures its loggers at import; quieted below)
    import rectools
    import torch

    # Lightning logs accelerator lines per fit; RecTools warns that there are no item features and about
    # pandas/pydantic deprecations inside itself. None of it says anything about the run.
    for noisy in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for module in ("pydantic", "pytorch_lightning", "rectools"):
        warnings.filterwarnings("ignore", module=module)

    t_start = time.perf_counter()
    out = Path(args.out)
    results = _previous_results(out, args.threads) if not args.fresh else {}
    meta = results.pop("meta", {})
    per_dataset = meta.get("datasets", {})
    for ds in datasets:
        t_ds = time.perf_counter()
        results[ds] = {**results.get(ds, {}), **run_dataset(ds, args.threads, args.device, models, grids[ds])}
        per_dataset[ds] = {
            "epoch_grids": {**per_dataset.get(ds, {}).get("epoch_grids", {}), **grids[ds]},
            "grid_note": "" if override else GRID_NOTES.get(ds, ""),
            "seconds": round(time.perf_counter() - t_ds, 1),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        meta = {
            "threads": args.threads,
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "rectools": rectools.__version__,
            "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "protocol": "recforge leave_one_out; epochs tuned on the validation event (snapshots of one fit), "
            "refit on train+valid, test event, seen items excluded",
            "datasets": per_dataset,
            "run_seconds": round(time.perf_counter() - t_start, 1),
        }
        # after every dataset, so a long run keeps what it finished; other datasets' entries are kept
        _write_json_atomic({**results, "meta": meta}, out)
    print(markdown_table(results))
    edge = [
        f"{d}/{m}"
        for d, per in results.items()
        if d != "meta"
        for m, r in per.items()
        if r["best_at_grid_edge"]
    ]
    for ds in datasets:
        if per_dataset[ds]["grid_note"]:
            print(f"\nnote ({ds}): {per_dataset[ds]['grid_note']}")
    if edge:
        print(f"best epoch count at the top of its grid (more epochs might still help): {', '.join(edge)}")
    print(f"\nthis run {meta['run_seconds']:.0f} s, threads {args.threads}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
