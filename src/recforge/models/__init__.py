"""Models: one interface (:class:`Recommender`), a registry by name, and every built-in model.

Built-in models are imported when first used, by name (``create_model``, ``get_model_class``,
``Recommender.load``) or as attributes of this package (``from recforge.models import EASE``), so that
importing recforge does not import torch or every model's kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recforge.models.base import LEARNS_FROM, RatingPredictor, Recommender
from recforge.models.registry import (
    BUILTIN_MODELS,
    available_models,
    create_model,
    get_model_class,
    parse_params,
    register,
)

if TYPE_CHECKING:
    from recforge.models.als import BiasedALS, ImplicitALS
    from recforge.models.baselines import BiasBaseline, GlobalMean, MostPopular, Random
    from recforge.models.blend import Blend
    from recforge.models.bpr import BPR
    from recforge.models.content import ContentBased
    from recforge.models.graph import RP3beta
    from recforge.models.hybrid import ScoreBlend, SlateMix
    from recforge.models.linear import EASE
    from recforge.models.neighbors import ItemKNN
    from recforge.models.pointwise import PointwiseMF
    from recforge.models.sequential import BERT4Rec, GRU4Rec, Pooling, SASRec
    from recforge.models.sgd_mf import FunkSVD, SVDpp
    from recforge.models.two_tower import TwoTower

    ALS = ImplicitALS

#: The class each exported name stands for, by its registered model name.
_CLASSES = {
    "ALS": "als", "ImplicitALS": "als", "BiasedALS": "biasedals", "BPR": "bpr", "EASE": "ease",
    "BiasBaseline": "bias", "GlobalMean": "globalmean", "MostPopular": "pop", "Random": "random",
    "Blend": "blend", "ContentBased": "content", "RP3beta": "rp3beta", "ScoreBlend": "scoreblend",
    "SlateMix": "slatemix", "ItemKNN": "itemknn", "PointwiseMF": "pointwise", "FunkSVD": "funksvd",
    "SVDpp": "svdpp", "TwoTower": "twotower", "Pooling": "pooling", "GRU4Rec": "gru4rec", "SASRec": "sasrec",
    "BERT4Rec": "bert4rec",
}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return get_model_class(_CLASSES[name])
    raise AttributeError(f"module 'recforge.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_CLASSES])


__all__ = [
    "ALS",
    "BPR",
    "BUILTIN_MODELS",
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
