"""Shared machinery of the neural models: the training loop, losses, layers, sequences and checkpoints."""

from recforge.neural.trainer import (
    Trainer,
    TrainerConfig,
    TrainingResult,
    TrainingState,
    plot_training_curves,
)

__all__ = ["Trainer", "TrainerConfig", "TrainingResult", "TrainingState", "plot_training_curves"]
