"""Interactive benchmark: every policy in slate environments built from real data, and steps per second.

Usage::

    python benchmarks/bench_interactive.py                       # both parts, both datasets
    python benchmarks/bench_interactive.py --parts speed

Parts:

``policies``  :func:`recforge.interactive.make_environments` on ml-latest-small and ML-100K (a third of the users
              with 20+ events train, the rest test; each shows the first half of its events; hidden preferences from
              ALS on all events, default :class:`~recforge.interactive.UserBehaviour`). Every policy is fitted on the
              visible events, plays ``--train-episodes`` on the training users (learning online), and then
              ``--test-episodes`` on the testing users, each starting from its best training state (notebook 000's
              workflow). Click-through rate and mean per-user score with 95% t-intervals across test episodes;
              per-user ``user_id,avg_score`` CSVs and the click-through curves go to ``--out``.
``speed``     one 2,000-user test episode per policy on a synthetic dataset (3,000 users, 5,000 items), steps/s.

Threads: ``--threads N`` (default 2) limits BLAS, numba and torch. Results: ``benchmarks/results/interactive.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="ml-latest-small,ml-100k")
    p.add_argument("--parts", default="policies,speed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-episodes", type=int, default=1)
    p.add_argument("--test-episodes", type=int, default=5)
    p.add_argument("--policies", default=None, help="comma-separated labels (default: all)")
    p.add_argument("--out", default=str(HERE / "results" / "interactive.json"))
    p.add_argument("--csv-dir", default="results/simulate-bench")
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

sys.path.insert(0, str(HERE))
from bench_sequential import dataset, md

from recforge.data.datasets import load, make_synthetic
from recforge.interactive import create_policy, make_environments, save_results, simulate
from recforge.interactive.harness import play_episode, results_table

#: Policies of the table: label → (policy name, parameters); "oracle" gets the true preferences.
POLICIES: dict[str, tuple[str, dict]] = {
    "random": ("random", {}),
    "pop": ("pop", {}),
    "greedy-static": ("greedy", {"learn": False}),
    "greedy": ("greedy", {}),
    "egreedy": ("egreedy", {}),
    "hybrid (notebook 000)": ("hybrid", {}),
    "hybrid-static": ("hybrid", {"learn": False}),
    "linucb": ("linucb", {}),
    "thompson": ("thompson", {}),
    "gru4rec": ("sequential", {"model": "gru4rec", "params": {"epochs": 10}}),
    "oracle": ("oracle", {}),
}
STATIC = ("random", "pop", "greedy-static", "hybrid-static")


def _policy(label: str, envs, threads: int):  # type: ignore[no-untyped-def]
    name, params = POLICIES[label]
    params = dict(params)
    if name == "oracle":
        params["truth"] = envs.truth
    if name == "sequential":
        params["params"] = {**params["params"], "num_threads": threads}
    return create_policy(name, **params)


def part_policies(ds: str, threads: int) -> list[dict]:
    envs = make_environments(load(dataset(ds)))
    labels = list(POLICIES) if ARGS is None or ARGS.policies is None else ARGS.policies.split(",")
    results = []
    for label in labels:
        res = simulate(_policy(label, envs, threads), envs, ARGS.train_episodes, ARGS.test_episodes,
                       progress=False, name=label)
        results.append(res)
        print(label, {k: round(v, 4) for k, v in res.summary().items()}, flush=True)
    save_results(results, Path(ARGS.csv_dir) / ds)
    table = results_table(results)
    table.insert(1, "learns", [label not in STATIC and label != "oracle" for label in table["policy"]])
    table.attrs["users"] = f"{len(envs.train.users)} training / {len(envs.test.users)} testing users"
    print(ds, table.attrs["users"])
    return table.to_dict("records")


def part_speed(threads: int) -> list[dict]:
    data = make_synthetic(n_users=3000, n_items=5000, n_interactions=300_000, n_clusters=20, seed=1).deduplicate("last")
    envs = make_environments(data, n_train_users=500, n_test_users=2000, min_events=20)
    rows = []
    for label in POLICIES:
        if label in ("hybrid (notebook 000)", "hybrid-static"):
            continue  # the synthetic data has no text for the content half
        policy = _policy(label, envs, threads).fit(envs.visible)
        start = time.perf_counter()
        res = play_episode(policy, envs.test)
        rows.append({"policy": label, "steps": res.steps, "seconds": time.perf_counter() - start,
                     "steps/s": res.steps_per_second, "ctr": res.ctr})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    assert ARGS is not None
    out = Path(ARGS.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["meta"] = {"threads": ARGS.threads, "train_episodes": ARGS.train_episodes,
                       "test_episodes": ARGS.test_episodes, "date": time.strftime("%Y-%m-%d")}
    parts = ARGS.parts.split(",")
    if "policies" in parts:
        for ds in ARGS.datasets.split(","):
            rows = part_policies(ds, ARGS.threads)
            results[ds] = rows
            print(f"\n### {ds}\n\n" + md(rows, list(rows[0].keys())))
    if "speed" in parts:
        results["speed"] = part_speed(ARGS.threads)
        print("\n### speed (2,000 test users, synthetic)\n\n" + md(results["speed"], ["policy", "steps", "seconds", "steps/s", "ctr"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
