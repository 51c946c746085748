"""recforge's slate estimators beside Open Bandit Pipeline's on the same logs: the estimates must agree.

OBP (``obp``, benchmark-only) defines three slate estimators as recforge does: ``SlateStandardIPS`` (recforge
``ips``: whole-slate weights), ``SlateIndependentIPS`` (``iips``: item-position marginals) and
``SlateRewardInteractionIPS`` (``rips``: prefix, "cascade", probabilities). For each seed this logs an ε-greedy ALS on
ml-latest-small (one slate per visit), replays the targets with recforge, hands OBP the same rewards and
probabilities in its long format (one row per slate position), and prints both estimates, their difference, both
95% intervals and the time each took.

OBP 0.5.x pins numpy 1.23, pandas 1.5, scikit-learn 1.1, scipy 1.9 and Python < 3.10, so it cannot be installed
beside recforge's dependencies; its estimators run unchanged on today's numpy when installed without them::

    python -m venv /tmp/obp && /tmp/obp/bin/pip install torch==2.13.0 && /tmp/obp/bin/pip install -e . pyyaml
    /tmp/obp/bin/pip install --no-deps --ignore-requires-python obp==0.5.5
    /tmp/obp/bin/python benchmarks/bench_ope_obp.py --seeds 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from bench_ope import markdown

import recforge.datasets as rd
from recforge.core.slates import EpsilonGreedy
from recforge.data.impressions import impression_arrays
from recforge.interactive import (
    ExploringPolicy,
    ImpressionRecorder,
    UserBehaviour,
    create_policy,
    make_environments,
)
from recforge.interactive.impression_log import log_episodes
from recforge.ope import SlateProbabilities, estimate
from recforge.ope.replay import replay

PAIRS = {"ips": ("SlateStandardIPS", "slate"), "iips": ("SlateIndependentIPS", "position"),
         "rips": ("SlateRewardInteractionIPS", "prefix")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--n-boot", type=int, default=1000)
    args = p.parse_args()
    try:
        import obp.ope as obp_ope
    except ImportError as exc:
        raise SystemExit(f"obp is not importable here ({exc}); see this script's docstring") from None

    data = rd.load("ml-latest-small")
    rows = []
    for seed in range(args.seeds):
        envs = make_environments(data, seed=seed, behaviour=UserBehaviour(horizon=1, patience=1))
        logger = ExploringPolicy(create_policy("greedy", learn=False, seed=seed), EpsilonGreedy(5, args.epsilon))
        logger.fit(envs.visible)
        recorder = ImpressionRecorder(envs.visible.user_map, envs.visible.item_map)
        while len(recorder) < args.size:
            log_episodes(logger, envs.test, 1, recorder)
        log = recorder.frame().iloc[: args.size]
        arrays = impression_arrays(log, envs.visible.user_map, envs.visible.item_map)
        n, k = arrays.slates.shape
        logged = SlateProbabilities(arrays.position, arrays.slate, arrays.prefix)
        logging = {"slate": arrays.slate, "position": arrays.position, "prefix": arrays.prefix}
        for name in ("als", "random"):
            policy = create_policy("greedy", learn=False, seed=seed) if name == "als" else create_policy("random", seed=seed)
            target = replay(log, envs.visible, policy.fit(envs.visible)).probabilities
            ours = {"slate": target.slate, "position": target.position, "prefix": target.prefix}
            for estimator, (cls, kind) in PAIRS.items():
                start = time.perf_counter()
                mine = estimate(estimator, arrays.rewards, logged, target, n_boot=args.n_boot, seed=seed)
                t_ours = time.perf_counter() - start
                # OBP's long format: one row per (slate, position); whole-slate probabilities repeated per row
                mu = np.repeat(logging[kind], k) if kind == "slate" else logging[kind].ravel()
                pi = np.repeat(ours[kind], k) if kind == "slate" else ours[kind].ravel()
                keyword = {"slate": "pscore", "position": "pscore_item_position", "prefix": "pscore_cascade"}[kind]
                target_keyword = {"slate": "evaluation_policy_pscore",
                                  "position": "evaluation_policy_pscore_item_position",
                                  "prefix": "evaluation_policy_pscore_cascade"}[kind]
                inputs = {"slate_id": np.repeat(np.arange(n), k), "reward": arrays.rewards.ravel(),
                          "position": np.tile(np.arange(k), n), keyword: mu, target_keyword: pi}
                theirs_est = getattr(obp_ope, cls)(len_list=k)
                start = time.perf_counter()
                value = theirs_est.estimate_policy_value(**inputs)
                interval = theirs_est.estimate_interval(**inputs, alpha=0.05, n_bootstrap_samples=args.n_boot,
                                                        random_state=seed)
                t_obp = time.perf_counter() - start
                rows.append({"seed": seed, "target": name, "estimator": estimator, "recforge": mine.value,
                             "obp": float(value), "abs diff": abs(mine.value - float(value)),
                             "recforge CI": f"[{mine.ci_low:.4f}, {mine.ci_high:.4f}]",
                             "obp CI": f"[{interval['95.0% CI (lower)']:.4f}, {interval['95.0% CI (upper)']:.4f}]",
                             "recforge s": t_ours, "obp s": t_obp})
        print(f"seed {seed} done", flush=True)
    table = pd.DataFrame(rows)
    print(markdown(table))
    print(f"\nlargest |recforge − obp| over {len(table)} estimates: {table['abs diff'].max():.2e}; "
          f"time recforge / obp (estimate + interval, summed): {table['recforge s'].sum() / table['obp s'].sum():.2f}")


if __name__ == "__main__":
    main()
