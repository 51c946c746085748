"""Models: one interface (:class:`Recommender`), a registry by name, and the built-in models."""

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
