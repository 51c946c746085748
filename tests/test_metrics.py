"""Every metric against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from recforge.core import metrics as M
from recforge.errors import DataError

HITS = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=bool)
N_REL = np.array([2, 1, 3])
LOG3 = 1 / np.log2(3)  # discount at rank 2


def test_hit_rate_precision_recall() -> None:
    assert M.hit_rate(HITS, 5).tolist() == [1, 0, 1]
    assert M.hit_rate(HITS, 1).tolist() == [1, 0, 0]
    np.testing.assert_allclose(M.precision(HITS, 5), [0.4, 0.0, 0.2])
    np.testing.assert_allclose(M.precision(HITS, 2), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(M.recall(HITS, N_REL, 5), [1.0, 0.0, 1 / 3])
    np.testing.assert_allclose(M.recall(HITS, N_REL, 1), [0.5, 0.0, 0.0])


def test_dcg_ndcg() -> None:
    # user 0: hits at ranks 1 and 3 -> 1/log2(2) + 1/log2(4) = 1.5; ideal with 2 relevant = 1 + 1/log2(3)
    np.testing.assert_allclose(M.dcg(HITS, 5), [1.5, 0.0, LOG3])
    np.testing.assert_allclose(M.ndcg(HITS, N_REL, 5), [1.5 / (1 + LOG3), 0.0, LOG3 / (1 + LOG3 + 0.5)])
    # at k=2 user 2 has three relevant items but only two slots: the ideal is 1 + 1/log2(3)
    np.testing.assert_allclose(M.ndcg(HITS, N_REL, 2), [1 / (1 + LOG3), 0.0, LOG3 / (1 + LOG3)])
    np.testing.assert_allclose(M.ndcg(np.ones((1, 3), bool), [3], 3), [1.0])


def test_average_precision() -> None:
    # user 0: precision 1/1 at rank 1 and 2/3 at rank 3, over min(2, 5) relevant; user 2: 1/2 over 3
    np.testing.assert_allclose(M.average_precision(HITS, N_REL, 5), [(1 + 2 / 3) / 2, 0.0, 0.5 / 3])
    np.testing.assert_allclose(M.average_precision(HITS, N_REL, 2), [1 / 2, 0.0, 0.5 / 2])


def test_reciprocal_rank() -> None:
    first = np.array([1, 12, 2, 0])
    np.testing.assert_allclose(M.reciprocal_rank(first), [1.0, 1 / 12, 0.5, 0.0])
    np.testing.assert_allclose(M.reciprocal_rank(first, k=5), [1.0, 0.0, 0.5, 0.0])


def test_coverage_ignores_padding() -> None:
    top = np.array([[0, 1, 2], [1, 2, -1]])
    assert M.coverage(top, 3, 10) == pytest.approx(0.3)
    assert M.coverage(top, 1, 10) == pytest.approx(0.2)


def test_rating_errors() -> None:
    assert M.rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(np.sqrt(4 / 3))
    assert M.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    with pytest.raises(DataError):
        M.rmse([1, 2], [1])
    with pytest.raises(DataError):
        M.mae([], [])


def test_bad_k() -> None:
    with pytest.raises(DataError):
        M.hit_rate(HITS, 0)
    with pytest.raises(DataError, match="exceeds"):
        M.precision(HITS, 6)


def test_per_user_metrics_keys() -> None:
    out = M.per_user_metrics(HITS, N_REL, np.array([1, 0, 2]), [1, 5])
    assert {"hr@1", "ndcg@5", "map@5", "mrr@1", "mrr"} <= set(out)
    np.testing.assert_allclose(out["mrr"], [1, 0, 0.5])
