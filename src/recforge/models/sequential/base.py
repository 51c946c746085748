"""The base of every sequential model: vocabulary, training windows, the shared trainer, validation on next-item
ranking, batched inference from histories, and pickle-free artifacts.

A subclass provides a :class:`SequenceNet` (``_build_net``); the net turns a right-padded token batch into one
vector per position, scores the catalogue from a vector, and computes its training loss.
"""

from __future__ import annotations

import functools
import logging
import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from recforge.core.device import loaded_device, seed_torch, torch_threads
from recforge.core.params import Boolean, Constraint, Integer, Real, parameter_error
from recforge.core.topk import UNSCORED
from recforge.core.validation import RankingValidator
from recforge.data.interactions import Interactions
from recforge.errors import ArtifactError, DataError
from recforge.models.base import Recommender
from recforge.neural.checkpoint import load_module_state, numpy_to_state, state_to_numpy
from recforge.neural.losses import catalogue_cross_entropy
from recforge.neural.sequences import (
    TokenSequences,
    n_tokens,
    next_event_histories,
    pad_right,
    vocabulary,
    window_batches,
)
from recforge.neural.trainer import (
    MODEL_TRAINER_CONSTRAINTS,
    TRAINER_CONSTRAINTS,
    Trainer,
    TrainerConfig,
    keep_training_result,
    run_identity,
)

log = logging.getLogger(__name__)

_INFER_ROWS = 512  # histories encoded per forward pass at inference
#: The parameters every sequential model shares (subclasses add their architecture's).
SEQUENCE_CONSTRAINTS: dict[str, Constraint] = {
    **MODEL_TRAINER_CONSTRAINTS,
    "cuda_graphs": TRAINER_CONSTRAINTS["cuda_graphs"],
    "n_factors": Integer(1),
    "max_len": Integer(2),
    "batch_size": Integer(1, optional=True),
    "dropout": Real(0, 0.99),
    "valid_exclude_seen": Boolean(),
    "all_windows": Boolean(),
    "min_item_count": Integer(0),
    "num_threads": Integer(0),
}


