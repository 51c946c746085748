"""Experiments: typed configs and the one fitting pipeline (tune on validation, refit, test) behind ``recforge
run``, ``recforge compare`` and ``recforge evaluate``, in parallel on a process pool or Ray, resumable."""

from recforge.experiments.compare import compare
from recforge.experiments.config import ExperimentConfig, ModelSpec
from recforge.experiments.runner import ExperimentResult, ExperimentRunner, run_experiment

__all__ = ["ExperimentConfig", "ExperimentResult", "ExperimentRunner", "ModelSpec", "compare", "run_experiment"]
