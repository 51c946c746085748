"""Ranking on a torch device (a GPU where present, the CPU through the same torch code otherwise) gives exactly the
numba kernels' results: top-k, tie-break, padding, exclusions, hits and first relevant rank."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recforge.core import device_topk
from recforge.core.accelerator import DEVICE_MIN_ROWS, device_for_rows, device_for_work
from recforge.core.ranking import rank_rows
from recforge.core.topk import mask_and_topk
from recforge.core.vectors import normalize_rows
from recforge.retrieval import ExactIndex, all_neighbors
from recforge.retrieval import index as retrieval_index

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _tied_block(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Scores with many ties (a few distinct values), some NaN and -inf, and one row with nothing selectable."""
    scores = rng.integers(0, 4, size=(n_rows, n_cols)).astype(np.float32)
    scores[rng.random((n_rows, n_cols)) < 0.05] = np.nan
    scores[rng.random((n_rows, n_cols)) < 0.05] = -np.inf
    scores[0] = -np.inf
    scores[1, 3:] = np.nan  # fewer than k selectable entries
    return scores


def _random_pattern(rng: np.random.Generator, n_rows: int, n_cols: int, density: float) -> sp.csr_matrix:
    out = sp.random(n_rows, n_cols, density=density, format="csr", random_state=rng, dtype=np.float32)
    out.data[:] = 1.0
    out.sort_indices()
    return out


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_device_topk_equals_the_numba_kernel_ties_nan_and_exclusions(device: torch.device, k: int) -> None:
    rng = np.random.default_rng(k)
    scores = _tied_block(rng, 30, 37)
    excluded = _random_pattern(rng, 30, 37, 0.2)
    want_i, want_s = mask_and_topk(scores.copy(), k, excluded.indptr, excluded.indices)
    got_i, got_s = device_topk.mask_and_topk(scores.copy(), k, device, excluded.indptr, excluded.indices)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    assert (got_i[0] == -1).all() and (got_i[1, 3:] == -1).all()


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_rank_rows_on_a_device_equals_the_cpu_kernel(device: torch.device) -> None:
    rng = np.random.default_rng(7)
    n_users, n_items = 50, 61
    scores = _tied_block(rng, n_users, n_items)
    targets = _random_pattern(rng, n_users, n_items, 0.08)
    targets = sp.csr_matrix(sp.diags((np.arange(n_users) != 2).astype(np.float32)) @ targets)  # row 2: no targets
    targets.eliminate_zeros()
    excluded = _random_pattern(rng, n_users, n_items, 0.1)
    users = np.arange(n_users)
    cpu = rank_rows(lambda rows: scores[rows], n_items, users, targets, 10, excluded, batch_size=16)
    dev = rank_rows(lambda rows: torch.from_numpy(scores[rows]).to(device), n_items, users, targets, 10, excluded,
                    batch_size=16, device=device)
    np.testing.assert_array_equal(dev.top_items, cpu.top_items)
    np.testing.assert_array_equal(dev.hits, cpu.hits)
    np.testing.assert_array_equal(dev.first_rank, cpu.first_rank)
    assert cpu.hits.any() and (cpu.first_rank > 10).any() and cpu.first_rank[2] == 0


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_exact_index_searches_on_a_device_as_on_the_cpu(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    vectors = normalize_rows(rng.normal(size=(300, 8)))
    index = ExactIndex(vectors)
    want_i, want_s = all_neighbors(index, 5)
    monkeypatch.setattr(retrieval_index, "device_for_rows", lambda n: device)
    got_i, got_s = all_neighbors(index, 5)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    assert (got_i == want_i).mean() > 0.99 and not (got_i == np.arange(300)[:, None]).any()


def test_auto_leaves_small_work_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECFORGE_DEVICE", "cuda")  # even where "auto" means the GPU
    assert device_for_work("auto", 99, 100) is None
    assert device_for_rows(DEVICE_MIN_ROWS - 1) is None
    monkeypatch.setenv("RECFORGE_DEVICE", "cpu")
    assert device_for_work("auto", 10**9, 100) is None
    assert device_for_work("cpu", 10**9, 1) is None
    if torch.cuda.is_available():  # a device named explicitly is used at any size
        assert device_for_work("cuda", 1, 100).type == "cuda"
