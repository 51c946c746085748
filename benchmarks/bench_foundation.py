"""Benchmark the foundation of recforge: dataset loading, score-matrix metrics and full-ranking evaluation.

Usage::

    python benchmarks/bench_foundation.py             # full sizes, checked against the issue targets
    python benchmarks/bench_foundation.py --quick     # smaller synthetic task, fewer repeats
    python benchmarks/bench_foundation.py --markdown  # print the table as markdown

Every task runs in a fresh Python process started with :mod:`subprocess`, so its peak memory is its own and
not that of an earlier task. The child's peak resident set size comes from ``os.wait4``, which returns the
``rusage`` of exactly that child (``getrusage(RUSAGE_CHILDREN)`` would give the running maximum over *all*
children reaped so far, so a small task measured after a big one would inherit the big one's figure).
Timings are taken inside the child around the call being measured, after the imports, so interpreter start
and ``import recforge`` do not count.

Tasks and targets:

1. ``load("ml-latest-small")`` (embedded zip) in a fresh process: < 1 s.
2. ``load(<repo>/../shared/data/ml-100k)`` in a fresh process: < 1 s (skipped when the folder is absent).
3. ``evaluate_scores`` of a random 943 x 1,682 float32 score matrix on the ML-100K leave-one-out test,
   excluding train + valid, HR/NDCG/MRR@10, after one warm-up call, median of 5: < 0.2 s.
4. ``evaluate(model, test, k=10)`` of a random 64-factor model on synthetic data (100k users x 20k items,
   2M interactions, leave-one-out), full ranking with seen-item exclusion: < 60 s and peak memory < 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
ML100K_DIR = (REPO_ROOT / ".." / "shared" / "data" / "ml-100k").resolve()

MB = 1_000_000  # memory is reported in decimal megabytes, so "3 GB" means 3,000 MB
LOAD_TARGET_S = 1.0
SCORES_TARGET_S = 0.2
EVALUATE_TARGET_S = 60.0
EVALUATE_TARGET_MB = 3_000.0


# ====================================================================== helpers shared by parent and children
def self_peak_mb() -> float:
    """Peak RSS of the calling process so far, in MB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def rusage_peak_mb(usage: resource.struct_rusage) -> float:
    """``ru_maxrss`` of an rusage record in MB."""
    return usage.ru_maxrss / MB if sys.platform == "darwin" else usage.ru_maxrss * 1024 / MB


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Call ``fn`` once and return (seconds, result)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


# ====================================================================== tasks (run inside a child process)
def task_load(source: str) -> dict[str, Any]:
    """Import the loader, then time one ``load(source)`` call: the first load in a fresh interpreter."""
    t_import, _ = timed(__import__, "recforge.data.datasets")
    from recforge.data.datasets import load

    seconds, data = timed(load, source)
    return {
        "seconds": seconds,
        "import_seconds": t_import,
        "size": f"{len(data):,} rows, {data.n_users:,} users x {data.n_items:,} items",
    }


def task_scores(source: str, repeats: int) -> dict[str, Any]:
    """Time ``evaluate_scores`` of a random score matrix on the ML-100K leave-one-out test (warm, median)."""
    import numpy as np

    from recforge.data.datasets import load
    from recforge.evaluation import evaluate_scores, get_protocol

    data = load(source)
    (split,) = get_protocol("loo").splits(data)
    test = split.test.csr("ones")
    exclude = split.train_valid.csr("ones")
    scores = np.random.default_rng(0).random((data.n_users, data.n_items), dtype=np.float32)

    warmup, metrics = timed(evaluate_scores, scores, test, k=10, exclude=exclude)
    times = [timed(evaluate_scores, scores, test, k=10, exclude=exclude)[0] for _ in range(repeats)]
    return {
        "seconds": statistics.median(times),
        "times": times,
        "warmup_seconds": warmup,
        "size": f"{scores.shape[0]:,} x {scores.shape[1]:,} scores, {test.nnz:,} test items",
        "metrics": {m: round(metrics[m], 4) for m in ("hr@10", "ndcg@10", "mrr@10") if m in metrics},
        "metric_names": sorted(metrics),
    }


