"""Shared machinery of the neural models: device choice, the training loop, losses, layers and checkpoints."""

from recforge.neural.device import resolve_device, torch_threads
from recforge.neural.trainer import Trainer, TrainerConfig, plot_training_curves

__all__ = ["Trainer", "TrainerConfig", "plot_training_curves", "resolve_device", "torch_threads"]
