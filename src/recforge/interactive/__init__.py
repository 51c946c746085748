"""Interactive slate recommendation: simulated users from real data, online-learning policies, a harness."""

from recforge.interactive.environment import Environments, SlateEnvironment, make_environments
from recforge.interactive.harness import (
    EpisodeResult,
    SimulationResult,
    play_episode,
    plot_ctr_curves,
    results_table,
    save_results,
    simulate,
)
from recforge.interactive.policies import POLICIES, Policy, create_policy, policy_class
from recforge.interactive.users import TruePreferences, UserBehaviour

__all__ = [
    "POLICIES",
    "Environments",
    "EpisodeResult",
    "Policy",
    "SimulationResult",
    "SlateEnvironment",
    "TruePreferences",
    "UserBehaviour",
    "create_policy",
    "make_environments",
    "play_episode",
    "plot_ctr_curves",
    "policy_class",
    "results_table",
    "save_results",
    "simulate",
]
