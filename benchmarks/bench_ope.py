"""Off-policy estimates against the simulator's truth: bias, RMSE, interval coverage, target order, and a policy
learned from the log.

For every seed: build the simulator on the dataset; fit the targets (static ALS, LinUCB trained one episode then
frozen, popularity, static EASE, random; ``--targets``); log the test episodes of an ε-greedy static ALS
(``ExploringPolicy``; ``--logger mix``: ALS's slate with probability 1 − ε, else the slate of one of the other
deterministic targets, ``MixturePolicy``) until the largest log size is reached, while the simulator's choice
model gives every target's exact expected clicks in each logged context (the *contextual truth*); measure every
target's *online truth* (with one slate per visit, ``--horizon 1``, exactly: the expected clicks of its slate for
every test user in a fresh session; otherwise by playing ``--online-episodes`` test episodes); then estimate each
target from the first N logged impressions with each estimator. ``--learn`` also refits ALS on the first half of
the log's clicks weighted by inverse propensity (``recforge.ope.learn_from_log``), estimates its greedy policy
on the second half and measures it online beside the logger.

Usage::

    python benchmarks/bench_ope.py                                    # ml-latest-small, 5 seeds, 1k and 10k
    python benchmarks/bench_ope.py --seeds 20 --sizes 1000,10000,100000 --horizon 1 --learn   # the issue's setting
    python benchmarks/bench_ope.py --data ../shared/data/ml-100k

``--behaviour fixed`` makes every session last ``--horizon`` slates whatever is shown (no leaving after misses);
the default behaviour lets users leave after three slates without a click. ``--horizon 1`` implies one slate per
session (a contextual bandit: the setting off-policy estimators are defined for). Prints markdown tables and
writes ``benchmarks/results/ope.json``.
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
    Environments,
    ExploringPolicy,
    FrozenPolicy,
    ImpressionRecorder,
    MixturePolicy,
    Policy,
    UserBehaviour,
    create_policy,
    make_environments,
    play_episode,
    simulate,
)
from recforge.interactive.impression_log import log_episodes
from recforge.models import create_model
from recforge.ope import evaluate_targets, learn_from_log

HERE = Path(__file__).resolve().parent


def make_target(name: str, envs: Environments, seed: int) -> Policy:
    """A fitted, static target policy (LinUCB: trained one episode on the training users, then frozen)."""
    if name == "linucb":
        policy = create_policy("linucb", seed=seed).fit(envs.visible)
        play_episode(policy, envs.train)
        return FrozenPolicy(policy).fit(envs.visible)
    if name == "sasrec":
        return create_policy("sequential", params={"epochs": 5}, seed=seed).fit(envs.visible)
    if name == "oracle":
        return create_policy("oracle", truth=envs.truth, seed=seed).fit(envs.visible)
    if name in ("als", "ease"):
        return create_policy("greedy", model=name, learn=False, seed=seed).fit(envs.visible)
    return create_policy(name, seed=seed).fit(envs.visible)


def online_truth(policy: Policy, envs: Environments, args: argparse.Namespace) -> float:
    """A target's click-through rate online: exact for one slate per visit (mean over test users of its slate's
    expected clicks in a fresh session; random: over ``--online-episodes`` draws), else played."""
    if args.horizon != 1:
        result = simulate(policy, envs, train_episodes=0, test_episodes=args.online_episodes, progress=False)
        return float(np.mean([e.ctr for e in result.test]))
    env = envs.test
    env.reset()
    draws = args.online_episodes if policy.name == "random" else 1
    values = []
    for _ in range(draws):
        policy.start_episode()
        values.append(1 - env.click_probabilities(env.users, policy.act(env.users))[:, 0])
    env.episode = -1
    env.reset()
    return float(np.mean(values))


def make_logger(targets: dict[str, Policy], behaviour: UserBehaviour, args: argparse.Namespace, seed: int) -> Policy:
    """ε-greedy static ALS, or a mixture of ALS (1 − ε) and the other deterministic targets (ε split evenly)."""
    als = create_policy("greedy", learn=False, seed=seed)
    if args.logger == "epsilon":
        return ExploringPolicy(als, EpsilonGreedy(behaviour.slate_size, args.epsilon))
    others = [p for name, p in targets.items() if name not in ("als", "random")]
    return MixturePolicy([als, *others], [1 - args.epsilon] + [args.epsilon / len(others)] * len(others))


def one_seed(data, seed: int, args: argparse.Namespace) -> tuple[list[dict], dict]:  # type: ignore[no-untyped-def]
    """Log, the two truths and every estimate of one seed (one row per estimator × target × log size), and the
    learner's results."""
    behaviour = (UserBehaviour(horizon=args.horizon, patience=args.horizon)
                 if args.behaviour == "fixed" or args.horizon == 1 else UserBehaviour())
    envs = make_environments(data, seed=seed, behaviour=behaviour)
    start = time.perf_counter()
    targets = {name: make_target(name, envs, seed) for name in args.targets}
    fit_seconds = time.perf_counter() - start
    logger = make_logger(targets, behaviour, args, seed).fit(envs.visible)
    size = max(args.sizes)
    # logging speed alone, then the log with every target's contextual truth beside it
    recorder = ImpressionRecorder(envs.visible.user_map, envs.visible.item_map, f"seed {seed}")
    start = time.perf_counter()
    while len(recorder) < size:
        log_episodes(logger, envs.test, 1, recorder)
    log_rate = len(recorder) / (time.perf_counter() - start)
    recorder = ImpressionRecorder(envs.visible.user_map, envs.visible.item_map, f"seed {seed}")
    contextual: dict[str, list[np.ndarray]] = {name: [] for name in targets}
    while len(recorder) < size:
        for name, values in log_episodes(logger, envs.test, 1, recorder, targets).items():
            contextual[name].append(values)
    truth_ctx = {name: np.concatenate(parts) for name, parts in contextual.items()}
    online = {name: online_truth(policy, envs, args) for name, policy in targets.items()}
    online["logger"] = online_truth(logger, envs, args) if args.logger == "mix" or args.horizon != 1 else (
        (1 - args.epsilon) * online["als"] + args.epsilon * online.get("random", np.nan))
    log = recorder.frame().sort_values("timestamp", kind="stable").reset_index(drop=True)
    model = None if args.reward_model is None else create_model(args.reward_model, progress=False).fit(envs.visible)
    rows = []
    for n in args.sizes:
        start = time.perf_counter()
        table = evaluate_targets(log.iloc[:n], envs.visible, targets, args.estimators, n_boot=args.n_boot, seed=seed,
                                 reward_model=model, logger=logger)
        seconds = time.perf_counter() - start
        for rec in table.to_dict("records"):
            rows.append({**rec, "seed": seed, "size": n, "online": online[rec["target"]],
                         "contextual": float(truth_ctx[rec["target"]][:n].mean()), "ope seconds": seconds,
                         "fit seconds": fit_seconds, "log steps/s": log_rate})
    learned: dict = {}
    if args.learn:
        half = len(log) // 2
        start = time.perf_counter()
        policy = learn_from_log(log.iloc[:half], envs.visible, seed=seed)
        learned = {"seed": seed, "learn seconds": time.perf_counter() - start, "online learned": online_truth(policy, envs, args),
                   "online logger": online["logger"], "online als": online["als"]}
        table = evaluate_targets(log.iloc[half:], envs.visible, {"learned": policy}, args.estimators,
                                 n_boot=args.n_boot, seed=seed, reward_model=model, logger=logger)
        for rec in table.to_dict("records"):
            learned[rec["estimator"]] = rec["value"]
            learned[rec["estimator"] + " ci"] = (rec["ci_low"], rec["ci_high"])
    return rows, learned


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
                    "within 5%": float((np.abs(rel) <= 0.05).mean()) if ok.any() else np.nan,
                    "no estimate": int((~ok).sum())})
    return pd.DataFrame(out)


