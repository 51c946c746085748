"""Models: one interface (:class:`Recommender`), a registry by name, and the built-in models."""

import importlib as _importlib
import pkgutil as _pkgutil

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


# Import every module of this package so that each model registers itself; new model modules need no edit here.
for _info in _pkgutil.iter_modules(__path__, __name__ + "."):
    _importlib.import_module(_info.name)
