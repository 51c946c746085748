"""The kernel layer: top-k and its tie-break, the early-stopping validator against the reported metrics, seeded
random streams, sparse merging, and parameter constraints."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recforge.core.params import (
    AnyOf,
    Boolean,
    Choice,
    Integer,
    ListOf,
    Real,
    Text,
    check_params,
    translate_renamed,
)
from recforge.core.rng import rand_below, seed_states, shuffle_in_place, uniform_hash
from recforge.core.sparse import csr_from_state, csr_to_state, merge_csr, pad_csr, pattern
from recforge.core.threads import chunk_scratch
from recforge.core.topk import UNSCORED, is_unscored, mask_and_topk
from recforge.core.validation import RankingValidator
from recforge.data import Interactions
from recforge.errors import ParameterError
from recforge.evaluation import evaluate_scores


# ------------------------------------------------------------------------------------------------ top-k
def test_topk_breaks_ties_toward_the_smaller_index_and_skips_excluded() -> None:
    scores = np.array([[1.0, 3.0, 3.0, np.nan, 2.0, 3.0]], np.float32)
    idx, val = mask_and_topk(scores.copy(), 4)
    assert idx.tolist() == [[1, 2, 5, 4]] and val[0, 0] == 3.0  # NaN never selected
    idx, _ = mask_and_topk(scores.copy(), 3, np.array([0, 1]), np.array([2], np.int32))
    assert idx.tolist() == [[1, 5, 4]]
    idx, val = mask_and_topk(np.array([[1.0, -np.inf]], np.float32), 3)
    assert idx.tolist() == [[0, -1]] and val[0, 1] == -np.inf  # padded when too few items are left


@pytest.mark.parametrize("k", [1, 5, 40])
def test_topk_of_a_few_rows_equals_the_batch_kernel(k: int) -> None:
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 5, (40, 30)).astype(np.float32)  # many ties
    scores[rng.random(scores.shape) < 0.1] = np.nan
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    scores[rng.random(scores.shape) < 0.05] = np.inf
    scores[rng.random(scores.shape) < 0.05] = UNSCORED
    exclude = sp.csr_matrix(rng.random(scores.shape) < 0.3)
    batch = mask_and_topk(scores.copy(), k, exclude.indptr, exclude.indices)  # 40 rows: the numba kernel
    for r in range(len(scores)):  # one row at a time: the numpy path
        one = mask_and_topk(scores[r:r + 1].copy(), k, exclude[r].indptr, exclude[r].indices)
        np.testing.assert_array_equal(one[0][0], batch[0][r])
        np.testing.assert_array_equal(one[1][0], batch[1][r])


def test_unscored_items_still_fill_lists_but_rank_last() -> None:
    scores = np.array([[0.5, UNSCORED, -3.0]], np.float32)
    idx, _ = mask_and_topk(scores, 3)
    assert idx.tolist() == [[0, 2, 1]]
    assert is_unscored(np.array([UNSCORED, np.nan, np.inf, -1e30], np.float32)).tolist() == [True, True, True, False]
    assert np.isfinite(UNSCORED + UNSCORED)  # sums of a few stay finite


# ------------------------------------------------------------------------------------------------ validator
def test_validator_equals_the_reported_metrics_ties_included() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (30, 12)).astype(np.float32)  # many ties
    truth = sp.csr_matrix((rng.random((30, 12)) < 0.15).astype(np.float32))
    exclude = sp.csr_matrix((rng.random((30, 12)) < 0.2).astype(np.float32))
    exclude = sp.csr_matrix(exclude - exclude.multiply(truth))  # a target is never excluded
    exclude.eliminate_zeros()
    reported = evaluate_scores(scores, truth, k=10, exclude=exclude)
    validator = RankingValidator(truth, exclude, k=10)
    got = validator.of_scores(scores[validator.rows])
    for name in ("ndcg@10", "hr@10", "recall@10", "map@10", "mrr"):
        assert got[name] == pytest.approx(reported[name])


def test_validator_counts_a_tie_against_a_larger_index_target() -> None:
    # one row, target item 2 tied with item 0: the smaller index wins the tie, so the target ranks 2nd
    truth = sp.csr_matrix(np.array([[0, 0, 1, 0]], np.float32))
    got = RankingValidator(truth).of_scores(np.array([[1.0, 0.0, 1.0, 0.0]], np.float32))
    assert got["mrr"] == 0.5 and got["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_validator_samples_rows_with_targets_only() -> None:
    truth = sp.csr_matrix(np.eye(50, dtype=np.float32)[:, :10])
    validator = RankingValidator(truth, max_rows=4, seed=1)
    assert len(validator) == 4 and set(validator.rows) <= set(range(10))  # rows 10.. have no target
    again = RankingValidator(truth, max_rows=4, seed=1)
    assert validator.rows.tolist() == again.rows.tolist()


# ------------------------------------------------------------------------------------------------ rng
def test_random_streams_are_seeded_and_bounded() -> None:
    a, b = seed_states(1, 2, 4), seed_states(1, 2, 4)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 4 and not np.array_equal(a, seed_states(1, 3, 4))
    draws = [rand_below(a, 1, 7) for _ in range(2000)]
    assert min(draws) == 0 and max(draws) == 6
    order = np.arange(50)
    shuffle_in_place(order, seed_states(0, 0, 1))
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))


def test_uniform_hash_depends_on_seed_row_and_column_only() -> None:
    block = uniform_hash(3, np.array([0, 5, 9]), 100)
    assert block.dtype == np.float32 and 0 <= block.min() and block.max() < 1
    np.testing.assert_array_equal(block[1:2], uniform_hash(3, np.array([5]), 100))  # batching does not matter
    assert not np.array_equal(block, uniform_hash(4, np.array([0, 5, 9]), 100))
    assert abs(uniform_hash(0, np.arange(200), 500).mean() - 0.5) < 0.01


# ------------------------------------------------------------------------------------------------ sparse
def test_merge_csr_sum_replace_and_ones() -> None:
    old = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 2.0]], np.float32))
    new = sp.csr_matrix(np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 4.0]], np.float32))
    assert merge_csr(old, new, "sum").toarray().tolist() == [[4, 0, 0], [0, 2, 0], [0, 0, 4]]
    assert merge_csr(old, new, "replace").toarray().tolist() == [[3, 0, 0], [0, 2, 0], [0, 0, 4]]
    assert merge_csr(old, new, "ones").toarray().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # a stored rating of zero is an entry, not a hole
    zero = sp.csr_matrix((np.array([0.0], np.float32), (np.array([0]), np.array([1]))), shape=(1, 2))
    assert merge_csr(zero, sp.csr_matrix((1, 2), dtype=np.float32), "replace").nnz == 1


def test_pad_pattern_and_state_round_trip() -> None:
    mat = pattern(np.array([0, 0, 1]), np.array([1, 1, 0]), (2, 3))
    assert mat.toarray().tolist() == [[0, 1, 0], [1, 0, 0]]  # repeats count once
    grown = pad_csr(mat, 4, 5)
    assert grown.shape == (4, 5) and grown.nnz == 2
    back = csr_from_state("X", csr_to_state("X", grown), grown.shape)
    assert (back != grown).nnz == 0


# ------------------------------------------------------------------------------------------------ params
class _Model:
    """A stand-in with two constrained parameters."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)


