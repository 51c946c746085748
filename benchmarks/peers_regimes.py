"""Peer libraries on the regime suite: implicit (ALS, BPR, item cosine), RecTools (EASE) and Surprise (SVD, SVD++,
KNNBaseline) on exactly recforge's leave-one-out splits of ``bench_regimes.py``, each with its library defaults and
tuned on the validation part.

Usage::

    # 1. export recforge's splits (recforge's own environment)
    python benchmarks/peers_regimes.py --export /tmp/regime-splits
    python benchmarks/peers_regimes.py --export /tmp/regime-splits --regimes movielens,sessions

    # 2. fit, tune and score the peers (a separate environment with implicit, rectools, scikit-surprise, optuna)
    peers-venv/bin/python benchmarks/peers_regimes.py --splits /tmp/regime-splits
    peers-venv/bin/python benchmarks/peers_regimes.py --splits /tmp/regime-splits --regimes movielens \\
        --peers als,ease,svd --trials 10 --threads 2
    peers-venv/bin/python benchmarks/peers_regimes.py --splits /tmp/regime-splits --regimes playcounts-binary \\
        --ease-trials 3                                                # play counts with the weights dropped

The two steps run in two environments so that the peers' environment does not need recforge (and recforge's does not
get the peers' pinned dependencies).

Splits (``--export``): every regime is built by ``bench_regimes.build`` from ``recforge.datasets.load(source)`` as
``bench_regimes.main`` does, turned into ``Interactions`` (the ``weight`` column of ``playcounts`` is the
interaction weight) and split by ``recforge.split.leave_one_out`` — the ``loo`` protocol: per user the last event is
test, the one before validation, users with fewer than 3 events stay whole in train; without timestamps file order is
time. ``DIR/<regime>/`` gets ``train.csv``, ``valid.csv``, ``test.csv`` (user_id, item_id and rating / timestamp /
weight where present), ``users.csv`` and ``items.csv`` (the ids in recforge's index order: the catalogue, and the
tie-break order of the rankings) and ``meta.json``.

Scoring (``--splits``), computed here, not by the peers' own evaluators:

* top-N regimes (``movielens``, ``sessions``, ``playcounts``, ``sparse``, ``short``): NDCG@10 over every test user,
  ranking the whole catalogue (every item of the regime, also those without training events), each user's train
  (+ validation, at test time) items left out of the ranking, ties broken by the smaller recforge item index. This is
  recforge's ``evaluate``: a left-out item scores ``-inf`` and is never ranked, so a user whose test item is already
  among their earlier items still counts, with NDCG 0 (``seen_target_users`` in the results says how many). With one
  test item per user NDCG@10 = 1 / log2(rank + 1) when rank <= 10, else 0.
* rating regimes (``movielens``, ``short``, ``ratings-10``, ``ratings-1-10``, ``sparse-ratings``): RMSE over the
  test rows; pairs a model cannot predict get the library's own fallback (Surprise: the global mean).

Tuning: a seeded Optuna TPE study (a seeded random search when Optuna is missing) fits on train and scores the
validation part; its first trial is the defaults (EASE: then a short grid of regularizations, as each fit is a dense
inversion); the best parameters are refitted on train + validation and scored on test. ``defaults`` is the library's
defaults fitted on train + validation (KNNBaseline: item-based ``pearson_baseline`` similarities, else its defaults).
``fit_seconds`` is the wall time of that final fit. ``--trials`` counts the defaults; ``--ease-trials`` and
``--svdpp-trials`` set the two slow peers' budgets.

RecTools' ``EASEModel.recommend`` ranks by ``X·Wᵀ`` where its weights ``W`` are the paper's ``B`` (implicit's top-k
multiplies the user rows by the transpose of the item matrix), so it is reported twice: ``ease`` as the library
recommends and ``ease-xb`` scoring the same fitted ``W`` as the paper does, ``X·B`` (each picks its own
regularization from the same trials).

Data handed to the peers: implicit gets the user × item matrix of summed weights (the play counts on ``playcounts``,
otherwise the number of events, 1 for almost every pair); its ALS turns them into confidence 1 + alpha·count itself.
RecTools' EASE gets the same weights. Surprise gets the ratings with the regime's rating scale. ``<regime>-binary``
(e.g. ``playcounts-binary``) drops the weights: every event counts 1.

Results: one markdown table per regime on stdout and ``benchmarks/results/peers_regimes.json`` (merged per regime).
Every regime with the default budgets took about 75 minutes on a 2-core machine shared with other work, most of it
EASE's inversions (about 65 s each at 9,700 items, 120 s at 11,000) and SVD++ (about 110 s a default fit on MovieLens).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from early_threads import early_threads

if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, str(early_threads(sys.argv[1:], 2)))

import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
REGIMES = ("movielens", "sessions", "playcounts", "sparse", "short", "ratings-10", "ratings-1-10", "sparse-ratings")
#: Regimes ranked top-N. ``ratings-10`` and ``ratings-1-10`` hold the same events in the same order as ``movielens``
#: and ``sparse-ratings`` those of ``sparse`` (only the rating values differ), so their top-N figures would repeat.
TOP_N_REGIMES = ("movielens", "sessions", "playcounts", "sparse", "short")
#: Regimes with ratings (``short`` keeps MovieLens' ratings, so recforge's suite runs its rating models there too).
RATING_REGIMES = ("movielens", "short", "ratings-10", "ratings-1-10", "sparse-ratings")
#: ``--regimes playcounts-binary``: a regime's split with its weights dropped (every event counts 1)
BINARY = "-binary"
TOP_N_PEERS = ("als", "bpr", "cosine", "ease")
RATING_PEERS = ("svd", "svdpp", "knnbaseline")
K = 10


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--export", metavar="DIR", help="write recforge's loo splits of every regime to DIR (recforge env)")
    mode.add_argument("--splits", metavar="DIR", help="fit and score the peers on the splits in DIR (peers env)")
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--source", default="ml-latest-small", help="the MovieLens dataset name or folder (--export)")
    p.add_argument("--peers", default=",".join(("pop",) + TOP_N_PEERS + RATING_PEERS))
    p.add_argument("--trials", type=int, default=20, help="tuning trials per peer and regime, the defaults included")
    p.add_argument("--ease-trials", type=int, default=5, help="trials for EASE (a dense inversion each)")
    p.add_argument("--svdpp-trials", type=int, default=3, help="trials for SVD++ (slow)")
    p.add_argument("--threads", type=int, default=2, help="threads of the peers and of BLAS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print every tuning trial")
    p.add_argument("--out", default=str(HERE / "results" / "peers_regimes.json"))
    return p.parse_args()


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ----------------------------------------------------------------------------------------------------- export (recforge)
def export(folder: Path, regimes: list[str], source_name: str) -> None:
    """Write recforge's leave-one-out split of every regime to ``folder/<regime>/`` (needs recforge)."""
    sys.path.insert(0, str(HERE))
    from bench_regimes import build

    from recforge.data import Interactions
    from recforge.datasets import load
    from recforge.split import leave_one_out

    source = load(source_name).to_frame()
    for regime in regimes:
        frame = build(regime, source)
        data = Interactions.from_frame(frame, weight_col="weight" if "weight" in frame else None)  # as its main()
        split = leave_one_out(data)
        out = folder / regime
        out.mkdir(parents=True, exist_ok=True)
        assert split.valid is not None
        for part, inter in (("train", split.train), ("valid", split.valid), ("test", split.test)):
            inter.to_frame().to_csv(out / f"{part}.csv", index=False)
        pd.DataFrame({"user_id": data.user_map.to_ids(np.arange(data.n_users))}).to_csv(out / "users.csv", index=False)
        pd.DataFrame({"item_id": data.item_map.to_ids(np.arange(data.n_items))}).to_csv(out / "items.csv", index=False)
        meta = {"regime": regime, "source": source_name, "data": data.regime(), "split": split.summary(),
                "columns": list(data.to_frame().columns)}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"{regime}: {meta['data']}; {meta['split']}", flush=True)


