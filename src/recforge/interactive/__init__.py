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
from recforge.interactive.impression_log import ImpressionRecorder
from recforge.interactive.policies import (
    POLICIES,
    ExploringPolicy,
    FrozenPolicy,
    MixturePolicy,
    Policy,
    create_policy,
    explore_spec,
    parse_explore,
    policy_class,
)
from recforge.interactive.users import TruePreferences, UserBehaviour

__all__ = [
    "POLICIES",
    "Environments",
    "EpisodeResult",
    "ExploringPolicy",
    "FrozenPolicy",
    "ImpressionRecorder",
    "MixturePolicy",
    "Policy",
    "SimulationResult",
    "SlateEnvironment",
    "TruePreferences",
    "UserBehaviour",
    "create_policy",
    "explore_spec",
    "make_environments",
    "parse_explore",
    "play_episode",
    "plot_ctr_curves",
    "policy_class",
    "results_table",
    "save_results",
    "simulate",
]