def test_constraints_accept_describe_and_list_what_they_refuse() -> None:
    assert Integer(1).accepts(3) and not Integer(1).accepts(0) and not Integer(1).accepts(True)
    assert Real(0, strict=True).describe() == "a finite number > 0"
    assert not Real(0, 1.0).accepts(float("nan")) and Real(0, 1.0).accepts(np.float32(0.5))
    assert Choice("a", "b", optional=True).accepts(None) and not Choice("a", "b").accepts(None)
    assert ListOf(Integer(1)).accepts([1, 2]) and not ListOf(Integer(1)).accepts([1, 0])
    assert AnyOf(Choice("auto"), ListOf(Text())).accepts(["x"]) and not AnyOf(Choice("auto"), ListOf(Text())).accepts(3)
    for constraint in (Integer(1, 5), Real(0, 1.0, strict=True), Choice("x"), Boolean(), Text(), ListOf(Integer(0))):
        assert constraint.rejects() and not any(constraint.accepts(v) for v in constraint.rejects())
    with pytest.raises(ParameterError, match=r"_Model\.reg must be a finite number >= 0, got -1"):
        check_params(_Model(reg=-1), {"reg": Real(0)}, {"reg": -1})


def test_renamed_parameters_warn_and_move() -> None:
    with pytest.warns(FutureWarning, match="'iterations' is renamed 'epochs'"):
        assert translate_renamed("ALS", {"iterations": "epochs"}, {"iterations": 3}) == {"epochs": 3}
    with pytest.raises(ParameterError, match="give 'epochs' only"):
        translate_renamed("ALS", {"iterations": "epochs"}, {"iterations": 3, "epochs": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert translate_renamed("ALS", {"iterations": "epochs"}, {"epochs": 4}) == {"epochs": 4}


def test_models_accept_old_names_with_a_warning() -> None:
    from recforge.models import ALS, ItemKNN, create_model

    with pytest.warns(FutureWarning, match="'iterations' is renamed 'epochs'"):
        assert ALS(iterations=3).epochs == 3
    with pytest.warns(FutureWarning, match="'k' is renamed 'n_neighbors'"):
        assert create_model("itemknn", k=7).n_neighbors == 7
    with pytest.raises(ParameterError, match="no parameter"):
        ItemKNN().set_params(neighbours=3)
    frame = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 1]})
    with pytest.raises(ParameterError, match=r"ItemKNN\.n_neighbors must be an integer >= 1, got 0"):
        ItemKNN(n_neighbors=0).fit(Interactions.from_frame(frame))