# ------------------------------------------------------------------------------------------------------ data (peers)
@dataclass
class Part:
    """One part of a split in recforge's indices: user and item index, weight and (maybe) rating per row."""

    users: np.ndarray
    items: np.ndarray
    weights: np.ndarray
    ratings: np.ndarray | None

    def __add__(self, other: Part) -> Part:
        ratings = None if self.ratings is None or other.ratings is None else np.concatenate([self.ratings, other.ratings])
        return Part(np.concatenate([self.users, other.users]), np.concatenate([self.items, other.items]),
                    np.concatenate([self.weights, other.weights]), ratings)


@dataclass
class Regime:
    """A regime's split as exported: its parts, the catalogue size and the facts of ``meta.json``."""

    name: str
    n_users: int
    n_items: int
    train: Part
    valid: Part
    test: Part
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        self.train_valid = self.train + self.valid  # what the final models are fitted on

    def matrix(self, part: Part) -> sp.csr_matrix:
        """The user × item matrix of summed weights (duplicates add up: counts when there are no weights)."""
        m = sp.csr_matrix((part.weights.astype(np.float32), (part.users, part.items)), shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.sort_indices()
        return m

    @property
    def rating_scale(self) -> tuple[float, float]:
        every = np.concatenate([p.ratings for p in (self.train, self.valid, self.test) if p.ratings is not None])
        return float(every.min()), float(every.max())


def read_regime(splits: Path, name: str) -> Regime:
    """Read one exported regime; ids are read as text and mapped to recforge's indices through users/items.csv.

    ``<regime>-binary`` is the regime's split with its weights dropped (every event counts 1).
    """
    binary = name.endswith(BINARY)
    folder = splits / name.removesuffix(BINARY)
    users = pd.read_csv(folder / "users.csv", dtype=str)["user_id"]
    items = pd.read_csv(folder / "items.csv", dtype=str)["item_id"]
    u_index = pd.Series(np.arange(len(users)), index=users.to_numpy())
    i_index = pd.Series(np.arange(len(items)), index=items.to_numpy())

    def part(name: str) -> Part:
        df = pd.read_csv(folder / f"{name}.csv", dtype={"user_id": str, "item_id": str})
        w = df["weight"].to_numpy(np.float64) if "weight" in df.columns and not binary else np.ones(len(df))
        r = df["rating"].to_numpy(np.float64) if "rating" in df.columns else None
        return Part(u_index[df["user_id"].to_numpy()].to_numpy(), i_index[df["item_id"].to_numpy()].to_numpy(), w, r)

    meta = json.loads((folder / "meta.json").read_text())
    if binary:
        meta["data"] += "; weights dropped (every event counts 1)"
    return Regime(name, len(users), len(items), part("train"), part("valid"), part("test"), meta)


# --------------------------------------------------------------------------------------------------------- metrics
def ndcg_at_k(score: Callable[[np.ndarray], np.ndarray], target: Part, seen: sp.csr_matrix, n_items: int,
              k: int = K, batch: int = 512) -> tuple[float, int]:
    """Mean NDCG@k of one target item per user over every user of ``target``, as recforge's evaluator computes it.

    ``score(users)`` gives a dense (len(users), n_items) score block. The user's ``seen`` items get ``-inf`` and are
    never ranked, so a target among them is a miss (NDCG 0) and the user still counts. The rank of the target is
    1 + the number of items scored higher + the number of equal scores at a smaller item index. Returns the mean and
    the number of users whose target was among their seen items.
    """
    order = np.argsort(target.users, kind="stable")
    users, items = target.users[order], target.items[order]
    if len(np.unique(users)) != len(users):
        raise SystemExit("expected one target event per user (a leave-one-out split)")
    gains = np.zeros(len(users))
    seen_targets = 0
    columns = np.arange(n_items)
    for lo in range(0, len(users), batch):
        u, t = users[lo : lo + batch], items[lo : lo + batch]
        s = np.array(score(u), dtype=np.float32, copy=True).reshape(len(u), n_items)
        block = seen[u]
        s[np.repeat(np.arange(len(u)), np.diff(block.indptr)), block.indices] = -np.inf
        ts = s[np.arange(len(u)), t]
        ranked = np.isfinite(ts)  # -inf: seen (left out); NaN: unscored — neither can be a hit
        seen_targets += int((np.asarray(block[np.arange(len(u)), t]).ravel() != 0).sum())
        rank = 1 + (s > ts[:, None]).sum(axis=1) + ((s == ts[:, None]) & (columns[None, :] < t[:, None])).sum(axis=1)
        gains[lo : lo + batch] = np.where(ranked & (rank <= k), 1.0 / np.log2(rank + 1.0), 0.0)
    return float(gains.mean()), seen_targets


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error over the rows."""
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - truth) ** 2)))


# ----------------------------------------------------------------------------------------------------------- peers
Params = dict[str, Any]
Scorer = Callable[[Any, np.ndarray], np.ndarray]  # (fitted, user indices) -> dense scores


@dataclass
class Peer:
    """One peer: its kind (``top-n`` or ``rating``), library defaults, search space and how to fit and score it.

    ``space(trial)`` draws parameters from an Optuna-trial-like object; ``grid`` lists parameter sets tried first
    (after the defaults). A top-N peer has ``scorers``: one or more ways to score the same fitted model (each one is
    reported as its own row, tuned on its own validation score); a rating peer has ``predict``.
    """

    key: str
    kind: str
    defaults: Params
    space: Callable[[Any], Params]
    fit: Callable[[Regime, Part, Params], Any]
    scorers: dict[str, Scorer] | None = None
    predict: Callable[[Any, Part], np.ndarray] | None = None
    grid: tuple[Params, ...] = ()

    @property
    def variants(self) -> list[str]:
        return list(self.scorers) if self.scorers else [self.key]


_THREADS = 2
_SEED = 0


def _blas(n: int) -> Any:
    """A context limiting BLAS threads (implicit asks for 1 BLAS thread; EASE's inversion uses ``--threads``)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(n, "blas")


def _fit_als(regime: Regime, part: Part, params: Params) -> Any:
    from implicit.als import AlternatingLeastSquares

    with _blas(1):  # implicit checks the BLAS threads when a model is built
        model = AlternatingLeastSquares(**params, num_threads=_THREADS, random_state=_SEED)
        model.fit(regime.matrix(part), show_progress=False)
    return model


def _fit_bpr(regime: Regime, part: Part, params: Params) -> Any:
    from implicit.bpr import BayesianPersonalizedRanking

    with _blas(1):  # implicit checks the BLAS threads when a model is built
        model = BayesianPersonalizedRanking(**params, num_threads=_THREADS, random_state=_SEED)
        model.fit(regime.matrix(part), show_progress=False)
    return model


def _score_factors(model: Any, users: np.ndarray) -> np.ndarray:
    """Matrix-factorisation scores as implicit's ``recommend`` computes them (BPR's item bias is a factor column)."""
    return model.user_factors[users] @ model.item_factors.T


def _fit_cosine(regime: Regime, part: Part, params: Params) -> Any:
    from implicit.nearest_neighbours import CosineRecommender

    model = CosineRecommender(**params, num_threads=_THREADS)
    matrix = regime.matrix(part)
    with _blas(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own normalisation hands its kNN a COO matrix and warns about it
        model.fit(matrix, show_progress=False)
    return model, matrix


def _score_cosine(fitted: Any, users: np.ndarray) -> np.ndarray:
    """Item-kNN scores as implicit's ``recommend`` computes them: the user's row times the neighbour matrix."""
    model, matrix = fitted
    return (matrix[users] @ model.similarity).toarray()


def _fit_ease(regime: Regime, part: Part, params: Params) -> Any:
    from rectools.dataset import Dataset
    from rectools.models import EASEModel

    frame = pd.DataFrame({"user_id": part.users, "item_id": part.items, "weight": part.weights.astype(np.float32),
                          "datetime": pd.Timestamp(0)})
    dataset = Dataset.construct(frame)
    model = EASEModel(**params, recommend_n_threads=_THREADS)
    with warnings.catch_warnings(), _blas(_THREADS):
        warnings.simplefilter("ignore")
        model.fit(dataset)
    known = dataset.item_id_map.external_ids.astype(np.int64)  # RecTools' own item order -> recforge index
    return model, regime.matrix(part)[:, known].tocsr(), known, regime.n_items


def _score_ease(transpose: bool) -> Scorer:
    """EASE scores from RecTools' weights ``W`` (``W[i, j]`` = -P_ij / P_jj = the paper's ``B``). RecTools'
    ``recommend`` ranks with implicit's top-k, which multiplies the user rows by the *transpose* of the item matrix,
    so it scores ``X·Wᵀ`` (``transpose=True``, what the library recommends); the paper scores ``X·B = X·W``. An item
    without training events is outside RecTools' dataset; its column of ``B`` would be all zero, so it scores 0."""

    def score(fitted: Any, users: np.ndarray) -> np.ndarray:
        model, matrix, known, n_items = fitted
        out = np.zeros((len(users), n_items), np.float32)
        x = matrix[users]
        out[:, known] = (model.weight @ x.T).T if transpose else x @ model.weight
        return out

    return score


class _Pop:
    """Popularity: the training count of each item (a sanity check of the split and the metric)."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts.astype(np.float32)


def _fit_pop(regime: Regime, part: Part, params: Params) -> Any:
    return _Pop(np.bincount(part.items, minlength=regime.n_items))


def _surprise_data(regime: Regime, part: Part) -> Any:
    from surprise import Dataset, Reader

    assert part.ratings is not None
    frame = pd.DataFrame({"u": part.users, "i": part.items, "r": part.ratings})
    return Dataset.load_from_df(frame, Reader(rating_scale=regime.rating_scale)).build_full_trainset()


#: KNNBaseline's similarities and baselines do not depend on ``k`` (only prediction does): the last fit per
#: training part is kept and a trial with another ``k`` is a copy of it with ``k`` changed.
_KNN_CACHE: dict[tuple[str, int], tuple[Any, float]] = {}


def _fit_surprise(cls_name: str) -> Callable[[Regime, Part, Params], Any]:
    def fit(regime: Regime, part: Part, params: Params) -> Any:
        import surprise

        if cls_name == "KNNBaseline":
            key = (regime.name, id(part))
            if key not in _KNN_CACHE:
                _KNN_CACHE.clear()
                started = time.perf_counter()
                base = surprise.KNNBaseline(sim_options={"name": "pearson_baseline", "user_based": False},
                                            verbose=False)
                base.fit(_surprise_data(regime, part))
                _KNN_CACHE[key] = base, time.perf_counter() - started
            base, seconds = _KNN_CACHE[key]
            model = copy.copy(base)
            model.k = params["k"]
            model.fit_seconds = seconds  # the similarity computation, done once per training part
            return model
        extra = {"cache_ratings": True} if cls_name == "SVDpp" else {}  # a speed option; same model
        model = getattr(surprise, cls_name)(**params, **extra, random_state=_SEED)
        model.fit(_surprise_data(regime, part))
        return model

    return fit


def _predict_surprise(model: Any, part: Part) -> np.ndarray:
    """Surprise's estimates (raw ids are recforge's indices; unknown users or items get its fallback, clipped)."""
    return np.array([model.predict(int(u), int(i)).est for u, i in zip(part.users, part.items)])


def _peers() -> dict[str, Peer]:
    """Every peer with its library defaults and search space (``t`` is an Optuna trial or the random stand-in)."""
    return {
        "pop": Peer("pop", "top-n", {}, lambda t: {}, _fit_pop,
                    scorers={"pop": lambda m, u: np.tile(m.counts, (len(u), 1))}),
        "als": Peer("als", "top-n", {"factors": 100, "regularization": 0.01, "alpha": 1.0, "iterations": 15},
                    lambda t: {"factors": t.suggest_int("factors", 16, 256, log=True),
                               "regularization": t.suggest_float("regularization", 1e-4, 10.0, log=True),
                               "alpha": t.suggest_float("alpha", 1e-2, 100.0, log=True),
                               "iterations": 15},
                    _fit_als, scorers={"als": _score_factors}),
        "bpr": Peer("bpr", "top-n", {"factors": 100, "learning_rate": 0.01, "regularization": 0.01, "iterations": 100},
                    lambda t: {"factors": t.suggest_int("factors", 16, 128, log=True),
                               "learning_rate": t.suggest_float("learning_rate", 1e-3, 0.3, log=True),
                               "regularization": t.suggest_float("regularization", 1e-5, 0.1, log=True),
                               "iterations": t.suggest_int("iterations", 20, 200, log=True)},
                    _fit_bpr, scorers={"bpr": _score_factors}),
        "cosine": Peer("cosine", "top-n", {"K": 20}, lambda t: {"K": t.suggest_int("K", 5, 2000, log=True)},
                       _fit_cosine, scorers={"cosine": _score_cosine}),
        # one fit per regularization is a dense inversion of the item Gram matrix: a short grid first
        "ease": Peer("ease", "top-n", {"regularization": 500.0},
                     lambda t: {"regularization": t.suggest_float("regularization", 1.0, 1e5, log=True)},
                     _fit_ease, scorers={"ease": _score_ease(True), "ease-xb": _score_ease(False)},
                     grid=tuple({"regularization": r} for r in (100.0, 2000.0, 25.0, 8000.0, 250.0, 1000.0))),
        "svd": Peer("svd", "rating", {"n_factors": 100, "n_epochs": 20, "lr_all": 0.005, "reg_all": 0.02},
                    lambda t: {"n_factors": t.suggest_int("n_factors", 5, 200, log=True),
                               "n_epochs": t.suggest_int("n_epochs", 5, 60, log=True),
                               "lr_all": t.suggest_float("lr_all", 1e-3, 0.05, log=True),
                               "reg_all": t.suggest_float("reg_all", 1e-3, 0.5, log=True)},
                    _fit_surprise("SVD"), predict=_predict_surprise),
        # SVD++'s cost grows with n_factors × each user's history length per rating: a small space
        "svdpp": Peer("svdpp", "rating", {"n_factors": 20, "n_epochs": 20, "lr_all": 0.007, "reg_all": 0.02},
                      lambda t: {"n_factors": t.suggest_int("n_factors", 5, 20, log=True),
                                 "n_epochs": t.suggest_int("n_epochs", 5, 20, log=True),
                                 "lr_all": t.suggest_float("lr_all", 1e-3, 0.05, log=True),
                                 "reg_all": t.suggest_float("reg_all", 1e-3, 0.5, log=True)},
                      _fit_surprise("SVDpp"), predict=_predict_surprise),
        "knnbaseline": Peer("knnbaseline", "rating", {"k": 40}, lambda t: {"k": t.suggest_int("k", 5, 300, log=True)},
                            _fit_surprise("KNNBaseline"), predict=_predict_surprise),
    }


VARIANT_NAMES = {
    "pop": "popularity (sanity check, written here)",
    "als": "implicit AlternatingLeastSquares",
    "bpr": "implicit BayesianPersonalizedRanking",
    "cosine": "implicit CosineRecommender (item kNN)",
    "ease": "RecTools EASEModel (as it recommends: X·Bᵀ)",
    "ease-xb": "RecTools EASEModel weights scored X·B (the paper)",
    "svd": "Surprise SVD",
    "svdpp": "Surprise SVDpp",
    "knnbaseline": "Surprise KNNBaseline (item, pearson_baseline)",
}


def evaluate(peer: Peer, regime: Regime, fitted: Any, fitted_on: Part, target: Part) -> tuple[dict[str, float], int]:
    """Per variant: NDCG@10 (top-N; ``fitted_on``'s items left out) or RMSE (rating) of a fitted peer on
    ``target``; and how many target items were among the user's ``fitted_on`` items (top-N)."""
    if peer.kind == "rating":
        assert peer.predict is not None and target.ratings is not None
        return {peer.key: rmse(peer.predict(fitted, target), target.ratings)}, 0
    assert peer.scorers is not None
    seen = regime.matrix(fitted_on)
    out, n_seen = {}, 0
    for name, scorer in peer.scorers.items():
        out[name], n_seen = ndcg_at_k(lambda u, s=scorer: s(fitted, u), target, seen, regime.n_items)
    return out, n_seen


# ------------------------------------------------------------------------------------------------------------ tuning
class _RandomTrial:
    """A seeded random-search stand-in for an Optuna trial (used when Optuna is not installed); ``fixed`` parameters
    are returned as given (the defaults and the grid)."""

    def __init__(self, rng: np.random.Generator, fixed: Params | None = None) -> None:
        self.rng = rng
        self.fixed = fixed or {}

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        if name in self.fixed:
            return int(self.fixed[name])
        x = math.exp(self.rng.uniform(math.log(low), math.log(high + 1))) if log else self.rng.uniform(low, high + 1)
        return int(min(high, max(low, math.floor(x))))

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        if name in self.fixed:
            return float(self.fixed[name])
        return float(math.exp(self.rng.uniform(math.log(low), math.log(high))) if log else self.rng.uniform(low, high))


def tune(peer: Peer, regime: Regime, trials: int, seed: int, first: dict[str, Any], verbose: bool) -> dict[str, Any]:
    """Search ``peer.space`` fitting on train and scoring validation: the defaults (already scored: ``first``) are
    trial 1, then ``peer.grid``, then the sampler. Returns every trial with its validation score per variant."""
    maximize = peer.kind == "top-n"
    log: list[dict[str, Any]] = [first]

    def objective(trial: Any) -> float:
        params = peer.space(trial)
        if params == first["params"]:  # the defaults again (the enqueued first trial): already scored
            return first["valid"][peer.variants[0]]
        started = time.perf_counter()
        fitted = peer.fit(regime, regime.train, params)
        seconds = getattr(fitted, "fit_seconds", time.perf_counter() - started)
        valid, _ = evaluate(peer, regime, fitted, regime.train, regime.valid)
        log.append({"params": params, "valid": valid, "fit_seconds": seconds})
        if verbose:
            print(f"    trial {len(log)}: {_fmt_params(params)} -> {valid} ({seconds:.1f} s)", flush=True)
        return valid[peer.variants[0]]

    fixed = [first["params"], *peer.grid][:trials]
    try:
        import optuna
    except ImportError:
        optuna = None
    if optuna is not None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize" if maximize else "minimize",
                                    sampler=optuna.samplers.TPESampler(seed=seed))
        for params in fixed:
            study.enqueue_trial(params)
        study.optimize(objective, n_trials=trials)
        method = f"optuna {optuna.__version__} TPE, seed {seed}, first the defaults" + (" and a grid" if peer.grid else "")
    else:
        rng = np.random.default_rng(seed)
        for i in range(trials):
            objective(_RandomTrial(rng, fixed[i] if i < len(fixed) else None))
        method = f"random search, seed {seed}, first the defaults" + (" and a grid" if peer.grid else "")
    return {"trials": log, "method": method}


def run_peer(peer: Peer, regime: Regime, trials: int, seed: int, verbose: bool = False) -> dict[str, dict[str, Any]]:
    """Defaults and tuned parameters of one peer on one regime, one row per variant: test scores of the defaults
    and of the tuned parameters (both refitted on train + validation), validation scores, fit seconds."""
    refits: dict[str, tuple[Any, float]] = {}  # params -> (fitted on train + validation, seconds)

    def refit(params: Params) -> tuple[Any, float]:
        key = json.dumps(params, sort_keys=True)
        if key not in refits:
            started = time.perf_counter()
            fitted = peer.fit(regime, regime.train_valid, params)
            refits[key] = fitted, getattr(fitted, "fit_seconds", time.perf_counter() - started)
        return refits[key]

    started = time.perf_counter()
    t0 = time.perf_counter()
    fitted = peer.fit(regime, regime.train, peer.defaults)
    first = {"params": dict(peer.defaults), "fit_seconds": getattr(fitted, "fit_seconds", time.perf_counter() - t0)}
    first["valid"], _ = evaluate(peer, regime, fitted, regime.train, regime.valid)
    del fitted
    fitted, default_seconds = refit(peer.defaults)
    default_test, n_seen = evaluate(peer, regime, fitted, regime.train_valid, regime.test)
    search = tune(peer, regime, trials, seed, first, verbose) if trials > 1 and peer.key != "pop" else None
    rows: dict[str, dict[str, Any]] = {}
    pick = max if peer.kind == "top-n" else min
    for variant in peer.variants:
        row: dict[str, Any] = {
            "peer": VARIANT_NAMES[variant], "metric": "rmse" if peer.kind == "rating" else f"ndcg@{K}",
            "default_params": peer.defaults, "default_valid": first["valid"][variant],
            "default_test": default_test[variant], "default_fit_seconds": default_seconds,
        }
        if peer.kind == "top-n":
            row["seen_target_users"] = n_seen
        if search is not None:
            best = pick(search["trials"], key=lambda r: r["valid"][variant])
            fitted, seconds = refit(best["params"])
            test, _ = evaluate(peer, regime, fitted, regime.train_valid, regime.test)
            row.update(tuned_params=best["params"], tuned_valid=best["valid"][variant], tuned_test=test[variant],
                       tuned_fit_seconds=seconds, search=search["method"], n_trials=len(search["trials"]),
                       trials=[{**r, "valid": r["valid"][variant]} for r in search["trials"]])
        rows[variant] = row
    elapsed = time.perf_counter() - started
    for row in rows.values():
        row["peer_seconds"] = elapsed  # the whole peer: defaults, search and refits (all variants together)
    return rows


# ----------------------------------------------------------------------------------------------------------- output
def _fmt_params(params: dict[str, Any] | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def table(name: str, entry: dict[str, Any]) -> str:
    """One markdown table of a regime's peers."""
    rows = [f"\n**{name}** — {entry['data']}\n",
            "| peer | metric | defaults (test) | tuned (test) | tuned (valid) | chosen params | fit s (defaults / tuned) |",
            "|---|---|---:|---:|---:|---|---:|"]
    for r in entry["peers"].values():
        tuned = f"{r['tuned_test']:.4f}" if "tuned_test" in r else ""
        valid = f"{r['tuned_valid']:.4f}" if "tuned_valid" in r else ""
        fit = f"{r['default_fit_seconds']:.1f}" + (f" / {r['tuned_fit_seconds']:.1f}" if "tuned_fit_seconds" in r else "")
        rows.append(f"| {r['peer']} | {r['metric'].upper()} | {r['default_test']:.4f} | {tuned} | {valid} | "
                    f"{_fmt_params(r.get('tuned_params'))} | {fit} |")
    return "\n".join(rows)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for dist in ("numpy", "scipy", "pandas", "implicit", "rectools", "scikit-surprise", "optuna"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _available(peer: str) -> str | None:
    """Why a peer cannot run here (its library does not import), or None."""
    module = {"als": "implicit.als", "bpr": "implicit.bpr", "cosine": "implicit.nearest_neighbours",
              "ease": "rectools.models", "svd": "surprise", "svdpp": "surprise", "knnbaseline": "surprise"}.get(peer)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means the peer is skipped
        return f"{type(exc).__name__}: {exc}"
    return None


NOTES = {
    "protocol": "recforge loo (recforge.split.leave_one_out on the regime's Interactions): per user the last event "
                "is test, the one before validation, users with >= 3 events; splits exported by recforge",
    "top-n metric": f"NDCG@{K} over every test user, ranking the full catalogue with the user's train (+valid) items "
                    "left out; a test item among them is a miss and the user still counts (as recforge's evaluate: "
                    "left-out items score -inf and are never ranked); ties by the smaller recforge item index",
    "rating metric": "RMSE over the test rows (Surprise's fallback for unknown users/items, clipped to the scale)",
    "tuning": "fit on train, score validation; trial 1 is the defaults; the best is refitted on train+valid and "
              "scored on test; 'defaults' are fitted on train+valid",
    "fit seconds": "wall time of the final fit on train+valid; KNNBaseline: its similarity computation (k only "
                   "changes prediction, so tuning k reuses one fit per training part)",
    "ease": "RecTools' EASEModel.recommend scores X·Wᵀ (implicit's top-k multiplies by the transpose of the item "
            "matrix) where W is the paper's B; 'ease-xb' scores the same fitted W as X·B, and picks its own "
            "regularization from the same trials",
}


def run(folder: Path, args: argparse.Namespace) -> None:
    """Fit, tune and score every applicable peer on every exported regime; print tables, write the JSON."""
    global _THREADS, _SEED
    _THREADS, _SEED = args.threads, args.seed
    peers = _peers()
    wanted = _names(args.peers)
    unknown = [p for p in wanted if p not in peers]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; known: {', '.join(peers)}")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    skipped = {p: why for p in wanted if (why := _available(p))}
    meta = {"notes": {**NOTES, "threads": args.threads}, "versions": _versions(), "skipped": skipped}
    for name in _names(args.regimes):
        regime = read_regime(folder, name)
        print(f"{name}: {regime.meta['data']}", flush=True)
        entry: dict[str, Any] = {"data": regime.meta["data"], "split": regime.meta["split"], "peers": {}}
        for key in wanted:
            peer = peers[key]
            base = name.removesuffix(BINARY)
            if base not in (TOP_N_REGIMES if peer.kind == "top-n" else RATING_REGIMES) or key in skipped:
                continue
            trials = {"ease": args.ease_trials, "svdpp": args.svdpp_trials}.get(key) or args.trials
            rows = run_peer(peer, regime, trials, args.seed, args.verbose)
            entry["peers"].update(rows)
            for variant, row in rows.items():
                print(f"  {variant}: defaults {row['default_test']:.4f}"
                      + (f", tuned {row['tuned_test']:.4f} ({_fmt_params(row['tuned_params'])})"
                         if "tuned_test" in row else "")
                      + f" [{row['peer_seconds']:.0f} s]", flush=True)
        _KNN_CACHE.clear()
        results[name] = entry
        results["_meta"] = meta
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)
    for name in _names(args.regimes):
        if name in results and results[name]["peers"]:
            print(table(name, results[name]))
    if skipped:
        print("\nskipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))


def main() -> None:
    args = _args()
    if args.export:
        export(Path(args.export), _names(args.regimes), args.source)
    else:
        run(Path(args.splits), args)


if __name__ == "__main__":
    main()