class SequenceNet(nn.Module):
    """What a sequential model's network provides to :class:`SequentialRecommender`."""

    n_items: int

    def encode_last(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One vector per right-padded history (batch × dim) that scores the next item."""
        raise NotImplementedError

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The linear scoring layer: item vectors (n_items × dim) and item biases (or None), so that a query's
        scores are ``query @ vectors.T + biases``."""
        raise NotImplementedError

    def score_items(self, query: torch.Tensor) -> torch.Tensor:
        """Scores of every catalogue item (batch × n_items) for query vectors."""
        vectors, biases = self.output_layer()
        scores = query @ vectors.T
        return scores if biases is None else scores + biases

    def position_states(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The vector that scores the next item at every position of right-padded inputs (batch × length × dim);
        ``lengths``: how many leading positions of each row have a next event (inference's history length: a
        model that counts positions from the end counts them from the last of these)."""
        raise NotImplementedError

    def _states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every position's vector, next-item target and whether that target counts."""
        inputs, targets, mask = shifted_targets(batch["seq"], self.n_items)
        return self.position_states(inputs, (targets > 0).sum(1)), targets, mask

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of a batch ``{"seq": B × W tokens}`` of padded windows: by default the
        full-catalogue cross-entropy of the next item at every position that has one (:meth:`target_loss`)."""
        states, targets, mask = self._states(batch)
        return self.target_loss(states[mask], targets[mask])

    def target_loss(self, query: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """The loss of the real positions' vectors against their next items (tokens)."""
        return catalogue_cross_entropy(query, positives - 1, *self.output_layer())

    @property
    def has_graph_loss(self) -> bool:
        """Whether :meth:`graph_loss` computes this net's :meth:`loss` (the full-catalogue cross-entropy)."""
        return True

    def graph_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`loss`'s value computed over every position, padding masked out, instead of over the selected
        positions: its shapes never depend on the batch's contents, so a CUDA graph can record it (more rows of
        logits; on a GPU they cost less than the host waiting to learn how many rows there are)."""
        states, targets, mask = self._states(batch)
        return catalogue_cross_entropy(states.flatten(0, 1), (targets - 1).flatten(), *self.output_layer(),
                                       valid=mask.flatten())


def shifted_targets(seq: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split padded windows into inputs, next-item targets and the mask of positions that are real targets
    (not padding, not an out-of-vocabulary item)."""
    inputs, targets = seq[:, :-1], seq[:, 1:]
    mask = (targets > 0) & (targets <= n_items)
    return inputs, targets, mask


class SequentialRecommender(Recommender, metaclass=ABCMeta):
    """Base class of next-item models trained by :class:`recforge.neural.Trainer`.

    Shared hyper-parameters (subclasses add their architecture's): ``max_len`` (events of history the model
    sees), ``n_factors`` (embedding size), ``epochs``, ``batch_size`` (windows per step; ``None``: the
    model's :attr:`default_batch_size`, on every device), ``lr``,
    ``weight_decay``, ``dropout``, ``grad_clip``, ``schedule``/``warmup_steps`` (learning-rate schedule),
    ``patience`` and ``validate_every`` (early stopping on ``valid_metric`` when ``fit`` gets ``valid``; the
    number of epochs to the best validation score is kept in ``tuned_params_``),
    ``all_windows`` (train on every ``max_len`` window of long histories instead of the last one only),
    ``min_item_count`` (rarer items become one out-of-vocabulary token on input and are never targets),
    ``valid_exclude_seen`` (rank the validation event among items not in its history, like the leave-one-out
    test; set False for the next-event protocol, which keeps seen items), ``device`` ("auto" = CUDA if present),
    ``amp`` (mixed precision on GPU), ``deterministic`` (repeatable GPU training: deterministic kernels, see :class:`~recforge.neural.trainer.Trainer`),
    ``cuda_graphs`` (on a GPU, replay each training step from a CUDA graph: SASRec with the full softmax, GRU4Rec
    and pooling, at a constant learning rate; see :mod:`recforge.neural.graphs`), ``checkpoint_dir``/``resume``,
    ``seed``, ``progress``, ``num_threads``.
    """

    uses_history: ClassVar[bool] = True
    learns: ClassVar[str] = "order"
    supports_validation: ClassVar[bool] = True
    #: Epochs are chosen by early stopping on the validation part; the learning rate is searched.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {"lr": {"low": 0.0003, "high": 0.01, "log": True}}
    supports_continue: ClassVar[bool] = True
    uses_trainer: ClassVar[bool] = True
    #: ``partial_fit`` appends new events to the users' histories (the weights stay): the next recommendation
    #: conditions on them. Items added by it are unknown to the network and rank last.
    supports_partial_fit: ClassVar[bool] = True
    #: Windows per step when ``batch_size`` is None, on the CPU and on a GPU alike: SASRec's batches of 128 on a GPU
    #: lost 30-60% of ml-latest-small's validation NDCG@10 (docs/gpu.md), and one setting gives one result.
    default_batch_size: ClassVar[int] = 32
    net_: SequenceNet

    def check_params(self) -> None:
        """The constraints, and for attention models ``n_factors`` divisible by ``n_heads`` (the heads split the
        dimensions)."""
        super().check_params()
        heads = getattr(self, "n_heads", None)
        if heads and self.n_factors % heads:
            raise parameter_error(self, "n_factors", f"must be divisible by n_heads ({heads})", self.n_factors)

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def _build_net(self, n_items: int) -> SequenceNet:
        """The network for a catalogue of ``n_items`` (built again, then loaded, when an artifact is read)."""

    def _window_len(self) -> int:
        """Tokens per training window: ``max_len`` inputs plus the shifted target."""
        return self.max_len

    def _history_len(self) -> int:
        """How many of the latest events inference feeds the net."""
        return self.max_len

    # ------------------------------------------------------------------ fitting
    def _trainer_config(self) -> TrainerConfig:
        return TrainerConfig.from_model(self, metric=self.valid_metric)

    def _fit(self, interactions: Interactions, valid: Interactions | None = None) -> None:
        problem = order_problem(interactions)
        if problem:
            warn_order_problem(type(self).__name__, problem, (interactions.n_users, interactions.n_items,
                                                              len(interactions)))
        self.vocab_, _ = vocabulary(interactions, self.min_item_count)
        with torch.random.fork_rng(devices=[]):
            seed_torch(self.seed)  # the net is built on the CPU: the GPUs' generators are not the fit's business
            net = self._build_net(interactions.n_items)
        self._train(net, interactions, valid, self._trainer_config())

    def _continue_fit(self, interactions: Interactions, epochs: int) -> None:
        self._train(self.net_, interactions, None, self._trainer_config().with_epochs(epochs))

    def _train(self, net: SequenceNet, interactions: Interactions, valid: Interactions | None,
               config: TrainerConfig) -> None:
        """Train ``net`` on ``interactions`` (its tokens through ``vocab_``), validating on ``valid`` if given."""
        self.item_counts_ = np.bincount(interactions.items, minlength=interactions.n_items).astype(np.int64)
        seqs = TokenSequences.from_interactions(interactions, self.vocab_)
        self.history_ = seqs.keep_last(self._history_len())
        starts, lengths = seqs.windows(self._window_len(), self.all_windows)
        if len(starts) == 0:
            raise DataError(f"{type(self).__name__} needs at least one user with 2 or more events to learn from")
        with torch_threads(self.num_threads):  # the trainer gives the caller its random states back
            trainer = Trainer(net, config)
            validate = None
            if valid is not None and len(valid):
                validate = self._validator(interactions, valid, net, trainer.device)

            size = self.batch_size or self.default_batch_size
            graphs = trainer.can_graph and net.has_graph_loss
            # a graph replays one shape: every batch full-sized and as wide as the longest window
            width = int(lengths.max()) if graphs else None

            def batches(epoch: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
                for seq in window_batches(seqs, starts, lengths, size, rng, width=width):
                    yield {"seq": seq}

            steps = math.ceil(len(starts) / size)
            identity = run_identity(self, interactions, valid) if config.checkpoint_dir else None
            result = trainer.fit(net.graph_loss if graphs else net.loss, batches, steps, validate, graphs=graphs,
                                 identity=identity)
        self.net_ = net
        self._user_queries = None
        self.device_ = trainer.device
        keep_training_result(self, result)

    def _validator(
        self, train: Interactions, valid: Interactions, net: SequenceNet, device: torch.device, max_samples: int = 10_000
    ) -> Callable[[], dict[str, float]] | None:
        """A closure ranking each validation event (its history: the user's earlier events) over the whole
        catalogue with the test metrics' kernel; with ``valid_exclude_seen`` the history's items are excluded."""
        samples = next_event_histories(train, valid, self.vocab_, self._history_len())
        if len(samples) == 0:
            log.warning("%s: no validation event has a history; training without validation", type(self).__name__)
            return None
        targets = sp.csr_matrix((np.ones(len(samples), np.float32), samples.targets, np.arange(len(samples) + 1)),
                                shape=(len(samples), train.n_items))
        exclude = samples.history if self.valid_exclude_seen else None
        validator = RankingValidator(targets, exclude, k=10, max_rows=max_samples, seed=self.seed, device=device)

        def score(rows: np.ndarray) -> torch.Tensor:  # stays on the network's device: ranked there on a GPU
            queries = self._encode_tokens(samples.tokens[rows], samples.lengths[rows], net)
            with torch.no_grad():
                return net.score_items(queries).float()

        return lambda: validator(score)

    # ------------------------------------------------------------------ inference
    def _encode_tokens(self, tokens: np.ndarray, lengths: np.ndarray, net: SequenceNet | None = None) -> torch.Tensor:
        """Query vectors (on the network's device) for right-padded token histories, 512 at a time (``net``:
        the fitted network by default)."""
        n = len(lengths)
        net = self.net_ if net is None else net
        training = net.training
        device = next(net.parameters()).device
        net.eval()
        if tokens.shape[1] == 0:  # only empty histories: one padding column keeps the shapes valid
            tokens = np.zeros((n, 1), np.int64)
        parts = []
        with torch.no_grad(), torch_threads(self.num_threads):
            for lo in range(0, n, _INFER_ROWS):
                hi = min(n, lo + _INFER_ROWS)
                ln = np.maximum(lengths[lo:hi], 1)
                tok = np.ascontiguousarray(tokens[lo:hi, : int(ln.max())])
                parts.append(net.encode_last(torch.from_numpy(tok).to(device), torch.from_numpy(ln).to(device)))
        net.train(training)
        return torch.cat(parts) if parts else torch.zeros((0, 1), device=device)

    def _scores_from_queries(self, queries: torch.Tensor, empty: np.ndarray) -> np.ndarray:
        """Catalogue scores for query vectors (on the CPU, computed in slices on the network's device)."""
        out = np.empty((len(empty), self.n_items_), np.float32)
        for lo in range(0, len(empty), _INFER_ROWS):
            rows = slice(lo, lo + _INFER_ROWS)
            out[rows] = self._score_block(queries[rows], empty[rows]).cpu().numpy()
        return out

    def _score_block(self, queries: torch.Tensor, empty: np.ndarray) -> torch.Tensor:
        """Catalogue scores, on the queries' device, for a block of query vectors; empty histories get the training
        popularity instead, items added by partial_fit (no embedding) rank last."""
        device = queries.device
        out = torch.full((len(empty), self.n_items_), float(UNSCORED), device=device)
        with torch.no_grad(), torch_threads(self.num_threads):
            out[:, : self.net_.n_items] = self.net_.score_items(queries).float()
        if empty.any():
            popularity = np.log1p(self.item_counts_[: self.n_items_]).astype(np.float32)
            out[torch.from_numpy(empty).to(device)] = torch.from_numpy(popularity).to(device)
        return out

    def block_scorer(self, device: Any) -> Callable[[np.ndarray], Any]:
        """On the device the network is on (a GPU), blocks are scored and left there for ranking."""
        if device is None or torch.device(device).type != next(self.net_.parameters()).device.type:
            return super().block_scorer(device)
        return lambda users: self._score_block(*self._known_queries(users))

    def _score_tokens(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Scores for right-padded token histories."""
        return self._scores_from_queries(self._encode_tokens(tokens, lengths), lengths == 0)

    def _known_queries(self, users: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Query vectors of known users and which of them have an empty history."""
        # Known users' histories are fixed after fit: encode them all once and keep the query vectors, so
        # recommending (and serving) costs one matrix product per block of users.
        if getattr(self, "_user_queries", None) is None:
            every = np.arange(len(self.history_.offsets) - 1, dtype=np.int64)
            tokens, lengths = self.history_.last(every, self._history_len())
            self._user_queries = (self._encode_tokens(tokens, lengths), lengths == 0)
        queries, empty = self._user_queries
        users = np.asarray(users, dtype=np.int64)
        return queries[torch.from_numpy(users).to(queries.device)], empty[users]

    def _score(self, users: np.ndarray) -> np.ndarray:
        return self._scores_from_queries(*self._known_queries(users))

    def retrieval_vectors(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Query vectors against the output layer's item vectors (items the network knows; those added later rank
        last anyway), with two more dimensions: the item bias (query 1), and the training popularity, which
        ranks users with an empty history as :meth:`recommend` does (query 1 there, 0 elsewhere)."""
        self._check_fitted()
        with torch.no_grad():
            vectors, biases = self.net_.output_layer()
            items = vectors.float().cpu().numpy()
            bias = np.zeros(len(items), np.float32) if biases is None else biases.float().cpu().numpy()
            queries, empty = self._known_queries(users)
            queries = queries.float().cpu().numpy()
        popularity = np.log1p(self.item_counts_[: len(items)]).astype(np.float32)
        # Only the order within the popularity column matters: scaled to the item vectors' size, it does not
        # distort the index built over the item rows.
        top = float(popularity.max(initial=0.0))
        if top > 0:
            popularity *= float(np.sqrt(np.einsum("ij,ij->i", items, items).mean())) / top
        live = (~empty).astype(np.float32)[:, None]
        queries = np.hstack([queries * live, live, 1.0 - live])
        return (np.ascontiguousarray(queries, np.float32),
                np.ascontiguousarray(np.hstack([items, bias[:, None], popularity[:, None]]), np.float32))

    # ------------------------------------------------------------------ incremental updates
    def _grow(self, n_new_users: int, n_new_items: int) -> None:
        offsets = self.history_.offsets
        self.history_ = TokenSequences(self.history_.tokens, np.concatenate([offsets, np.full(n_new_users, offsets[-1])]))
        oov = self.net_.n_items + 1
        self.vocab_ = np.concatenate([self.vocab_, np.full(n_new_items, oov, self.vocab_.dtype)])
        self.item_counts_ = np.concatenate([self.item_counts_, np.zeros(n_new_items, self.item_counts_.dtype)])
        cache = getattr(self, "_user_queries", None)
        if cache is not None and n_new_users:
            queries, empty = cache
            pad = queries.new_zeros((n_new_users, queries.shape[1]))
            self._user_queries = (torch.cat([queries, pad]), np.concatenate([empty, np.ones(n_new_users, bool)]))

    def _partial_fit(self, new: Interactions) -> None:
        if self.min_item_count <= 1:
            # Without rare items in training the OOV token was never learned: items the network does not know
            # would feed it a random vector, so they stay out of the histories (they still count as seen).
            trained = self.vocab_[new.items] <= self.net_.n_items
            if not trained.all():
                np.add.at(self.item_counts_, new.items[~trained], 1)
                new = new.subset(trained)
        seq = new.sequences()
        n_users = len(self.history_.offsets) - 1
        old_len, add_len = self.history_.lengths, np.diff(seq.offsets)
        # Merge each user's kept history with its new events (in time order), keeping the last history_len.
        merged_len = old_len + add_len
        starts = np.zeros(n_users + 1, np.int64)
        np.cumsum(merged_len, out=starts[1:])
        tokens = np.empty(int(starts[-1]), np.int64)
        old_pos = np.repeat(starts[:-1], old_len) + (np.arange(len(self.history_.tokens)) - np.repeat(self.history_.offsets[:-1], old_len))
        tokens[old_pos] = self.history_.tokens
        new_pos = np.repeat(starts[:-1] + old_len, add_len) + (np.arange(len(seq.items)) - np.repeat(seq.offsets[:-1], add_len))
        tokens[new_pos] = self.vocab_[seq.items]
        self.history_ = TokenSequences(tokens, starts).keep_last(self._history_len())
        np.add.at(self.item_counts_, new.items, 1)
        changed = np.flatnonzero(add_len)
        cache = getattr(self, "_user_queries", None)
        if cache is not None and len(changed):  # re-encode only the users whose history moved
            queries, empty = cache
            toks, lengths = self.history_.last(changed, self._history_len())
            queries[torch.from_numpy(changed).to(queries.device)] = self._encode_tokens(toks, lengths)
            empty[changed] = lengths == 0

    def _score_histories(self, offsets: np.ndarray, items: np.ndarray) -> np.ndarray:
        tokens_flat = self.vocab_[items] if len(items) else np.zeros(0, np.int64)
        ends = offsets[1:]
        starts = np.maximum(offsets[:-1], ends - self._history_len())
        lengths = ends - starts
        return self._score_tokens(pad_right(tokens_flat, starts, lengths), lengths)

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {
            **state_to_numpy(self.net_.state_dict(), "net."),
            "vocab": self.vocab_,
            "item_counts": self.item_counts_,
            "history.tokens": self.history_.tokens,
            "history.offsets": self.history_.offsets,
            "net_items": int(self.net_.n_items),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.vocab_ = state["vocab"]
        self.item_counts_ = state["item_counts"]
        self.history_ = TokenSequences(state["history.tokens"], state["history.offsets"])
        net_items = state.get("net_items", len(self.vocab_))
        if not Integer(1, self.n_items_).accepts(net_items):  # partial_fit may add items after the net's
            raise ArtifactError(f"net_items is {net_items!r}; the network scores 1 to {self.n_items_} items")
        counts = self.item_counts_  # the logQ correction's shares, when the net is built
        if counts is not None and (counts.ndim != 1 or len(counts) < net_items or counts.dtype.kind not in "iu"
                                   or (counts.size and counts.min() < 0)):
            raise ArtifactError(f"item_counts must hold a count (an integer, 0 or more) for each of {net_items} "
                                "items")
        with torch.random.fork_rng(devices=[]):
            net = self._build_net(net_items)
        load_module_state(net, numpy_to_state(state, "net."))
        self.device_ = loaded_device(self.device)
        self.net_ = net.to(self.device_).eval()

    def _check_loaded(self) -> None:
        """Saved tokens index the network's embedding table: every one must lie inside it."""
        limit = n_tokens(int(self.net_.n_items))
        offsets, tokens = self.history_.offsets, self.history_.tokens
        for name, arr, length in (("vocab", self.vocab_, self.n_items_), ("history.offsets", offsets, self.n_users_ + 1)):
            if arr.ndim != 1 or len(arr) != length or arr.dtype.kind not in "iu":
                raise ArtifactError(f"{name} must hold {length} integers, got shape {arr.shape} ({arr.dtype})")
        if offsets[0] != 0 or offsets[-1] != len(tokens) or (np.diff(offsets) < 0).any():
            raise ArtifactError(f"history.offsets must start at 0, never decrease and end at {len(tokens)}")
        for name, arr in (("vocab", self.vocab_), ("history.tokens", tokens)):
            if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= limit)):
                raise ArtifactError(f"{name} holds tokens outside 0..{limit - 1}")


def order_problem(interactions: Interactions) -> str | None:
    """Why the order of each user's events cannot be trusted, or None: no timestamps (file order is taken as
    time), or most of a user's consecutive events sharing a timestamp (their order is the file's)."""
    if interactions.timestamps is None:
        return "the data has no timestamps, so the file's row order is taken as time"
    seq = interactions.sequences()
    ts = interactions.timestamps[seq.positions]
    same_user = np.repeat(np.arange(len(seq.lengths)), seq.lengths)
    pairs = same_user[1:] == same_user[:-1]
    if pairs.sum() and float((ts[1:] == ts[:-1])[pairs].mean()) > 0.5:
        return "most consecutive events of a user share a timestamp, so their order is the file's"
    return None


@functools.cache
def warn_order_problem(model: str, problem: str, data: tuple[int, ...]) -> None:
    """Say once a process per model and data (its shape) that the events' order cannot be trusted: a tuning run fits
    the same data again and again."""
    log.warning("%s learns what follows what, but %s; give a timestamp column (or use a model that ignores order: "
                "ease, als, itemknn)", model, problem)


def token_log_q(item_counts: np.ndarray | None, n_items: int) -> torch.Tensor:
    """log of every token's share of the training events (for the logQ correction); special tokens get ~0."""
    counts = np.zeros(n_tokens(n_items), np.float64)
    if item_counts is not None:
        counts[1 : n_items + 1] = item_counts[:n_items]
    return torch.from_numpy(np.log(counts / max(1.0, counts.sum()) + 1e-9).astype(np.float32))
