"""Models: one interface (:class:`Recommender`), a registry by name, and the built-in models.

The built-in model modules are imported on the first registry lookup (``create_model``, ``get_model_class``,
``available_models``, ``Recommender.load``), where each registers itself; new model modules need no edit here.
"""

from recforge.models.base import RatingPredictor, Recommender
from recforge.models.baselines import BiasBaseline, GlobalMean, MostPopular, Random
from recforge.models.registry import available_models, create_model, get_model_class, parse_params, register

__all__ = [
    "BiasBaseline",
    "GlobalMean",
    "MostPopular",
    "Random",
    "RatingPredictor",
    "Recommender",
    "available_models",
    "create_model",
    "get_model_class",
    "parse_params",
    "register",
]

