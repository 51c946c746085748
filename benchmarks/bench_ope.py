"""Off-policy estimates against the simulator's truth: bias, RMSE, interval coverage and target order.

For every seed: build the simulator on the dataset, log the test episodes of an ε-greedy static ALS (recforge's
``ExploringPolicy``; ``--logger mix``: ALS or popularity's slate, ``MixturePolicy``) until the largest log size is reached, while the simulator's choice model gives every target
policy's exact expected clicks in each logged context (the *contextual truth*, what an estimate from this log
targets); play every target online in the same simulator for its *online truth* (test episodes' click-through
rate); then estimate each target from the first N logged impressions with each estimator.

Usage::

    python benchmarks/bench_ope.py                             # ml-latest-small, 5 seeds, 1k and 10k impressions
    python benchmarks/bench_ope.py --seeds 20 --sizes 1000,10000,100000 --behaviour fixed
    python benchmarks/bench_ope.py --data ../shared/data/ml-100k

``--behaviour fixed`` makes every session last ``--horizon`` slates whatever is shown (no leaving after misses), so
the contexts a logger meets are those a target meets online; the default behaviour lets users leave after three
slates without a click, which makes the two truths differ. Prints one markdown table per truth and writes
``benchmarks/results/ope.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

import recforge.datasets as rd
from recforge.core.slates import EpsilonGreedy
from recforge.data.datasets.movielens import load_movielens
from recforge.interactive import (
    ExploringPolicy,
    ImpressionRecorder,
    MixturePolicy,
    Policy,
    UserBehaviour,
    create_policy,
    make_environments,
    simulate,
)
from recforge.interactive.impression_log import log_episodes
from recforge.ope import evaluate_targets

HERE = Path(__file__).resolve().parent
TARGETS = ("als", "pop", "random")


def make_target(name: str, seed: int) -> Policy:
    """A fresh, unfitted target policy (static)."""
    return {"als": lambda: create_policy("greedy", learn=False, seed=seed), "pop": lambda: create_policy("pop", seed=seed),
            "random": lambda: create_policy("random", seed=seed)}[name]()


def one_seed(data, seed: int, args: argparse.Namespace) -> list[dict]:  # type: ignore[no-untyped-def]
    """Log, the two truths and every estimate of one seed (one row per estimator × target × log size)."""
    behaviour = UserBehaviour() if args.behaviour == "default" else UserBehaviour(horizon=args.horizon,
                                                                                 patience=args.horizon)
    envs = make_environments(data, seed=seed, behaviour=behaviour)
    if args.logger == "epsilon":
        logger: Policy = ExploringPolicy(make_target("als", seed), EpsilonGreedy(behaviour.slate_size, args.epsilon))
    else:  # ALS with probability 1 - ε, popularity with ε
        logger = MixturePolicy([make_target("als", seed), make_target("pop", seed)], [1 - args.epsilon, args.epsilon])
    logger.fit(envs.visible)
    # random's shadow draws one slate per context: an unbiased sample of a random slate's expected clicks
    shadows = {name: make_target(name, seed).fit(envs.visible) for name in TARGETS}
    recorder = ImpressionRecorder(envs.visible.user_map, envs.visible.item_map, f"seed {seed}")
    contextual: dict[str, list[np.ndarray]] = {name: [] for name in shadows}
    start = time.perf_counter()
    while len(recorder) < max(args.sizes):
        for name, values in log_episodes(logger, envs.test, 1, recorder, shadows).items():
            contextual[name].append(values)
    log_seconds = time.perf_counter() - start
    truth_ctx = {name: np.concatenate(parts) for name, parts in contextual.items()}
    online = {}
    for name in TARGETS:
        result = simulate(make_target(name, seed), envs, train_episodes=0, test_episodes=args.online_episodes,
                          progress=False)
        online[name] = float(np.mean([e.ctr for e in result.test]))
    log = recorder.frame().sort_values("timestamp", kind="stable").reset_index(drop=True)
    rows = []
    for size in args.sizes:
        part = log.iloc[:size]
        start = time.perf_counter()
        table = evaluate_targets(part, envs.visible, {name: make_target(name, seed) for name in TARGETS},
                                 args.estimators, n_boot=args.n_boot, seed=seed)
        seconds = time.perf_counter() - start
        for rec in table.to_dict("records"):
            ctx = truth_ctx[rec["target"]]
            rows.append({**rec, "seed": seed, "size": size, "online": online[rec["target"]],
                         "contextual": float(ctx[:size].mean()),
                         "ope seconds": seconds, "log steps/s": len(log) / log_seconds})
    return rows


def summarise(frame: pd.DataFrame, truth: str) -> pd.DataFrame:
    """Per estimator × target × size: mean estimate, relative bias and RMSE against ``truth``, CI coverage."""
    out = []
    for (estimator, target, size), g in frame.groupby(["estimator", "target", "size"], sort=False):
        t = g[truth].to_numpy()
        v = g["value"].to_numpy()
        ok = np.isfinite(v)
        rel = (v[ok] - t[ok]) / t[ok]
        out.append({"estimator": estimator, "target": target, "size": size, "truth": t.mean(),
                    "estimate": float(np.mean(v[ok])) if ok.any() else np.nan,
                    "rel. bias": float(rel.mean()) if ok.any() else np.nan,
                    "rel. RMSE": float(np.sqrt((rel**2).mean())) if ok.any() else np.nan,
                    "coverage": float(((g["ci_low"] <= g[truth]) & (g[truth] <= g["ci_high"]))[ok].mean()) if ok.any() else np.nan,
                    "no estimate": int((~ok).sum())})
    return pd.DataFrame(out)


def kendall(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean Kendall's τ between each estimator's order of the targets and the online truth's, per size."""
    out = []
    for (estimator, size), g in frame.groupby(["estimator", "size"], sort=False):
        taus = []
        for _, s in g.groupby("seed"):
            if s["value"].notna().all():
                taus.append(stats.kendalltau(s["value"], s["online"]).statistic)
        out.append({"estimator": estimator, "size": size, "kendall tau": float(np.nanmean(taus)) if taus else np.nan})
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a MovieLens folder (default: the embedded ml-latest-small)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--logger", choices=["epsilon", "mix"], default="epsilon",
                   help="epsilon: ALS, a uniformly random slate with probability ε; mix: ALS or popularity (ε)")
    p.add_argument("--estimators", default="ips,snips,iips,rips")
    p.add_argument("--behaviour", choices=["default", "fixed"], default="default")
    p.add_argument("--horizon", type=int, default=10)
    p.add_argument("--online-episodes", type=int, default=3)
    p.add_argument("--n-boot", type=int, default=300)
    p.add_argument("--out", default=str(HERE / "results" / "ope.json"))
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.estimators = [e.strip() for e in args.estimators.split(",")]

    data = rd.load("ml-latest-small") if args.data is None else load_movielens(args.data)
    rows = []
    for seed in range(args.seeds):
        rows += one_seed(data, seed, args)
        print(f"seed {seed}: logged at {rows[-1]['log steps/s']:,.0f} steps/s, OPE of {len(TARGETS)} targets on "
              f"{max(args.sizes):,} impressions in {rows[-1]['ope seconds']:.1f} s", flush=True)
    frame = pd.DataFrame(rows)
    for truth in ("contextual", "online"):
        print(f"\n## against the {truth} truth ({args.behaviour} behaviour, {args.logger} logger, ε = {args.epsilon}, "
              f"{args.seeds} seeds)\n")
        print(markdown(summarise(frame, truth)))
    print("\n## order of the targets (online truth)\n")
    print(markdown(kendall(frame)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()}, "rows": rows}, indent=1,
                                         default=float))
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