def task_synthetic(n_users: int, n_items: int, n_interactions: int, factors: int) -> dict[str, Any]:
    """Generate + split synthetic data, fit a random factor model and time a full-ranking ``evaluate``."""
    import numpy as np

    from recforge.data.datasets import make_synthetic
    from recforge.data.interactions import Interactions
    from recforge.evaluation import evaluate, get_protocol
    from recforge.models.base import Recommender

    def leave_one_out(data: Interactions):  # type: ignore[no-untyped-def]
        return get_protocol("loo").splits(data)[0]

    class RandomFactors(Recommender):
        """A stand-in matrix factorisation: random float32 user and item factors, scores ``U[users] @ V.T``."""

        def __init__(self, factors: int = 64, seed: int = 0) -> None:
            self.factors = factors
            self.seed = seed

        def _fit(self, interactions: Interactions) -> None:
            rng = np.random.default_rng(self.seed)
            self.user_factors_ = rng.standard_normal((interactions.n_users, self.factors), dtype=np.float32)
            self.item_factors_ = rng.standard_normal((interactions.n_items, self.factors), dtype=np.float32)

        def _score(self, users: np.ndarray) -> np.ndarray:
            return self.user_factors_[users] @ self.item_factors_.T

    # The JIT kernels are cached on disk; a tiny run makes sure they are compiled/loaded before timing.
    t0 = time.perf_counter()
    tiny = make_synthetic(50, 40, 500, seed=1)
    tiny_split = leave_one_out(tiny)
    evaluate(RandomFactors(4).fit(tiny_split.train), tiny_split.test, k=10)
    warmup = time.perf_counter() - t0
    peak_before = self_peak_mb()

    t_gen, data = timed(
        make_synthetic, n_users=n_users, n_items=n_items, n_interactions=n_interactions, seed=0
    )
    t_split, split = timed(leave_one_out, data)
    peak_after_data = self_peak_mb()

    t_fit, model = timed(RandomFactors(factors, seed=0).fit, split.train)
    t_eval, result = timed(evaluate, model, split.test, k=10)
    return {
        "generate_seconds": t_gen,
        "split_seconds": t_split,
        "fit_seconds": t_fit,
        "seconds": t_eval,
        "warmup_seconds": warmup,
        "peak_before_mb": peak_before,
        "peak_after_data_mb": peak_after_data,
        "rows": len(data),
        "test_users": int(result.summary["users"]),
        "metrics": {m: round(v, 5) for m, v in result.summary.items() if m.endswith("@10")},
    }


TASKS = {"load": task_load, "scores": task_scores, "synthetic": task_synthetic}


def child_main(name: str, kwargs_json: str) -> None:
    """Entry point of a child process: run one task and print its result as one JSON line on stdout."""
    out = TASKS[name](**json.loads(kwargs_json))
    out["self_peak_mb"] = self_peak_mb()
    print("RESULT " + json.dumps(out), flush=True)