# ------------------------------------------------------------------------------------------------ progress
def test_progress_off_a_terminal_is_plain_lines_and_every_fit_ends_with_a_summary(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from recforge.core import progress as P

    monkeypatch.setattr(P, "PLAIN_INTERVAL", 0.0)  # a line at every update
    for _ in P.progress_bar(range(3), desc="ranking", unit="user", enabled=True):
        pass
    err = capsys.readouterr().err
    assert err.splitlines() == ["ranking: 1/3 user (33%), 0 s", "ranking: 2/3 user (67%), 0 s",
                                "ranking: 3/3 user (100%), 0 s"]
    with monkeypatch.context() as clock:
        clock.setattr(P.time, "monotonic", iter(range(0, 1000, 5)).__next__)  # 5 s between two looks
        with pytest.raises(KeyError), P.progress_bar(total=4, desc="search", unit="trials", enabled=True) as bar:
            bar.update(1)
            raise KeyError("a trial failed")
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("search: stopped, 1/4 trials (25%), ")  # not "done"
    for _ in P.progress_bar(range(3), desc="silent", enabled=False):
        pass
    bar = P.EpochProgress(2, "FunkSVD", enabled=True)
    for epoch in bar:
        bar.log(1.0 / (epoch + 1))
    err = capsys.readouterr().err
    assert "silent" not in err and "\r" not in err and "\x1b[" not in err
    assert err.splitlines()[-1].startswith("FunkSVD: 2 epochs in ") and err.endswith(", final loss 0.5\n")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 8, 17, 65])
def test_chunk_scratch_buffers_are_aligned_and_apart(dtype: type, length: int) -> None:
    scratch = chunk_scratch(5, 3, length, np.empty(1, dtype))
    assert scratch.shape[:2] == (5, 3) and scratch.shape[2] >= length and scratch.dtype == dtype
    starts = np.array([scratch[c, b].ctypes.data for c in range(5) for b in range(3)])
    assert (starts % 64 == 0).all()
    assert (np.diff(starts) >= length * scratch.itemsize + 64).all()  # a gap of a cache line or more between buffers
