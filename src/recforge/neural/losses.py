"""Next-item losses over a catalogue of item embeddings.

Every function takes ``query`` (n × d, one row per prediction), ``positives`` (n item tokens, 1-based; 0 is
padding and never a target) and the item embedding table ``items`` ((n_items + 1) × d, row 0 = padding) and
returns the mean loss over the n predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("softmax", "bce", "inbatch", "logq")

#: Logits of the full-catalogue loss that exist at once (2**26 float32 = 256 MB): larger batches × catalogues are
#: computed in chunks of predictions, each recomputed in the backward pass instead of kept.
SOFTMAX_CHUNK_LOGITS = 2**26


def full_softmax(query: torch.Tensor, positives: torch.Tensor, items: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the whole catalogue (the padding row is not a class)."""
    return catalogue_cross_entropy(query, positives - 1, items[1:], None if bias is None else bias[1:])


def catalogue_cross_entropy(query: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``query @ weight.T (+ bias)`` against 0-based ``targets``, never holding more than
    :data:`SOFTMAX_CHUNK_LOGITS` logits: a 50k-item catalogue trains with the full softmax at any batch size.

    ``valid`` (boolean, one per row): only those rows count, the mean is over them. It replaces selecting the rows
    first (``query[valid]``), whose size the host must wait for: a CUDA graph cannot record that."""
    n = query.shape[0]
    if valid is not None:
        targets = targets.masked_fill(~valid, _IGNORED)
    count = n if valid is None else valid.sum().clamp(min=1)
    rows = max(1, SOFTMAX_CHUNK_LOGITS // max(weight.shape[0], 1))
    if n <= rows:
        return _cross_entropy_sum(query, targets, weight, bias) / count
    total = query.new_zeros((), dtype=torch.float32)
    for lo in range(0, n, rows):
        # no random numbers inside, so the generator's state need not be saved (a graph capture cannot read it)
        total = total + checkpoint(_cross_entropy_sum, query[lo:lo + rows], targets[lo:lo + rows], weight, bias,
                                   use_reentrant=False, preserve_rng_state=False)
    return total / count


#: The target of rows that do not count (``F.cross_entropy``'s ``ignore_index``).
_IGNORED = -100


def _cross_entropy_sum(query: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    logits = query @ weight.T
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=_IGNORED)


def bce_one_negative(query: torch.Tensor, positives: torch.Tensor, items: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary cross-entropy with one uniformly sampled negative per positive, as in the SASRec paper."""
    n_items = items.shape[0] - 1
    negatives = torch.randint(1, n_items + 1, positives.shape, device=positives.device, generator=generator)
    pos = (query * items[positives]).sum(-1)
    neg = (query * items[negatives]).sum(-1)
    logits = torch.cat([pos, neg]).float()
    target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).float()
    return F.binary_cross_entropy_with_logits(logits, target)


def in_batch_softmax(query: torch.Tensor, positives: torch.Tensor, items: torch.Tensor,
                     n_negatives: int = 256, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax whose negatives are the targets of other predictions in the batch.

    ``n_negatives`` targets are drawn from the batch (all of them when the batch has fewer). A negative that is
    the row's own positive (an accidental hit) is masked, so a popular item is never pushed away from itself.
    With ``log_q`` (log sampling probability of every item token, e.g. log of its share of training targets) the
    logits of all candidates, positive included, are corrected by ``- log Q(item)`` (Yi et al., RecSys 2019),
    which makes the sampled softmax an unbiased estimate of the full one.
    """
    n = positives.shape[0]
    pick = torch.randperm(n, device=positives.device)[: max(1, min(n_negatives, n))]
    neg_ids = positives[pick]
    pos_logit = (query * items[positives]).sum(-1, keepdim=True)
    neg_logit = query @ items[neg_ids].T
    if log_q is not None:
        pos_logit = pos_logit - log_q[positives].unsqueeze(1)
        neg_logit = neg_logit - log_q[neg_ids].unsqueeze(0)
    neg_logit = neg_logit.masked_fill(neg_ids.unsqueeze(0) == positives.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1).float()
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def next_item_loss(name: str, query: torch.Tensor, positives: torch.Tensor, items: torch.Tensor,
                   n_negatives: int = 256, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch to one of :data:`LOSSES` by name."""
    if name == "softmax":
        return full_softmax(query, positives, items)
    if name == "bce":
        return bce_one_negative(query, positives, items)
    if name == "inbatch":
        return in_batch_softmax(query, positives, items, n_negatives)
    if name == "logq":
        return in_batch_softmax(query, positives, items, n_negatives, log_q)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