def kendall(frame: pd.DataFrame) -> pd.DataFrame:
    """Per estimator and size, over the targets it estimates (two or more): mean Kendall's τ between its order of
    them and the online truth's, and the share of seeds where the order is the true one."""
    out = []
    for (estimator, size), g in frame.groupby(["estimator", "size"], sort=False):
        taus, targets = [], ""
        for _, s in g.groupby("seed"):
            s = s[s["value"].notna()]
            if len(s) >= 2:
                taus.append(stats.kendalltau(s["value"], s["online"]).statistic)
                targets = ",".join(s["target"])
        out.append({"estimator": estimator, "size": size, "targets": targets,
                    "kendall tau": float(np.nanmean(taus)) if taus else np.nan,
                    "true order": float(np.mean(np.isclose(taus, 1.0))) if taus else np.nan})
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def report(frame: pd.DataFrame, learned: list[dict], args: argparse.Namespace) -> None:
    """Print the tables: estimates against both truths, the learned policy, the order of the targets."""
    setting = (f"{'one slate per visit' if args.horizon == 1 else args.behaviour + ' behaviour'}, {args.logger} "
               f"logger, ε = {args.epsilon}, {args.seeds} seeds")
    for truth in ("contextual", "online"):
        print(f"\n## against the {truth} truth ({setting})\n")
        print(markdown(summarise(frame, truth)))
    if learned:
        table = pd.DataFrame(learned)
        print(f"\n## a policy learned from the log's first half ({setting})\n")
        cols = ["online learned", "online als", "online logger", *[e for e in args.estimators if e in table]]
        print(markdown(table[cols].mean().to_frame("mean over seeds").T.reset_index(drop=True)))
        beats = (table["online learned"] > table["online logger"]).mean()
        print(f"\nlearned beats the logger online in {beats:.0%} of seeds, ALS in "
              f"{(table['online learned'] > table['online als']).mean():.0%}")
    print("\n## order of the targets (online truth)\n")
    print(markdown(kendall(frame)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a MovieLens folder (default: the embedded ml-latest-small)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--logger", choices=["epsilon", "mix"], default="epsilon",
                   help="epsilon: ALS, a uniformly random slate with probability ε; mix: ALS, or with probability ε "
                        "another deterministic target's slate")
    p.add_argument("--targets", default="als,linucb,pop,ease,random",
                   help="comma-separated: als, linucb, pop, ease, random, oracle, sasrec")
    p.add_argument("--reward-model", default=None, help="a recforge model for dm, dr and switch (e.g. als)")
    p.add_argument("--learn", action="store_true", help="also learn a policy from the log's first half")
    p.add_argument("--estimators", default="ips,snips,iips,rips")
    p.add_argument("--behaviour", choices=["default", "fixed"], default="default")
    p.add_argument("--horizon", type=int, default=10)
    p.add_argument("--online-episodes", type=int, default=20)
    p.add_argument("--n-boot", type=int, default=300)
    p.add_argument("--out", default=str(HERE / "results" / "ope.json"))
    p.add_argument("--from", dest="source", default=None, help="print the tables of a saved result file instead")
    args = p.parse_args()
    if args.source is not None:
        saved = json.loads(Path(args.source).read_text())
        report(pd.DataFrame(saved["rows"]), saved.get("learned", []), argparse.Namespace(**saved["settings"]))
        return
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.estimators = [e.strip() for e in args.estimators.split(",")]
    args.targets = [t.strip() for t in args.targets.split(",")]

    data = rd.load("ml-latest-small") if args.data is None else load_movielens(args.data)
    rows, learned = [], []
    for seed in range(args.seeds):
        part, learn = one_seed(data, seed, args)
        rows += part
        learned += [learn] if learn else []
        last = part[-1]
        print(f"seed {seed}: logged at {last['log steps/s']:,.0f} steps/s, OPE of {len(args.targets)} targets on "
              f"{max(args.sizes):,} impressions in {last['ope seconds']:.1f} s (targets fitted in "
              f"{last['fit seconds']:.1f} s)", flush=True)
    report(pd.DataFrame(rows), learned, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()}, "rows": rows, "learned": learned},
                                         default=float))
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
