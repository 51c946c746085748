"""The contract every registered model honours: one suite, run for every model the registry knows.

New models are picked up automatically (the registry is the list), so none can skip the contract. A model that
needs cheaper settings for tests adds them to ``FAST_PARAMS``; what it must beat on planted data is in
``MUST_BEAT`` (default: most-popular, i.e. it must personalise).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ndcg_of

import recforge.evaluation.evaluator as evaluator_module
import recforge.models
import recforge.models.base as base_module
from recforge import split as S
from recforge.core.params import SYNONYMS
from recforge.data import Interactions
from recforge.errors import DataError, NotFittedError, ParameterError, UnknownIdError, UnsupportedError
from recforge.evaluation import evaluate
from recforge.models import (
    BUILTIN_MODELS,
    LEARNS_FROM,
    RatingPredictor,
    Recommender,
    available_models,
    create_model,
    get_model_class,
)

# amp off: bfloat16 on a GPU blurs what models this small learn from 300 users in 20 epochs (a new user's list fell
# from over 40% to 30% in its cluster); mixed precision is tested in test_sequential.py and measured in benchmarks
_SEQ = {"max_len": 50, "n_factors": 32, "epochs": 20, "lr": 3e-3, "batch_size": 64, "num_threads": 1, "progress": False,
        "amp": False}
FAST_PARAMS: dict[str, dict] = {
    "sasrec": _SEQ,
    "gru4rec": {**_SEQ, "hidden_size": 32, "epochs": 30, "dropout": 0.0},
    "pooling": {**_SEQ, "epochs": 40},
    "bert4rec": _SEQ,
    "twotower": {"epochs": 10, "batch_size": 256, "num_threads": 1, "progress": False},
}
#: What each model must beat in NDCG@10 on the planted data (None: no ranking claim, e.g. the floor itself).
#: Default: most-popular for top-N models, nothing for rating models (their claim is RMSE, below).
#: Content-based models ignore popularity, which dominates the planted data; they must beat random (their cluster
#: precision is checked in tests/test_content.py).
MUST_BEAT: dict[str, str | None] = {"random": None, "pop": "random", "content": "random"}
#: What each rating model must beat in test RMSE on the planted data (default: the bias baseline).
RMSE_MUST_BEAT: dict[str, str | None] = {"globalmean": None, "bias": "globalmean"}
MODELS = available_models()


def ranking_rival(name: str) -> str | None:
    default = None if get_model_class(name).predicts_ratings else "pop"
    return MUST_BEAT.get(name, default)


def make(name: str, **extra) -> Recommender:
    return create_model(name, **{**FAST_PARAMS.get(name, {}), **extra})


@pytest.fixture(scope="module")
def loo(planted: Interactions) -> S.Split:
    return S.leave_one_out(planted)


def test_every_model_class_is_registered() -> None:
    """Walk the models package: any concrete Recommender subclass must be reachable by name."""
    for info in pkgutil.walk_packages(recforge.models.__path__, "recforge.models."):
        importlib.import_module(info.name)
    registered = {get_model_class(n) for n in MODELS}

    def subclasses(cls: type) -> set[type]:
        out = set()
        for sub in cls.__subclasses__():
            out |= {sub} | subclasses(sub)
        return out

    for cls in subclasses(Recommender):
        # A class that implements _fit is a concrete model; shared bases (FactorModel, ...) only score.
        concrete = "_fit" in cls.__dict__ and not inspect.isabstract(cls)
        if cls.__module__.startswith("recforge.") and not cls.__name__.startswith("_") and concrete:
            assert cls in registered, f"{cls.__name__} is not registered"


def test_the_builtin_table_names_each_model_where_it_registers() -> None:
    """BUILTIN_MODELS lets names resolve without imports; it must say where each class really is."""
    for info in pkgutil.walk_packages(recforge.models.__path__, "recforge.models."):
        importlib.import_module(info.name)
    for name, (module, aliases) in BUILTIN_MODELS.items():
        cls = get_model_class(name)
        assert cls.__module__ == module and cls.name == name
        assert all(get_model_class(alias) is cls for alias in aliases)
    assert set(MODELS) == set(BUILTIN_MODELS)


def test_importing_recforge_and_the_registry_stays_light() -> None:
    """`recforge --help` and `recforge recommend` must not wait for torch (or pandas, for the help)."""
    probe = ("import sys, recforge.cli; light = 'pandas' not in sys.modules; "
             "import recforge.models; names = recforge.models.available_models(); "
             "print(light, 'torch' in sys.modules, len(names))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["True", "False", str(len(BUILTIN_MODELS))]


@pytest.mark.parametrize("name", MODELS)
class TestContract:
    def test_fit_returns_self_and_params_round_trip(self, name: str, planted: Interactions) -> None:
        model = make(name)
        assert model.fit(planted) is model
        assert set(model.learns_from.split("+")) <= set(LEARNS_FROM)  # every model states what it learns from
        params = model.get_params()
        assert json.loads(json.dumps(params)) == params
        clone = get_model_class(name)(**params)
        assert clone.get_params() == params

    def test_not_fitted(self, name: str) -> None:
        with pytest.raises(NotFittedError):
            make(name).recommend([0], k=5)

    def test_recommend_frame(self, name: str, planted: Interactions) -> None:
        model = make(name).fit(planted)
        users = planted.user_map.ids[:7]
        recs = model.recommend(users, k=5)
        assert list(recs.columns) == ["user_id", "item_id", "score", "rank"]
        assert set(recs["user_id"]) == set(users)
        assert (recs.groupby("user_id").size() == 5).all()
        for _, grp in recs.groupby("user_id"):
            assert list(grp["rank"]) == [1, 2, 3, 4, 5]
            assert np.all(np.diff(grp["score"].to_numpy()) <= 0)
            assert grp["item_id"].is_unique

    def test_excludes_seen_items_and_serves_the_same_ranking_from_vectors(
        self, name: str, loo: S.Split, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        model = make(name).fit(loo.train)
        recs = model.recommend(k=20)
        seen = set(zip(*loo.train.to_frame()[["user_id", "item_id"]].to_numpy().T))
        pairs = set(zip(recs["user_id"], recs["item_id"]))
        assert not (pairs & seen)
        with_seen = model.recommend(k=model.n_items_, exclude_seen=False)
        assert len(with_seen) == model.n_users_ * model.n_items_
        # What a vector index serves (queries · items) orders every user's items as the model's own scores.
        users = np.arange(min(30, model.n_users_))
        vectors = model.retrieval_vectors(users)
        if vectors is not None:
            queries, items = vectors
            assert queries.dtype == items.dtype == np.float32 and queries.shape[1] == items.shape[1]
            scores = model.score(users)[:, : len(items)]
            offset = scores - queries @ items.T  # a per-user constant (biases that do not change a user's order)
            np.testing.assert_allclose(offset, np.broadcast_to(offset[:, :1], offset.shape),
                                       atol=1e-3 * max(1.0, float(np.abs(scores).max())))
        # Scored and ranked by torch (the GPU path, here on the CPU): the same lists, seen items excluded.
        cpu_i, cpu_s = model.recommend_indices(np.arange(model.n_users_), 10, model.seen_)
        cpu_eval = evaluate(model, loo.test)
        monkeypatch.setattr(base_module, "device_for_rows", lambda n: torch.device("cpu"))
        monkeypatch.setattr(evaluator_module, "device_for_rows", lambda n: torch.device("cpu"))
        dev_i, dev_s = model.recommend_indices(np.arange(model.n_users_), 10, model.seen_)
        tol = 1e-5 * max(1.0, float(np.abs(cpu_s[np.isfinite(cpu_s)]).max()))
        np.testing.assert_allclose(dev_s, cpu_s, atol=tol)
        if model.block_scorer(torch.device("cpu")) == model.score:  # the same scores: the same items, ties included
            np.testing.assert_array_equal(dev_i, cpu_i)
        assert (dev_i == cpu_i).mean() > 0.95  # scored by torch: float rounding may reorder near-ties
        assert not model.seen_[np.arange(model.n_users_)[:, None], np.maximum(dev_i, 0)].toarray()[dev_i >= 0].any()
        assert evaluate(model, loo.test)["ndcg@10"] == pytest.approx(cpu_eval["ndcg@10"], abs=0.01)

    def test_k_larger_than_catalogue_and_bad_k(self, name: str, tiny: Interactions) -> None:
        model = make(name).fit(tiny)
        recs = model.recommend([1], k=100)
        assert len(recs) == tiny.n_items - 3  # user 1 has seen 3 of the 5 items
        for bad in (0, -1, 2.5):
            with pytest.raises(DataError):
                model.recommend([1], k=bad)

    def test_unknown_users(self, name: str, tiny: Interactions, caplog: pytest.LogCaptureFixture) -> None:
        model = make(name).fit(tiny)
        with pytest.raises(UnknownIdError, match="unknown users"):
            model.recommend([1, 99], k=2)
        with caplog.at_level(logging.WARNING):
            recs = model.recommend([1, 99], k=2, on_unknown="warn")
        assert set(recs["user_id"]) == {1} and "99" in caplog.text
        assert set(model.recommend([99, 2], k=2, on_unknown="ignore")["user_id"]) == {2}

    def test_save_load_round_trip(self, name: str, planted_str: Interactions, tmp_path: Path) -> None:
        model = make(name).fit(planted_str)
        before = model.recommend(k=10)
        path = model.save(tmp_path / "artifact")
        assert sorted(p.name for p in path.iterdir()) == ["arrays.safetensors", "ids.npz", "model.json"]
        loaded = Recommender.load(path)
        assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
        after = loaded.recommend(k=10)
        assert before.equals(after)
        np.testing.assert_array_equal(model.score(np.arange(5)), loaded.score(np.arange(5)))
        # Saving again over the same path replaces it atomically and leaves no temporary folders.
        model.save(path)
        assert [p.name for p in tmp_path.iterdir()] == ["artifact"]

    def test_deterministic_with_seed(self, name: str, planted: Interactions) -> None:
        # repeatable for a seed and a fixed thread count: one thread, since Hogwild SGD (BPR, pointwise) is not, and
        # deterministic kernels where a model trains with torch (GPU sums otherwise arrive in a varying order)
        params = get_model_class(name)._param_names()
        serial = {key: value for key, value in (("num_threads", 1), ("deterministic", True)) if key in params}
        a = make(name, **serial).fit(planted).score(np.arange(20))
        b = make(name, **serial).fit(planted).score(np.arange(20))
        np.testing.assert_array_equal(a, b)

    def test_string_ids_round_trip(self, name: str, planted_str: Interactions) -> None:
        recs = make(name).fit(planted_str).recommend(["u3", "u10"], k=3)
        assert set(recs["user_id"]) == {"u3", "u10"}
        assert recs["item_id"].str.startswith("i").all()

    def test_learns_planted_structure(self, name: str, loo: S.Split) -> None:
        rival = ranking_rival(name)
        if rival is None:
            pytest.skip(f"{name} makes no learning claim")
        ours = ndcg_of(make(name), loo.train_valid, loo.test)
        theirs = ndcg_of(make(rival), loo.train_valid, loo.test)
        assert ours > theirs, f"{name} NDCG@10 {ours:.4f} does not beat {rival} {theirs:.4f}"

    def test_partial_fit_adds_users_and_items(self, name: str, planted: Interactions, tmp_path: Path) -> None:
        model = make(name).fit(planted)
        if not model.supports_partial_fit:
            with pytest.raises(UnsupportedError):
                model.partial_fit(planted.to_frame().head(3))
            return
        cluster = planted.item_data["cluster"].to_numpy()
        home = planted.item_map.ids[cluster == 0][:12]
        events = pd.DataFrame({"user_id": [10**6] * 10, "item_id": home[:10]})
        events = pd.concat([events, pd.DataFrame({"user_id": [10**6, 0], "item_id": [10**7, 10**7]})])
        events["rating"] = 5.0
        events["timestamp"] = planted.timestamps.max() + np.arange(len(events))
        n_users, n_items = model.n_users_, model.n_items_
        assert model.partial_fit(events) is model
        assert (model.n_users_, model.n_items_) == (n_users + 1, n_items + 1)
        recs = model.recommend([10**6, 0], k=10)
        assert not set(recs.query("user_id == 1000000")["item_id"]) & (set(home[:10]) | {10**7})
        assert 10**7 not in set(recs.query("user_id == 0")["item_id"])  # seen at once
        loaded = Recommender.load(model.save(tmp_path / "grown"))
        assert loaded.recommend([10**6], k=5).equals(model.recommend([10**6], k=5))
        if ranking_rival(name) == "pop":  # personalised top-N models pick the new user's taste up
            top = recs.query("user_id == 1000000")["item_id"].to_numpy()
            in_home = np.isin(top, planted.item_map.ids[cluster == 0]).mean()
            assert in_home > 0.4, f"only {in_home:.0%} of the new user's list is in its cluster (base rate 20%)"

    def test_rating_models_learn(self, name: str, planted: Interactions) -> None:
        if not get_model_class(name).predicts_ratings or RMSE_MUST_BEAT.get(name, "bias") is None:
            pytest.skip("no rating claim")
        from recforge.evaluation import evaluate

        split = S.random_split(planted, 0.2, seed=1)
        ours = evaluate(make(name).fit(split.train), split.test)["rmse"]
        theirs = evaluate(make(RMSE_MUST_BEAT.get(name, "bias")).fit(split.train), split.test)["rmse"]
        assert ours < theirs

    def test_fit_with_validation_then_refit_with_what_was_tuned(self, name: str, loo: S.Split) -> None:
        """Every model takes ``fit(train, valid=valid)``; models that tune themselves on it say what they chose,
        and a copy built with that choice refits on train + validation without validation."""
        model = make(name)
        assert model.fit(loo.train, valid=loo.valid) is model
        tuned = model.tuned_params_
        assert isinstance(tuned, dict) and (bool(tuned) == model.supports_validation), tuned
        refit = make(name, **tuned).fit(loo.train_valid)
        assert refit.tuned_params_ == {} and refit.n_users_ == model.n_users_
        if "epochs" in tuned:
            assert 1 <= tuned["epochs"] <= model.epochs

    def test_continue_fit_goes_on_from_the_fitted_model(self, name: str, loo: S.Split) -> None:
        """The warm refit: models that can continue their training do so on more data, the others refuse."""
        model = make(name).fit(loo.train)
        if not model.supports_continue:
            with pytest.raises(UnsupportedError, match="cannot continue"):
                model.continue_fit(loo.train_valid, 1)
            return
        before = model.score(np.arange(5))
        assert model.continue_fit(loo.train_valid, 1) is model
        assert model.seen_.nnz == loo.train_valid.csr("ones").nnz  # the new events count as seen
        assert not np.array_equal(before, model.score(np.arange(5)))  # the weights moved on
        with pytest.raises(ParameterError, match="epochs"):
            model.continue_fit(loo.train_valid, 0)

    def test_every_parameter_is_constrained_and_in_the_vocabulary(self, name: str) -> None:
        cls = get_model_class(name)
        params = cls._param_names()
        assert sorted(cls.param_constraints) == sorted(params), "one constraint per constructor parameter"
        synonyms = {p: SYNONYMS[p] for p in params if p in SYNONYMS}
        assert not synonyms, f"{name} uses {synonyms}: use the vocabulary's names"
        defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()}
        if "num_threads" in params:
            assert defaults["num_threads"] == 0, "num_threads defaults to 0 (all cores)"
        make(name).check_params()  # the defaults pass their own constraints
        for old, new in cls.renamed_params.items():
            with pytest.warns(FutureWarning, match=f"'{old}' is renamed '{new}'"):
                moved = create_model(name, **{old: defaults[new]})
            assert getattr(moved, new) == defaults[new] and old not in moved.get_params()

    def test_search_space_names_parameters_whose_whole_range_is_accepted(self, name: str) -> None:
        """Auto-tuning proposes anything in a model's ``search_space``: every value there must be a valid
        parameter value, and the default must lie inside (it is the search's first trial)."""
        cls = get_model_class(name)
        defaults = cls()
        for param, dist in cls.search_space.items():
            assert param in cls._param_names(), f"{name}.search_space names {param!r}, not a parameter"
            if "choices" in dist:
                values = list(dist["choices"])
                assert getattr(defaults, param) in values, f"{name}.{param} default outside its choices"
            else:
                assert dist["low"] < dist["high"] and set(dist) <= {"low", "high", "log", "int"}
                values = [dist["low"], dist["high"]]
                if dist.get("int"):
                    values = [int(v) for v in values]
                assert dist["low"] <= getattr(defaults, param) <= dist["high"], f"{name}.{param} default outside"
            for value in values:
                cls(**{param: value}).check_params()

    def test_bad_parameter_values_raise_a_parameter_error(self, name: str, tiny: Interactions) -> None:
        """Every parameter is probed with values its constraint must refuse (sklearn's common-test idea)."""
        cls = get_model_class(name)
        for param, constraint in cls.param_constraints.items():
            for bad in constraint.rejects():
                with pytest.raises(ParameterError, match=rf"{cls.__name__}\.{param} must be"):
                    make(name, **{param: bad}).fit(tiny)

    def test_rating_models_predict_in_range(self, name: str, planted: Interactions) -> None:
        model = make(name)
        if not isinstance(model, RatingPredictor):
            pytest.skip("not a rating model")
        model.fit(planted)
        pred = model.predict(planted.user_map.ids[:50], planted.item_map.ids[:50])
        assert pred.shape == (50,)
        assert pred.min() >= planted.ratings.min() and pred.max() <= planted.ratings.max()
        # Unknown ids fall back instead of failing.
        assert np.isfinite(model.predict([10**9], [planted.item_map.ids[0]])).all()


@pytest.fixture()
def tiny(tiny_frame, tiny_items) -> Interactions:
    return Interactions.from_frame(tiny_frame, item_data=tiny_items, item_data_id_col="item_id")
