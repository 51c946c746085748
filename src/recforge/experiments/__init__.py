"""Config-driven experiments: typed configs (YAML/TOML/JSON), grids tuned on validation, resumable parallel runs."""

from recforge.experiments.config import ExperimentConfig, ModelSpec
from recforge.experiments.runner import ExperimentRunner, run_experiment

__all__ = ["ExperimentConfig", "ExperimentRunner", "ModelSpec", "run_experiment"]
