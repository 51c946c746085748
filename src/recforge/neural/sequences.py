"""The sequence pipeline of the neural models: item tokens, training windows and padded batches, all as flat
numpy arrays with offsets (no per-user Python lists anywhere on the hot path).

Tokens: ``0`` is padding, item index ``i`` is token ``i + 1``, ``n_items + 1`` stands for an item outside the
vocabulary (rarer than ``min_item_count``) and ``n_items + 2`` is BERT4Rec's mask token. Batches are
right-padded: real events first, so a causal model never looks at padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from recforge.data.interactions import Interactions, gather_ranges


def n_tokens(n_items: int) -> int:
    """Size of the token vocabulary for a catalogue of ``n_items``: pad, the items, OOV and MASK."""
    return n_items + 3


def pad_right(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int | None = None) -> np.ndarray:
    """Rows ``flat[starts[r] : starts[r] + lengths[r]]`` left-aligned in an int64 matrix padded with 0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max(initial=0)) if width is None else int(width)
    col = np.arange(width, dtype=np.int64)
    idx = np.asarray(starts, dtype=np.int64)[:, None] + col
    valid = col < lengths[:, None]
    out = np.zeros((len(lengths), width), dtype=np.int64)
    if len(flat):
        out[valid] = flat[idx[valid]]
    return out


@dataclass
class TokenSequences:
    """Every user's time-ordered tokens, flat: user ``u`` owns ``tokens[offsets[u]:offsets[u+1]]``."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Number of events of every user."""
        return np.diff(self.offsets)

    @classmethod
    def from_interactions(cls, inter: Interactions, vocab: np.ndarray) -> TokenSequences:
        """Tokens of ``inter``'s sequences through ``vocab`` (item index → token, see :func:`vocabulary`)."""
        seq = inter.sequences()
        return cls(vocab[seq.items].astype(np.int64), seq.offsets.astype(np.int64))

    def last(self, users: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The last ``max_len`` tokens of each user, right-padded, and their lengths."""
        users = np.asarray(users, dtype=np.int64)
        ends = self.offsets[users + 1]
        starts = np.maximum(self.offsets[users], ends - max_len)
        lengths = ends - starts
        return pad_right(self.tokens, starts, lengths), lengths

    def keep_last(self, max_len: int) -> TokenSequences:
        """Only the last ``max_len`` tokens of every user (what inference needs)."""
        ends = self.offsets[1:]
        starts = np.maximum(self.offsets[:-1], ends - max_len)
        offsets, flat = gather_ranges(starts, ends - starts)
        return TokenSequences(self.tokens[flat], offsets)

    def windows(self, max_len: int, all_windows: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Training windows: (start, length) pairs of at most ``max_len + 1`` tokens (inputs and shifted targets).

        Each user's sequence is cut from its end into consecutive windows overlapping by one event, so every
        event but the first is a target exactly once; ``all_windows=False`` keeps only the most recent window of
        each user (the SASRec paper's choice). Users with fewer than 2 events give no window.
        """
        lengths = self.lengths
        usable = np.maximum(lengths - 1, 0)  # targets per user
        per_user = -(-usable // max_len) if all_windows else np.minimum(usable, 1)
        owner = np.repeat(np.arange(len(lengths), dtype=np.int64), per_user)
        first = np.repeat(np.cumsum(per_user) - per_user, per_user)
        k = np.arange(len(owner), dtype=np.int64) - first  # 0 = the most recent window
        ends = self.offsets[owner + 1] - k * max_len
        starts = np.maximum(self.offsets[owner], ends - max_len - 1)
        return starts, ends - starts


def vocabulary(inter: Interactions, min_item_count: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Item index → token (rare items → the OOV token) and the training count of every item."""
    n_items = inter.n_items
    counts = np.bincount(inter.items, minlength=n_items).astype(np.int64)
    vocab = np.arange(1, n_items + 1, dtype=np.int64)
    if min_item_count > 1:
        vocab[counts < min_item_count] = n_items + 1
    return vocab, counts


def window_batches(
    seqs: TokenSequences, starts: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
    shuffle: bool = True, width: int | None = None,
) -> Iterator[np.ndarray]:
    """Shuffled batches of padded windows (B × (longest window in the batch)); the model splits each row into
    inputs ``[:-1]`` and targets ``[1:]``. With ``width`` every batch is ``batch_size × width``, the last one
    filled up with rows of padding (the shape a CUDA graph replays)."""
    order = rng.permutation(len(starts)) if shuffle else np.arange(len(starts))
    batch_size = min(batch_size, max(len(order), 1))  # never more rows of padding than windows (batch_size=10**30)
    for lo in range(0, len(order), batch_size):
        pick = order[lo : lo + batch_size]
        if width is None:
            yield pad_right(seqs.tokens, starts[pick], lengths[pick])
            continue
        fill = batch_size - len(pick)
        yield pad_right(seqs.tokens, np.r_[starts[pick], np.zeros(fill, np.int64)],
                        np.r_[lengths[pick], np.zeros(fill, np.int64)], width)


@dataclass
class HistorySamples:
    """Next-event samples: each with its latest ``max_len`` tokens (right-padded), their count, the target item
    index, the user index, and ``history`` (CSR, one row per sample: every earlier item of the user)."""

    tokens: np.ndarray
    lengths: np.ndarray
    targets: np.ndarray
    users: np.ndarray
    history: sp.csr_matrix

    def __len__(self) -> int:
        return len(self.targets)


def next_event_histories(train: Interactions, events: Interactions, vocab: np.ndarray, max_len: int) -> HistorySamples:
    """Every event of ``events`` as one sample whose history is all earlier events of that user in ``train`` and
    ``events`` (time order; at equal times train first). Samples without history are dropped."""
    n_tr = len(train)
    users = np.concatenate([train.users, events.users]).astype(np.int64)
    items = np.concatenate([train.items, events.items]).astype(np.int64)
    is_event = np.r_[np.zeros(n_tr, bool), np.ones(len(events), bool)]
    if train.timestamps is not None and events.timestamps is not None:
        ts = np.concatenate([train.timestamps, events.timestamps])
        order = np.lexsort((np.arange(len(users)), is_event, ts, users))
    else:
        order = np.lexsort((np.arange(len(users)), users))
    users, items, is_event = users[order], items[order], is_event[order]
    n_users = max(train.n_users, events.n_users)
    offsets = np.zeros(n_users + 1, np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=offsets[1:])
    pos = np.flatnonzero(is_event)
    owner = users[pos]
    first = offsets[owner]
    keep = pos > first
    pos, owner, first = pos[keep], owner[keep], first[keep]
    starts = np.maximum(first, pos - max_len)
    lengths = pos - starts
    indptr, flat = gather_ranges(first, pos - first)
    history = sp.csr_matrix((np.ones(len(flat), np.float32), items[flat], indptr), shape=(len(pos), train.n_items))
    history.sum_duplicates()
    return HistorySamples(pad_right(vocab[items], starts, lengths), lengths, items[pos], owner, history)
