"""Train and test policies in the slate environments: episodes, scores, confidence intervals, CSV and plots.

The workflow of notebook 000: play ``train_episodes`` on the training users (the policy learns online), keep the
state of the best training episode, then play ``test_episodes`` on the testing users, restoring that state before
each one (so every test episode starts from the same weights), and report each test user's average score.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from recforge.core.progress import progress_bar
from recforge.data.io import atomic_path, save_figure, write_table
from recforge.interactive.environment import Environments, SlateEnvironment
from recforge.interactive.impression_log import ImpressionRecorder
from recforge.interactive.policies import Policy

log = logging.getLogger(__name__)


@dataclass
class EpisodeResult:
    """One episode: per-user scores (click-through rate), totals, the per-step click sequence and its speed."""

    scores: np.ndarray
    clicks: int
    steps: int
    seconds: float
    step_clicks: np.ndarray

    @property
    def ctr(self) -> float:
        """Clicks per slate over the episode."""
        return self.clicks / self.steps if self.steps else 0.0

    @property
    def steps_per_second(self) -> float:
        """Slates answered per second (policy and environment together)."""
        return self.steps / self.seconds if self.seconds else float("inf")


def play_episode(policy: Policy, env: SlateEnvironment, progress: bool = False, desc: str = "episode",
                 recorder: ImpressionRecorder | None = None, label: str | None = None) -> EpisodeResult:
    """Play one episode with the batched API; the policy is updated after every round. With a ``recorder``, every
    slate is logged with its probabilities (the policy must know them) under ``label`` (default: its name)."""
    env.reset()
    policy.start_episode()
    start = time.perf_counter()
    bar = progress_bar(total=None, desc=desc, unit="step", enabled=progress, leave=False)
    while env.has_next_state():
        users = env.get_states()
        draw = policy.act_draw(users) if recorder is not None else None
        slates = policy.act(users) if draw is None else draw.slates
        clicked, _ = env.get_responses(slates)
        if recorder is not None and draw is not None:
            recorder.add(label or policy.name, env.episode, users, draw, clicked)
        policy.update(users, slates, clicked)
        bar.update(len(users))
        bar.set_postfix(clicks=int(env.clicks.sum()), refresh=False)
    bar.close()
    return EpisodeResult(env.get_score(), int(env.clicks.sum()), env.total_steps, time.perf_counter() - start,
                         np.asarray(env.step_clicks, np.int8))


@dataclass
class SimulationResult:
    """Training and test episodes of one policy, with the test users' average scores."""

    policy: str
    train: list[EpisodeResult]
    test: list[EpisodeResult]
    test_users: np.ndarray
    user_ids: np.ndarray
    extra: dict[str, float] = field(default_factory=dict)

    def user_scores(self) -> pd.DataFrame:
        """``user_id, avg_score``: each test user's score averaged over the test episodes (the notebook's CSV)."""
        scores = np.mean([e.scores for e in self.test], axis=0)
        return pd.DataFrame({"user_id": self.user_ids, "avg_score": scores})

    def summary(self) -> dict[str, float]:
        """Mean test click-through rate and per-user score with 95% t-intervals across test episodes, etc."""
        from scipy import stats

        def ci(values: list[float]) -> tuple[float, float]:
            arr = np.asarray(values, dtype=np.float64)
            if len(arr) < 2:
                return float(arr.mean()), 0.0
            half = stats.t.ppf(0.975, len(arr) - 1) * arr.std(ddof=1) / np.sqrt(len(arr))
            return float(arr.mean()), float(half)

        ctr, ctr_ci = ci([e.ctr for e in self.test])
        score, score_ci = ci([float(e.scores.mean()) for e in self.test])
        return {
            "train ctr": float(np.mean([e.ctr for e in self.train])) if self.train else float("nan"),
            "test ctr": ctr, "test ctr ±": ctr_ci,
            "avg score": score, "avg score ±": score_ci,
            "slates per user": float(np.mean([e.steps for e in self.test])) / max(1, len(self.test_users)),
            "steps/s": float(np.mean([e.steps_per_second for e in self.test])),
            **self.extra,
        }


def simulate(
    policy: Policy,
    envs: Environments,
    train_episodes: int = 1,
    test_episodes: int = 5,
    progress: bool = True,
    name: str | None = None,
    recorder: ImpressionRecorder | None = None,
) -> SimulationResult:
    """Fit ``policy`` on the visible data, train it online for ``train_episodes``, keep its best state, then test
    it on ``test_episodes`` episodes, each starting from that state; with a ``recorder`` the test episodes'
    impressions are logged."""
    label = name or policy.name
    start = time.perf_counter()
    policy.fit(envs.visible)
    fit_seconds = time.perf_counter() - start
    train, best, best_score = [], policy.snapshot(), -np.inf
    for e in range(train_episodes):
        res = play_episode(policy, envs.train, progress, f"{label} train {e + 1}/{train_episodes}")
        train.append(res)
        if res.scores.mean() > best_score:  # the notebook keeps its best training episode's weights
            best_score, best = float(res.scores.mean()), policy.snapshot()
    test = []
    for e in range(test_episodes):
        policy.restore(best)
        test.append(play_episode(policy, envs.test, progress, f"{label} test {e + 1}/{test_episodes}", recorder, label))
    envs.train.episode, envs.test.episode = -1, -1  # the next policy replays the same seeded episodes
    envs.train.reset()
    envs.test.reset()
    user_ids = envs.visible.user_map.to_ids(envs.test.users)
    return SimulationResult(label, train, test, envs.test.users, user_ids, {"fit s": fit_seconds})


def results_table(results: list[SimulationResult]) -> pd.DataFrame:
    """One row per policy, best test click-through first."""
    rows = [{"policy": r.policy, **r.summary()} for r in results]
    return pd.DataFrame(rows).sort_values("test ctr", ascending=False, ignore_index=True)


def markdown_table(table: pd.DataFrame) -> str:
    """The results table as GitHub markdown (rates with 4 decimals, steps/s whole, seconds with one)."""
    def cell(col: str, value: object) -> str:
        if isinstance(value, float):
            if col == "steps/s":
                return f"{value:,.0f}"
            return f"{value:.1f}" if col in ("fit s", "slates per user") else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in table.columns) + " |" for _, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def plot_ctr_curves(results: list[SimulationResult], path: str | Path, window: int = 500) -> Path:
    """Click-through rate along the test episodes' steps (moving average over ``window`` steps, or a fifth of the
    shortest episode if that is less; the legend says which), one line per policy, averaged over episodes; written
    atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        n = min(len(e.step_clicks) for e in r.test)
        if n == 0:
            continue
        mean = np.mean([e.step_clicks[:n] for e in r.test], axis=0)
        w = max(1, min(window, n // 5 or 1))
        smooth = np.convolve(mean, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w, smooth, label=f"{r.policy} (mean of {w} steps)")
    ax.set_xlabel("step of the test episode")
    ax.set_ylabel("click-through rate (moving mean)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def save_results(results: list[SimulationResult], folder: str | Path) -> dict[str, Path]:
    """``results.csv`` / ``results.md`` (the table), ``scores_<policy>.csv`` (``user_id,avg_score``) and
    ``ctr_curve.png`` in ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    paths = {"csv": write_table(table, out / "results.csv")}
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown_table(table))
    paths["md"] = out / "results.md"
    for r in results:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in r.policy)
        paths[f"scores_{safe}"] = write_table(r.user_scores(), out / f"scores_{safe}.csv")
    paths["png"] = plot_ctr_curves(results, out / "ctr_curve.png")
    return paths