def run_in_child(name: str, **kwargs: Any) -> tuple[dict[str, Any], float]:
    """Run a task in a fresh interpreter; return its result and the child's peak RSS (MB) from ``wait4``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, json.dumps(kwargs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert proc.stdout is not None
    stdout = proc.stdout.read()  # stderr is inherited, so warnings and tracebacks show up as they happen
    proc.stdout.close()
    # Reap the child ourselves: wait4 returns the rusage of this one child (Popen.wait would discard it).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"task {name!r} failed with exit code {proc.returncode}")
    line = next(ln for ln in reversed(stdout.splitlines()) if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), rusage_peak_mb(usage)


# ====================================================================== the table
@dataclass
class Row:
    """One line of the result table. ``ok`` is None when there is nothing to check (or the task was skipped)."""

    task: str
    size: str
    seconds: float | None
    peak_mb: float | None
    target: str
    ok: bool | None
    notes: str = ""
    cells: list[str] = field(init=False)

    def __post_init__(self) -> None:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[self.ok]
        self.cells = [
            self.task,
            self.size,
            "-" if self.seconds is None else f"{self.seconds:.3f}",
            "-" if self.peak_mb is None else f"{self.peak_mb:,.0f}",
            self.target,
            verdict,
            self.notes,
        ]


HEADER = ["task", "size", "seconds", "peak MB", "target", "result", "notes"]


def format_table(rows: list[Row], markdown: bool) -> str:
    """Render rows as an aligned text table or as a GitHub markdown table."""
    cells = [r.cells for r in rows]
    if markdown:
        esc = [[c.replace("|", "\\|") for c in row] for row in cells]
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * len(HEADER)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in esc]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(HEADER)]
    right = {2, 3}  # numbers right-aligned

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(HEADER), fmt(["-" * w for w in widths]), *(fmt(row) for row in cells)])


def machine_facts() -> list[str]:
    """CPU count, Python / numpy versions and the BLAS libraries numpy loaded (via threadpoolctl)."""
    import numpy as np
    from threadpoolctl import threadpool_info

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    lines = [
        f"machine : {platform.platform()} ({platform.machine()}), {os.cpu_count()} CPUs ({usable} usable)",
        f"python  : {platform.python_version()} ({platform.python_implementation()})",
        f"numpy   : {np.__version__}",
    ]
    for lib in threadpool_info():
        lines.append(
            f"{lib.get('user_api', '?'):8}: {lib.get('internal_api')} {lib.get('version')} "
            f"({lib.get('architecture', '-')}, {lib.get('threading_layer', '-')}), "
            f"{lib.get('num_threads')} threads, {Path(lib.get('filepath', '')).name}"
        )
    try:
        import numba

        lines.append(f"numba   : {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads")
    except ImportError:
        pass
    return lines


# ====================================================================== benchmark driver
def bench_load(label: str, source: str, repeats: int) -> Row:
    """Tasks 1 and 2: one fresh process per repeat; median of the first-load times, max of the peaks."""
    results = [run_in_child("load", source=source) for _ in range(repeats)]
    times = [r["seconds"] for r, _ in results]
    seconds = statistics.median(times)
    peak = max(p for _, p in results)
    imports = statistics.median(r["import_seconds"] for r, _ in results)
    return Row(
        label,
        results[0][0]["size"],
        seconds,
        peak,
        f"< {LOAD_TARGET_S:g} s",
        seconds < LOAD_TARGET_S,
        f"median of {repeats} fresh processes (min {min(times):.3f}, max {max(times):.3f}); "
        f"import recforge.data.datasets {imports:.2f} s not counted",
    )


def run(args: argparse.Namespace) -> list[Row]:
    """Run every task and return the table rows."""
    rows: list[Row] = []
    repeats = args.repeats or (3 if args.quick else 5)

    # 1. embedded dataset
    rows.append(bench_load("1. load ml-latest-small (embedded)", "ml-latest-small", repeats))

    # 2 + 3 need ML-100K
    if not (ML100K_DIR / "u.data").is_file():
        note = f"skipped: {ML100K_DIR} not found"
        rows.append(Row("2. load ml-100k (folder)", "-", None, None, f"< {LOAD_TARGET_S:g} s", None, note))
        rows.append(Row("3. evaluate_scores HR/NDCG/MRR@10", "-", None, None, f"< {SCORES_TARGET_S:g} s", None, note))
    else:
        rows.append(bench_load("2. load ml-100k (folder)", str(ML100K_DIR), repeats))
        res, peak = run_in_child("scores", source=str(ML100K_DIR), repeats=5)
        metrics = ", ".join(f"{k}={v}" for k, v in res["metrics"].items())
        rows.append(
            Row(
                "3. evaluate_scores HR/NDCG/MRR@10",
                res["size"],
                res["seconds"],
                peak,
                f"< {SCORES_TARGET_S:g} s",
                res["seconds"] < SCORES_TARGET_S,
                f"median of 5 after 1 warm-up ({res['warmup_seconds']:.2f} s); "
                f"min {min(res['times']):.3f}, max {max(res['times']):.3f}; {metrics}",
            )
        )

    # 4. synthetic full-ranking evaluation
    n_users, n_items, n_inter = (20_000, 5_000, 400_000) if args.quick else (100_000, 20_000, 2_000_000)
    res, peak = run_in_child(
        "synthetic", n_users=n_users, n_items=n_items, n_interactions=n_inter, factors=args.factors
    )
    size = f"{n_users:,} users x {n_items:,} items, {n_inter:,} rows"
    check = None if args.quick else True  # quick sizes are too small to say anything about the issue target
    rows.append(
        Row(
            "4a. make_synthetic + leave_one_out",
            size,
            res["generate_seconds"] + res["split_seconds"],
            res["peak_after_data_mb"],
            "-",
            None,
            f"generate {res['generate_seconds']:.2f} s + split {res['split_seconds']:.2f} s; "
            "peak = child's RSS peak right after the split",
        )
    )
    rows.append(
        Row(
            "4b. fit random factors",
            f"{args.factors} factors",
            res["fit_seconds"],
            None,
            "-",
            None,
            "fit() builds the seen-item CSR and draws U, V",
        )
    )
    ok_time = res["seconds"] < EVALUATE_TARGET_S
    ok_mem = peak < EVALUATE_TARGET_MB
    verdict = (ok_time and ok_mem) if check else None
    fails = [w for w, ok in (("time", ok_time), ("memory", ok_mem)) if not ok]
    metrics = ", ".join(f"{k}={v}" for k, v in res["metrics"].items() if k in ("hr@10", "ndcg@10", "mrr@10"))
    rows.append(
        Row(
            "4c. evaluate full ranking, k=10",
            f"{res['test_users']:,} test users x {n_items:,} items",
            res["seconds"],
            peak,
            f"< {EVALUATE_TARGET_S:g} s, < {EVALUATE_TARGET_MB:,.0f} MB" + (" (full size)" if args.quick else ""),
            verdict,
            "peak = whole child process (data + model + evaluate); "
            f"JIT warm-up {res['warmup_seconds']:.2f} s not counted; {metrics}"
            + (f"; failed on {' and '.join(fails)}" if fails and check else ""),
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, print the machine facts and the result table; exit 1 when a target fails."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller synthetic task (20k x 5k) and 3 repeats")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--repeats", type=int, default=None, help="fresh processes per load task (default 5, quick 3)")
    parser.add_argument("--factors", type=int, default=64, help="factors of the random model in task 4")
    args = parser.parse_args(argv)

    print("\n".join(machine_facts()))
    print(f"mode    : {'quick' if args.quick else 'full'}; every task in a fresh process; peak MB = ru_maxrss\n")
    rows = run(args)
    print(format_table(rows, args.markdown))
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
