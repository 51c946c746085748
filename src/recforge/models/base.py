"""The model interface shared by every recommender, and artifact I/O.

A model is a scikit-learn-style estimator: hyper-parameters are constructor arguments, ``fit`` returns ``self``,
fitted state ends in ``_``. Subclasses implement ``_fit`` and ``_score`` (a dense block of scores for a batch of
user indices) and list their fitted arrays in ``_state``; everything else — id translation, seen-item exclusion,
top-k, batching, save/load — lives here once.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

import recforge
from recforge.core.accelerator import device_for_rows
from recforge.core.params import Constraint, check_k, check_params, translate_renamed
from recforge.core.sparse import csr_from_state, merge_csr, pad_csr, pattern
from recforge.core.topk import batch_rows, mask_and_topk
from recforge.data.idmap import IdMap
from recforge.data.interactions import Interactions
from recforge.data.io import atomic_directory
from recforge.errors import (
    ArtifactError,
    DataError,
    DeviceError,
    EmptyDatasetError,
    NotFittedError,
    ParameterError,
    UnsupportedError,
)
from recforge.models.artifact import (
    check_hashes,
    check_ids,
    check_meta,
    check_state,
    file_hashes,
    nonfinite_array,
    pack_strings,
    stored_array,
)
from recforge.models.registry import get_model_class
from recforge.retrieval import ANN_MIN_ITEMS, HNSWIndex, has_ann

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "recforge-model"
#: 2 adds the SHA-256 of the array files to model.json; version 1 artifacts still load (with a warning).
ARTIFACT_VERSION = 2
#: The array holding a stored HNSW graph (``save(ann=True)``), checked against the model's vectors when used.
ANN_GRAPH = "retrieval.hnsw"
#: Parameters that say where a fit writes and whence it resumes on the machine that ran it: a loaded model has
#: their defaults, whatever its artifact says (a hostile artifact could otherwise aim a refit at any folder).
LOCAL_PARAMS = ("checkpoint_dir", "resume")


def _overlap(a: Path, b: Path) -> bool:
    """Whether one of two folders is, or lies inside, the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def without_local_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without :data:`LOCAL_PARAMS`, at any depth (an ensemble's member parameters are nested)."""
    return {k: without_local_params(v) if isinstance(v, dict) else v for k, v in params.items()
            if k not in LOCAL_PARAMS}


#: What a model can learn from the interactions: every run states it per model (``notes.learns_from``), so that
#: ratings read as mere presence, or counts read as one event, are never a surprise.
LEARNS_FROM: dict[str, str] = {
    "binary": "which items each user interacted with (repeats and rating values ignored)",
    "counts": "how often each user interacted with each item, or the summed weight column (rating values ignored)",
    "ratings": "the rating values",
    "order": "the order of each user's events (rating values ignored)",
    "content": "the items' text and features, and which items each user interacted with",
    "nothing": "nothing but the catalogue",
}


@dataclass(frozen=True)
class ScoringVectors:
    """A model's score as ``queries[u] · items[i] + query_bias[u] + item_bias[i] + constant`` (float32 arrays, one
    row per user index and per item index; absent biases are None)."""

    queries: np.ndarray
    items: np.ndarray
    query_bias: np.ndarray | None = None
    item_bias: np.ndarray | None = None
    constant: float = 0.0


class Recommender:
    """Base class of top-N recommenders.

    Subclasses set the class attribute ``name`` through :func:`recforge.models.registry.register`, implement
    ``_fit(interactions)`` and ``_score(user_indices) -> float32 array (len(users), n_items)``, and return their
    fitted arrays from ``_state()`` / accept them in ``_load_state(state)``.
    """

    name: ClassVar[str] = ""
    #: Shapes of the arrays ``_state`` saves, checked on load: dims are ints, ``"users"``, ``"items"``, integer
    #: parameters, other names (equal wherever they recur) or ``None`` (see :func:`recforge.models.artifact.check_state`).
    state_shapes: ClassVar[dict[str, tuple[Any, ...]]] = {}
    #: Saved arrays of indices and what they index (``"users"``, ``"items"`` or a name in ``state_shapes``).
    state_indices: ClassVar[dict[str, str]] = {}
    #: Where in a service's feedback log (segment name -> byte offset) the events this model was trained on end
    #: (set by ``recforge refit``; a service replays only what comes after).
    feedback_offsets_: dict[str, int] | None = None
    #: The HNSW graph stored with a loaded artifact (``save(ann=True)``), for a service's vector index.
    ann_graph_: np.ndarray | None = None
    #: True for models that predict ratings (they also implement ``predict``).
    predicts_ratings: ClassVar[bool] = False
    #: What the model learns from, one of :data:`LEARNS_FROM` (see :attr:`learns_from`).
    learns: ClassVar[str] = "binary"
    #: True for models that implement ``_grow`` and ``_partial_fit`` (incremental updates).
    supports_partial_fit: ClassVar[bool] = False
    #: True for models whose score depends on the order of the user's recent items (sequential models):
    #: next-event evaluation then scores each sample from its own history via ``score_histories``.
    uses_history: ClassVar[bool] = False
    #: True for models that use a validation set during ``fit`` (early stopping of neural models).
    supports_validation: ClassVar[bool] = False
    #: True for models whose training can go on from where a fit stopped, on more data (``continue_fit``).
    supports_continue: ClassVar[bool] = False
    #: True for models trained by :class:`recforge.neural.trainer.Trainer`: they report a validation score after
    #: every epoch through its callbacks (Optuna pruning listens there).
    uses_trainer: ClassVar[bool] = False
    #: What every constructor parameter accepts (checked by ``fit``; see :mod:`recforge.core.params`).
    #: The key hyper-parameters auto-tuning searches on validation (the default of ``compare`` and ``evaluate``;
    #: ``tune: true`` in an experiment config), as distributions in the experiment-config format
    #: (``{"low", "high"[, "log", "int"]}`` or ``{"choices"}``); empty: the model has nothing worth tuning.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}
    param_constraints: ClassVar[dict[str, Constraint]] = {}
    #: Old parameter names still accepted for one release (old name -> vocabulary name), with a FutureWarning.
    renamed_params: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and cls.renamed_params:

            @functools.wraps(init)  # inspect.signature follows __wrapped__: the parameters stay the new names
            def renaming_init(self: Recommender, *args: Any, **params: Any) -> None:
                init(self, *args, **translate_renamed(type(self).__name__, type(self).renamed_params, params))

            cls.__init__ = renaming_init  # type: ignore[method-assign]

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        """Each hyper-parameter's default (those the constructor requires are left out)."""
        sig = inspect.signature(cls.__init__)
        return {name: sig.parameters[name].default for name in cls._param_names()
                if sig.parameters[name].default is not inspect.Parameter.empty}

    @classmethod
    def check_param_names(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with renamed parameters translated (FutureWarning); unknown names raise
        :class:`~recforge.errors.ParameterError` listing the valid ones."""
        params = translate_renamed(cls.__name__, cls.renamed_params, dict(params))
        valid = cls._param_names()
        unknown = [p for p in params if p not in valid]
        if unknown:
            raise ParameterError(f"{cls.__name__} has no parameter(s) {unknown}; valid parameters: {valid}")
        return params

    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters as a dict (JSON-serialisable), as given to the constructor."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Recommender:
        """Set hyper-parameters; unknown names raise :class:`~recforge.errors.ParameterError`."""
        for key, value in self.check_param_names(params).items():
            setattr(self, key, value)
        return self

    def check_params(self) -> None:
        """Check every hyper-parameter against ``param_constraints`` (``fit`` does this first); the first bad
        one raises :class:`~recforge.errors.ParameterError` naming the model, the parameter and the range."""
        check_params(self, self.param_constraints, self.get_params())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ fitting
    @property
    def learns_from(self) -> str:
        """What this model, with its parameters, learns from: a key of :data:`LEARNS_FROM`, or several joined
        by ``+`` for ensembles."""
        return self.learns

    def fit(self, interactions: Interactions, valid: Interactions | None = None) -> Recommender:
        """Fit on interactions; returns ``self``.

        ``valid`` (same id maps as ``interactions``) is used by models with ``supports_validation`` to choose
        what they tune while fitting (the number of epochs by early stopping, blend weights) — each validation
        event is a held-out target whose history is the user's earlier events — and ignored by the others.
        What was chosen is kept in ``tuned_params_``: refitting a copy of the model with those parameters on
        train + validation, without ``valid``, reproduces the choice on more data.
        """
        self.check_params()
        start = time.perf_counter()
        self._set_fitted_data(interactions, valid)
        self.tuned_params_: dict[str, Any] = {}
        if self.supports_validation:
            self._fit(interactions, valid)  # type: ignore[call-arg]
        else:
            if valid is not None and len(valid):
                log.debug("%s does not use a validation set; ignoring it", type(self).__name__)
            self._fit(interactions)
        self.fit_seconds_ = time.perf_counter() - start
        log.info("fitted %s in %.2fs", type(self).__name__, self.fit_seconds_)
        return self

    def continue_fit(self, interactions: Interactions, epochs: int) -> Recommender:
        """Go on training the fitted model on ``interactions`` (the fitted model's id maps) for ``epochs`` epochs,
        without validation; returns ``self``. The fitting pipeline's warm refit: a model early-stopped on
        validation continues on train + validation instead of being trained again from scratch. Models without
        ``supports_continue`` raise :class:`~recforge.errors.UnsupportedError`."""
        self._check_fitted()
        if not self.supports_continue:
            raise UnsupportedError(f"{type(self).__name__} cannot continue its training; fit it again")
        if not isinstance(interactions, Interactions) or (
            interactions.item_map != self.item_map_ or interactions.user_map != self.user_map_
        ):
            raise DataError("continue_fit needs interactions with the fitted model's id maps")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise ParameterError(f"{type(self).__name__}.continue_fit epochs must be an integer >= 1, got {epochs!r}")
        start = time.perf_counter()
        self._set_fitted_data(interactions)
        self._continue_fit(interactions, int(epochs))
        self.fit_seconds_ = getattr(self, "fit_seconds_", 0.0) + time.perf_counter() - start
        return self

    def _continue_fit(self, interactions: Interactions, epochs: int) -> None:
        raise NotImplementedError

    def _set_fitted_data(self, interactions: Interactions, valid: Interactions | None = None) -> None:
        """Check the training (and validation) data and keep what every model needs of them: the id maps, the
        seen-item pattern and the item titles."""
        if not isinstance(interactions, Interactions):
            raise DataError(f"fit expects recforge Interactions, got {type(interactions).__name__}")
        if len(interactions) == 0:
            raise EmptyDatasetError("cannot fit on an empty dataset")
        if valid is not None:
            if not isinstance(valid, Interactions):
                raise DataError(f"valid must be recforge Interactions, got {type(valid).__name__}")
            if valid.item_map != interactions.item_map or valid.user_map != interactions.user_map:
                raise DataError("valid and the training data use different id maps; split one Interactions object")
        self.user_map_ = interactions.user_map
        self.item_map_ = interactions.item_map
        csr = interactions.csr("ones")
        self.seen_ = sp.csr_matrix(
            (np.ones(csr.nnz, np.float32), csr.indices, csr.indptr), shape=csr.shape, dtype=np.float32
        )
        data = interactions.item_data
        self.item_titles_ = (
            data["title"].fillna("").astype(str).to_numpy(dtype=str)
            if data is not None and "title" in data.columns
            else None
        )

    def _fit(self, interactions: Interactions) -> None:
        raise NotImplementedError

    def partial_fit(self, events: Interactions | pd.DataFrame) -> Recommender:
        """Update a fitted model with new events without refitting from scratch; returns ``self``.

        ``events``: an :class:`Interactions` or a DataFrame with ``user_id``, ``item_id`` and optional
        ``rating``/``timestamp``/``weight`` columns, in the user's own ids. Users and items never seen before are
        appended to the id maps (existing indices stay), and the new pairs count as seen at once.
        """
        self._check_fitted()
        if not self.supports_partial_fit:
            raise UnsupportedError(f"{type(self).__name__} has no incremental update; refit it on all data")
        frame = events.to_frame() if isinstance(events, Interactions) else events
        if not isinstance(frame, pd.DataFrame) and hasattr(frame, "to_pandas"):
            frame = frame.to_pandas()
        for col in ("user_id", "item_id"):
            if col not in getattr(frame, "columns", ()):
                raise DataError(f"partial_fit needs a {col!r} column; got {list(getattr(frame, 'columns', []))}")
        if len(frame) == 0:
            return self
        user_map, _ = self.user_map_.extend(frame["user_id"])
        item_map, _ = self.item_map_.extend(frame["item_id"])
        weight_col = "weight" if "weight" in frame.columns else None  # documented above; from_frame ignores it otherwise
        new = Interactions.from_frame(frame, user_map=user_map, item_map=item_map, weight_col=weight_col)
        if self.predicts_ratings and new.ratings is None:
            raise DataError(f"{type(self).__name__} updates need a rating column")
        n_new_users, n_new_items = len(user_map) - self.n_users_, len(item_map) - self.n_items_
        self.user_map_, self.item_map_ = user_map, item_map
        self.seen_ = merge_csr(pad_csr(self.seen_, len(user_map), len(item_map)),
                               pattern(new.users, new.items, (len(user_map), len(item_map))), "ones")
        if getattr(self, "item_titles_", None) is not None and n_new_items:
            self.item_titles_ = np.concatenate([self.item_titles_, np.full(n_new_items, "", dtype=self.item_titles_.dtype)])
        self._grow(n_new_users, n_new_items)
        self._partial_fit(new)
        return self

    def _grow(self, n_new_users: int, n_new_items: int) -> None:
        """Append state for new users/items (models with incremental updates override this)."""
        raise NotImplementedError

    def _partial_fit(self, new: Interactions) -> None:
        """Learn from new events, indexed with the already-extended maps."""
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "item_map_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit(interactions) first")

    @property
    def n_users_(self) -> int:
        """Number of users known to the fitted model."""
        self._check_fitted()
        return len(self.user_map_)

    @property
    def n_items_(self) -> int:
        """Number of items in the fitted model's catalogue."""
        self._check_fitted()
        return len(self.item_map_)

    # ------------------------------------------------------------------ scoring
    def score(self, users: np.ndarray) -> np.ndarray:
        """Dense float32 scores (len(users) × n_items) for user *indices*; higher is better."""
        self._check_fitted()
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        if users.size and (users.min() < 0 or users.max() >= self.n_users_):
            raise DataError(f"user indices must lie in [0, {self.n_users_}); translate ids with user_map_ first")
        out = np.asarray(self._score(users), dtype=np.float32)
        if out.shape != (len(users), self.n_items_):
            raise AssertionError(f"{type(self).__name__}._score returned shape {out.shape}")
        return out

    def _score(self, users: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score_histories(self, histories: Any) -> np.ndarray:
        """Dense float32 scores (one row per history × n_items) for item-index histories, oldest item first.

        ``histories``: a list of index arrays, or a pair ``(offsets, items)`` of flat arrays where history ``h``
        is ``items[offsets[h]:offsets[h+1]]``. Models that cannot score a history raise
        :class:`~recforge.errors.UnsupportedError`.
        """
        self._check_fitted()
        offsets, items = flat_histories(histories)
        if items.size and (items.min() < 0 or items.max() >= self.n_items_):
            raise DataError(f"history item indices must lie in [0, {self.n_items_}); translate ids with item_map_")
        out = np.asarray(self._score_histories(offsets, items), dtype=np.float32)
        if out.shape != (len(offsets) - 1, self.n_items_):
            raise AssertionError(f"{type(self).__name__}._score_histories returned shape {out.shape}")
        return out

    def scoring_vectors(self) -> ScoringVectors | None:
        """The parts of the model's score when it is ``queries[u] · items[i] + query_bias[u] + item_bias[i] +
        constant`` for every user and item (factor models, the two-tower), so a GPU can score blocks of users
        without the CPU; None for models that score otherwise."""
        return None

    def block_scorer(self, device: Any) -> Callable[[np.ndarray], Any]:
        """A function scoring blocks of user indices for ranking on ``device`` (a CUDA ``torch.device``, or None
        for the CPU): from :meth:`scoring_vectors` on the device where the model has them, else :meth:`score`."""
        parts = None if device is None else self.scoring_vectors()
        if parts is None:
            return self.score
        # torch is imported only once a GPU ranks (see device_for_rows)
        from recforge.core.device_topk import VectorScorer

        return VectorScorer(parts.queries, parts.items, device, parts.query_bias, parts.item_bias, parts.constant)

    def retrieval_vectors(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(queries, items)`` such that ``queries @ items.T`` ranks every item for ``users`` as the model does
        (per-user constants dropped), for serving from a vector index; None for models that do not score by an
        inner product."""
        return None

    @classmethod
    def scores_histories(cls) -> bool:
        """Whether the model recommends for an item history (``recommend_for_history``, ``score_histories``)."""
        return cls._score_histories is not Recommender._score_histories

    @classmethod
    def has_similarity(cls) -> bool:
        """Whether the model has an item-to-item similarity (``similar_items``)."""
        return cls._similar_indices is not Recommender._similar_indices

    def _score_histories(self, offsets: np.ndarray, items: np.ndarray) -> np.ndarray:
        raise UnsupportedError(
            f"{type(self).__name__} scores known users only; use a sequential, item-item or popularity model "
            "to recommend for an item history"
        )

    def recommend_for_history(
        self,
        items: Any,
        k: int = 10,
        exclude_history: bool = True,
        on_unknown: Literal["raise", "warn", "ignore"] = "warn",
        with_titles: bool = False,
    ) -> pd.DataFrame:
        """Top-``k`` items (``item_id, score, rank[, title]``) for a new session given its item ids, oldest first.

        Works for users the model never saw (cold users). Items unknown to the model follow ``on_unknown``
        (``"warn"``/``"ignore"`` drop them); ``exclude_history`` removes the session's own items.
        """
        self._check_fitted()
        k = check_k(k)
        ids = np.atleast_1d(np.asarray(items))
        idx = self.item_map_.to_index(ids, on_unknown=on_unknown, what="items") if ids.size else np.zeros(0, np.int32)
        scores = self.score_histories([idx])
        if exclude_history and idx.size:
            excl = pattern(np.zeros(idx.size, np.int64), idx, (1, self.n_items_))
            top, top_s = mask_and_topk(scores, min(k, self.n_items_), excl.indptr, excl.indices)
        else:
            top, top_s = mask_and_topk(scores, min(k, self.n_items_))
        valid = top[0] >= 0
        out = pd.DataFrame(
            {
                "item_id": self.item_map_.to_ids(top[0][valid]),
                "score": top_s[0][valid],
                "rank": np.arange(1, int(valid.sum()) + 1, dtype=np.int32),
            }
        )
        if with_titles and getattr(self, "item_titles_", None) is not None:
            out["title"] = self.item_titles_[top[0][valid]]
        return out

    def similar_items(
        self,
        items: Any,
        k: int = 10,
        on_unknown: Literal["raise", "warn", "ignore"] = "raise",
        with_titles: bool = False,
    ) -> pd.DataFrame:
        """"More like this": the ``k`` items most similar to each given item id, as a DataFrame
        ``item_id, similar_item_id, score, rank[, title]`` (the item itself is never listed).

        Available on models with an item-to-item similarity (content, item-kNN, factor and two-tower models);
        others raise :class:`~recforge.errors.UnsupportedError`. Unknown items follow ``on_unknown``.
        """
        self._check_fitted()
        k = check_k(k)
        ids = np.atleast_1d(np.asarray(items))
        idx = self.item_map_.to_index(ids, on_unknown=on_unknown, what="items") if ids.size else np.zeros(0, np.int32)
        top, top_s = self.similar_indices(idx, k)
        valid = top >= 0
        rows = np.repeat(np.arange(len(idx)), valid.sum(axis=1))
        out = pd.DataFrame(
            {
                "item_id": self.item_map_.to_ids(np.asarray(idx)[rows]),
                "similar_item_id": self.item_map_.to_ids(top[valid]),
                "score": top_s[valid],
                "rank": np.broadcast_to(np.arange(1, top.shape[1] + 1, dtype=np.int32), top.shape)[valid],
            }
        )
        if with_titles and getattr(self, "item_titles_", None) is not None:
            out["title"] = self.item_titles_[top[valid]]
        return out

    def similar_indices(self, items: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` similar item indices and scores for item *indices* (each item itself excluded), padded with
        ``-1`` / ``-inf``; models without an item-to-item similarity raise
        :class:`~recforge.errors.UnsupportedError`."""
        self._check_fitted()
        k = check_k(k)
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        if items.size and (items.min() < 0 or items.max() >= self.n_items_):
            raise DataError(f"item indices must lie in [0, {self.n_items_}); translate ids with item_map_ first")
        return self._similar_indices(items, min(k, max(self.n_items_ - 1, 1)))

    def _similar_indices(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` similar item indices and scores per item index (itself excluded); ``-1`` pads."""
        raise UnsupportedError(f"{type(self).__name__} has no item-to-item similarity")

    def recommend_indices(
        self,
        users: np.ndarray,
        k: int = 10,
        exclude: sp.csr_matrix | None = None,
        batch_size: int | None = None,
        extra_exclude: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item indices and scores for user indices, excluding the items of ``exclude`` (a user × item
        CSR pattern indexed by user, e.g. ``seen_``) and, per requested user, the item indices of
        ``extra_exclude`` (e.g. feedback not yet learned). Padded with ``-1`` / ``-inf`` when fewer than ``k``
        items are left."""
        self._check_fitted()
        k = check_k(k)
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        if extra_exclude is not None and len(extra_exclude) != len(users):
            raise DataError(f"extra_exclude needs one array per user ({len(users)}), got {len(extra_exclude)}")
        if users.size and (users.min() < 0 or users.max() >= self.n_users_):
            raise DataError(f"user indices must lie in [0, {self.n_users_}); translate ids with user_map_ first")
        k_eff = min(k, self.n_items_)
        out_i = np.full((len(users), k_eff), -1, np.int32)
        out_s = np.full((len(users), k_eff), -np.inf, np.float32)
        device = device_for_rows(len(users))  # many users on a GPU machine: scored and ranked there
        score = self.block_scorer(device)
        step = batch_size or batch_rows(self.n_items_)
        for lo in range(0, len(users), step):
            block_users = users[lo : lo + step]
            scores = score(block_users)
            sub = None if exclude is None else exclude[block_users]
            if extra_exclude is not None:
                rows = np.repeat(np.arange(len(block_users)), [len(e) for e in extra_exclude[lo : lo + step]])
                cols = np.concatenate([np.asarray(e, np.int64) for e in extra_exclude[lo : lo + step]] or [[]])
                more = pattern(rows, cols.astype(np.int64), (len(block_users), self.n_items_))
                sub = more if sub is None else merge_csr(sub, more, "ones")
            ex_ptr, ex_idx = (None, None) if sub is None else (sub.indptr, sub.indices)
            idx, sc = mask_and_topk(scores, k_eff, ex_ptr, ex_idx, device=device)
            out_i[lo : lo + step] = idx
            out_s[lo : lo + step] = sc
        return out_i, out_s

    def recommend(
        self,
        users: Any = None,
        k: int = 10,
        exclude_seen: bool = True,
        on_unknown: Literal["raise", "warn", "ignore"] = "raise",
        batch_size: int | None = None,
        with_titles: bool = False,
    ) -> pd.DataFrame:
        """Top-``k`` recommendations as a DataFrame ``user_id, item_id, score, rank`` in the user's own ids.

        ``users``: ids (default: every user known to the model). ``exclude_seen`` removes items the user
        interacted with in the training data. Users unknown to the model follow ``on_unknown``: ``"raise"``
        (:class:`~recforge.errors.UnknownIdError`), ``"warn"`` (log and skip) or ``"ignore"`` (skip).
        ``with_titles`` adds a ``title`` column when the training data had item titles.
        """
        self._check_fitted()
        k = check_k(k)
        if users is None:
            idx = np.arange(self.n_users_, dtype=np.int32)
        else:
            idx = self.user_map_.to_index(np.atleast_1d(np.asarray(users)), on_unknown=on_unknown, what="users")
        items, scores = self.recommend_indices(idx, k, self.seen_ if exclude_seen else None, batch_size)
        valid = items >= 0
        rows = np.repeat(np.arange(len(idx)), valid.sum(axis=1))
        ranks = np.broadcast_to(np.arange(1, items.shape[1] + 1, dtype=np.int32), items.shape)[valid]
        out = pd.DataFrame(
            {
                "user_id": self.user_map_.to_ids(idx[rows]),
                "item_id": self.item_map_.to_ids(items[valid]),
                "score": scores[valid],
                "rank": ranks,
            }
        )
        if with_titles and getattr(self, "item_titles_", None) is not None:
            out["title"] = self.item_titles_[items[valid]]
        return out

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        """Fitted arrays (numpy) and scalars (float/int/str) to persist; override in subclasses."""
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_state` returned; override in subclasses."""

    def save(self, path: str | os.PathLike[str], ann: bool | None = None) -> Path:
        """Save to a directory: ``model.json`` (class, parameters, metadata), ``arrays.safetensors`` and
        ``ids.npz``. Written atomically; no pickle anywhere, so loading cannot run code.

        ``ann``: also store the HNSW graph a service answers ``/recommend`` from (:meth:`retrieval_vectors`
        models), so that loading does not rebuild it; by default for catalogues of
        :data:`~recforge.retrieval.ANN_MIN_ITEMS` items and more, when usearch is installed."""
        self._check_fitted()
        checkpoints = getattr(self, "checkpoint_dir", None)
        if checkpoints and _overlap(Path(path), Path(checkpoints)):
            raise ParameterError(f"saving to {str(path)!r} would replace the training checkpoints in "
                                 f"{checkpoints!r} (or be replaced by them): save it elsewhere")
        state = self._state()
        arrays = {k: np.ascontiguousarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}
        broken = nonfinite_array(arrays)
        if broken:
            raise DataError(f"{type(self).__name__}'s {broken} holds NaN or +inf: the fit diverged; not saved")
        if ann or (ann is None and self.n_items_ >= ANN_MIN_ITEMS and has_ann()):
            vectors = self.retrieval_vectors(np.zeros(0, np.int64))
            if vectors is None:
                raise UnsupportedError(f"{type(self).__name__} does not score by an inner product: no ANN index")
            started = time.perf_counter()
            arrays[ANN_GRAPH] = HNSWIndex(vectors[1], num_threads=getattr(self, "num_threads", 0)).to_bytes()
            log.info("HNSW graph over %d items built in %.1f s", len(vectors[1]), time.perf_counter() - started)
        scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
        for key, value in scalars.items():
            if isinstance(value, np.generic):
                scalars[key] = value.item()
        arrays["seen.indptr"] = self.seen_.indptr.astype(np.int64)
        arrays["seen.indices"] = self.seen_.indices.astype(np.int32)
        meta = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_VERSION,
            "model": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "params": self.get_params(),
            "scalars": scalars,
            "n_users": self.n_users_,
            "n_items": self.n_items_,
            "recforge_version": recforge.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "feedback_offsets": self.feedback_offsets_,
        }
        with atomic_directory(path) as tmp:
            save_file(arrays, str(tmp / "arrays.safetensors"))
            titles = getattr(self, "item_titles_", None)
            ids = {"users": self.user_map_.ids, "items": self.item_map_.ids}
            packed = {k: v for k, v in ids.items() if v.dtype.kind != "U"}
            for key, value in [*((k, v) for k, v in ids.items() if v.dtype.kind == "U"), ("item_titles", titles)]:
                if value is not None:
                    packed.update(pack_strings(key, value))
            np.savez(tmp / "ids.npz", **packed)
            meta["sha256"] = file_hashes(tmp)
            (tmp / "model.json").write_text(json.dumps(meta, indent=2, default=_json_default))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recommender:
        """Load a model saved by :meth:`save`. Called on the base class, it returns whatever model was saved.

        Everything is checked before use (:mod:`recforge.models.artifact`): the array files' hashes, the structure
        of ``model.json``, the parameters, the id maps, and every array's shape, dtype and index range; any
        problem is an :class:`ArtifactError` naming it."""
        p = Path(path)
        where = repr(str(p))
        meta_path = p / "model.json"
        try:
            if not meta_path.is_file():
                raise ArtifactError(f"{where[:300]} is not a recforge model artifact (no model.json)")
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ArtifactError(f"{str(meta_path)!r} is not valid JSON: {str(exc)[:200]}") from None
        except OSError as exc:
            raise ArtifactError(f"{where[:300]} cannot be read: {exc.strerror or exc}") from None
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT or version not in (1, ARTIFACT_VERSION):
            found = (meta.get("format"), version) if isinstance(meta, dict) else (type(meta).__name__, None)
            raise ArtifactError(f"{where} has format {found[0]!r} v{found[1]}; this recforge reads "
                                f"{ARTIFACT_FORMAT!r} v1 and v{ARTIFACT_VERSION}")
        if version == 1:  # saved before artifacts carried hashes
            log.warning("%s was saved by an older recforge: no content hash to verify; save it again", where)
            meta = {**meta, "sha256": meta.get("sha256", {})}
        check_meta(meta, where)
        try:
            model_cls = get_model_class(meta["model"])
        except KeyError as exc:
            raise ArtifactError(f"{where} holds an unknown model: {exc}") from None
        if cls is not Recommender and not issubclass(model_cls, cls):
            raise ArtifactError(f"{where} holds a {model_cls.__name__}, not a {cls.__name__}")
        try:
            if version != 1:
                check_hashes(p, meta["sha256"], where)
            arrays = load_file(str(p / "arrays.safetensors"))
            with np.load(p / "ids.npz", allow_pickle=False) as ids:
                user_ids = stored_array(ids, "users", meta["n_users"], where)
                item_ids = stored_array(ids, "items", meta["n_items"], where)
                titles = stored_array(ids, "item_titles", meta["n_items"], where)
            if user_ids is None or item_ids is None:
                raise KeyError("users" if user_ids is None else "items")
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise ArtifactError(f"{where} is incomplete or corrupt: {exc}") from None
        try:  # the stored parameters are checked like a user's (an artifact may be edited or come from elsewhere)
            # where the saving machine wrote is never followed (see LOCAL_PARAMS)
            model = model_cls(**without_local_params(model_cls.check_param_names(dict(meta["params"]))))
            model.check_params()
        except ParameterError as exc:
            raise ArtifactError(f"{where} holds parameters this recforge refuses: {exc}") from None
        n_users, n_items = meta["n_users"], meta["n_items"]
        check_ids(user_ids, n_users, "user", where)
        check_ids(item_ids, n_items, "item", where)
        if titles is not None and (titles.ndim != 1 or len(titles) != n_items):
            raise ArtifactError(f"{where}: {len(titles)} item titles for {n_items} items")
        scalars = meta["scalars"]
        sizes = {"users": n_users, "items": n_items,
                 **{k: v for k, v in model.get_params().items() if isinstance(v, int) and not isinstance(v, bool)}}
        graph = arrays.pop(ANN_GRAPH, None)
        check_state(arrays, scalars, model_cls.state_shapes, model_cls.state_indices, sizes, where)
        try:
            model.user_map_ = IdMap(user_ids)
            model.item_map_ = IdMap(item_ids)
            model.item_titles_ = titles
            model.seen_ = csr_from_state("seen", {k: arrays.pop(k) for k in ("seen.indptr", "seen.indices")},
                                         (n_users, n_items))
            model.feedback_offsets_ = _feedback_offsets(meta.get("feedback_offsets"))
            model._load_state({**arrays, **scalars})
            model._check_loaded()
            model._check_scores()
            model.ann_graph_ = graph
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from None
        except DeviceError:  # this machine's setting (RECFORGE_DEVICE), not the artifact's fault
            raise
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, DataError) as exc:
            what = f"lacks {exc.args[0]!r}" if isinstance(exc, KeyError) else f"does not fit: {exc}"
            raise ArtifactError(f"{where}: the {model_cls.__name__} state {what}"[:500]) from None
        return model

    def _check_loaded(self) -> None:
        """Checks of a loaded model beyond :attr:`state_shapes` (raise :class:`ArtifactError`); override where the
        state has relations shapes cannot express."""

    #: Users whose scores a loaded model computes once, as a last check of its stored values.
    _PROBE_USERS = 8

    def _check_scores(self) -> None:
        """A loaded model's scores of its first users hold no NaN or +inf: finite stored values can still
        overflow when multiplied (vectors of 1e38 score inf; a blend weight of 1e308 too), which would rank
        nothing or everything at the top."""
        with np.errstate(over="ignore", invalid="ignore"):  # the overflow is what is looked for
            scores = self.score(np.arange(min(self.n_users_, self._PROBE_USERS)))
        if np.isnan(scores).any() or np.isposinf(scores).any():
            raise ArtifactError("its values score NaN or +inf (they overflow when combined)")


class RatingPredictor(Recommender):
    """Base class of explicit rating models: ``predict(users, items)``; ``recommend`` ranks by predicted rating."""

    predicts_ratings: ClassVar[bool] = True
    learns: ClassVar[str] = "ratings"

    def fit(self, interactions: Interactions, valid: Interactions | None = None) -> RatingPredictor:
        """Fit on interactions with ratings; returns ``self`` (``valid`` as for :meth:`Recommender.fit`)."""
        if isinstance(interactions, Interactions) and interactions.ratings is None and len(interactions):
            raise DataError(f"{type(self).__name__} predicts ratings and needs a rating column; the data has none")
        super().fit(interactions, valid)
        return self

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Predicted ratings for (user id, item id) pairs. Unknown ids get the model's fallback (see subclass)."""
        self._check_fitted()
        u = self.user_map_.to_index(np.atleast_1d(np.asarray(users)), on_unknown="keep")
        i = self.item_map_.to_index(np.atleast_1d(np.asarray(items)), on_unknown="keep")
        if len(u) != len(i):
            raise DataError(f"predict needs as many users as items, got {len(u)} and {len(i)}")
        return self.predict_indices(u, i)

    def predict_indices(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings for index pairs; ``-1`` marks an unknown user or item."""
        raise NotImplementedError


def flat_histories(histories: Any) -> tuple[np.ndarray, np.ndarray]:
    """Histories as flat ``(offsets, items)`` int64 arrays, from a list of index arrays or such a pair."""
    if isinstance(histories, tuple) and len(histories) == 2 and not np.isscalar(histories[0]):
        offsets = np.asarray(histories[0], dtype=np.int64)
        items = np.asarray(histories[1], dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(items) or (np.diff(offsets) < 0).any():
            raise DataError("history offsets must start at 0, never decrease and end at len(items)")
        return offsets, items
    parts = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return offsets, (np.concatenate(parts) if parts else np.zeros(0, np.int64))


def _feedback_offsets(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              and v >= 0 for k, v in value.items()):
        raise ArtifactError("feedback_offsets must map segment names to byte offsets (non-negative integers)")
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in model.json")
