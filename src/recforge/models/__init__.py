"""Models: one interface (:class:`Recommender`), a registry by name, and every built-in model.

Importing this package registers all built-in models (``create_model``, ``get_model_class``,
``available_models`` and ``Recommender.load`` find them by name).
"""

from recforge.models.als import BiasedALS, ImplicitALS
from recforge.models.base import LEARNS_FROM, RatingPredictor, Recommender
from recforge.models.baselines import BiasBaseline, GlobalMean, MostPopular, Random
from recforge.models.blend import Blend
from recforge.models.bpr import BPR
from recforge.models.content import ContentBased
from recforge.models.graph import RP3beta
from recforge.models.hybrid import ScoreBlend, SlateMix
from recforge.models.linear import EASE
from recforge.models.neighbors import ItemKNN
from recforge.models.pointwise import PointwiseMF
from recforge.models.registry import available_models, create_model, get_model_class, parse_params, register
from recforge.models.sequential import BERT4Rec, GRU4Rec, Pooling, SASRec
from recforge.models.sgd_mf import FunkSVD, SVDpp
from recforge.models.two_tower import TwoTower

ALS = ImplicitALS

__all__ = [
    "ALS",
    "BPR",
    "EASE",
    "LEARNS_FROM",
    "BERT4Rec",
    "BiasBaseline",
    "BiasedALS",
    "Blend",
    "ContentBased",
    "FunkSVD",
    "GRU4Rec",
    "GlobalMean",
    "ImplicitALS",
    "ItemKNN",
    "MostPopular",
    "PointwiseMF",
    "Pooling",
    "RP3beta",
    "Random",
    "RatingPredictor",
    "Recommender",
    "SASRec",
    "SVDpp",
    "ScoreBlend",
    "SlateMix",
    "TwoTower",
    "available_models",
    "create_model",
    "get_model_class",
    "parse_params",
    "register",
]
