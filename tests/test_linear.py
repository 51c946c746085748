"""EASE: the closed form against a float64 reference, its properties, limits and incremental updates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import ndcg_of

from recforge import split as S
from recforge.data import Interactions
from recforge.errors import DataError
from recforge.models import MostPopular, Recommender, create_model, linear
from recforge.models.linear import EASE, ease_weights, ease_weights_torch


def reference_b(x: np.ndarray, reg: float) -> np.ndarray:
    """Steck's closed form in float64 with a plain inverse."""
    p = np.linalg.inv(x.T @ x + reg * np.eye(x.shape[1]))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


@pytest.fixture()
def small() -> Interactions:
    frame = pd.DataFrame(
        {
            "user_id": [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4],
            "item_id": [0, 1, 2, 0, 3, 1, 2, 3, 0, 2, 0, 1, 3, 4],
        }
    )
    return Interactions.from_frame(frame)


def test_closed_form_matches_float64_inverse(small: Interactions) -> None:
    model = EASE(reg=2.0).fit(small)
    x = small.csr("ones").toarray().astype(np.float64)
    np.testing.assert_allclose(model.weights_, reference_b(x, 2.0), atol=1e-6)
    assert model.weights_.dtype == np.float32 and model.weights_.flags.c_contiguous


def test_diagonal_is_zero_and_scores_are_x_times_b(small: Interactions) -> None:
    model = EASE(reg=1.0).fit(small)
    assert np.all(np.diag(model.weights_) == 0.0)
    x = small.csr("ones").toarray()
    np.testing.assert_allclose(model.score(np.arange(5)), x @ model.weights_, rtol=1e-5, atol=1e-6)


def test_several_tiles_and_weighted_values() -> None:
    """A catalogue wider than the 64-item tiles of the in-place kernel, with counts as values."""
    rng = np.random.default_rng(3)
    x = sp.random(120, 150, density=0.08, random_state=rng, format="csr", dtype=np.float32)
    x.data = np.ceil(x.data * 3).astype(np.float32)  # counts 1..3
    b = ease_weights(x, x.T.tocsr(), 7.5)
    np.testing.assert_allclose(b, reference_b(x.toarray().astype(np.float64), 7.5), atol=2e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_the_torch_path_is_the_same_closed_form(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path (run here on ``device``), with the Gram matrix built over several chunks of user rows."""
    rng = np.random.default_rng(4)
    x = sp.random(130, 90, density=0.1, random_state=rng, format="csr", dtype=np.float32)
    monkeypatch.setattr(linear, "_GRAM_CHUNK_BYTES", 4 * 90 * 40)  # 40 users per chunk: 4 chunks
    b = ease_weights_torch(x, 5.0, torch.device(device))
    assert b.dtype == np.float32 and b.flags.c_contiguous and np.all(np.diag(b) == 0)
    np.testing.assert_allclose(b, reference_b(x.toarray().astype(np.float64), 5.0), atol=2e-5)
    np.testing.assert_allclose(b, ease_weights(x, x.T.tocsr(), 5.0), atol=2e-5)
    assert linear.ease_gpu_bytes(50_000) == 12 * 50_000**2 + linear._GRAM_CHUNK_BYTES  # 31 GB for 50k items
    if device == "cuda":  # the estimate holds the peak (the inverse: factor, result and cuSOLVER's working copy)
        x = sp.random(2500, 2000, density=0.05, random_state=rng, format="csr", dtype=np.float32)
        monkeypatch.setattr(linear, "_GRAM_CHUNK_BYTES", 2**22)  # slack of 4 MB over 12·n² = 48 MB (8·n² + 4 MB < peak)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ease_weights_torch(x, 5.0, torch.device(device))
        assert torch.cuda.max_memory_allocated() - before <= linear.ease_gpu_bytes(2000)


def test_a_gpu_fit_that_does_not_fit_is_refused_counting_torchs_cached_memory(small: Interactions,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Free memory is what CUDA reports plus what torch's allocator caches unused (CUDA counts it as taken)."""
    gb = 10**9
    monkeypatch.setattr(linear, "resolve_device", lambda device: torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(0.2 * gb), 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: int(0.5 * gb))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: int(0.1 * gb))
    with pytest.raises(DataError, match=r"needs about 1\.1 GB for 5 items but 0\.6 GB are free"):
        EASE().fit(small)


def test_count_values_use_repeated_interactions() -> None:
    frame = pd.DataFrame({"user_id": [0, 0, 0, 1, 1, 2], "item_id": [0, 0, 1, 1, 2, 0]})
    inter = Interactions.from_frame(frame)
    counts = EASE(reg=1.0, values="count").fit(inter)
    binary = EASE(reg=1.0).fit(inter)
    x_counts = np.array([[2, 1, 0], [0, 1, 1], [1, 0, 0]], np.float64)
    np.testing.assert_allclose(counts.weights_, reference_b(x_counts, 1.0), atol=1e-6)
    np.testing.assert_allclose(binary.weights_, reference_b(np.minimum(x_counts, 1), 1.0), atol=1e-6)


def test_max_items_refuses_with_a_clear_message(small: Interactions) -> None:
    # the CPU's cap (on a GPU the device's free memory is the limit)
    with pytest.raises(DataError, match=r"5 x 5 float32.*max_items=4.*min_item_count.*als"):
        EASE(max_items=4, device="cpu").fit(small)
    EASE(max_items=None, device="cpu").fit(small)  # no limit
    EASE(max_items=5, device="cpu").fit(small)


def test_learns_planted_structure(planted: Interactions) -> None:
    loo = S.leave_one_out(planted)
    ours = ndcg_of(create_model("ease"), loo.train_valid, loo.test)
    pop = ndcg_of(MostPopular(), loo.train_valid, loo.test)
    assert ours > 1.5 * pop


def test_partial_fit_new_user_and_new_item(small: Interactions, tmp_path) -> None:
    model = EASE(reg=1.0).fit(small)
    b_before = model.weights_.copy()
    events = pd.DataFrame({"user_id": [9, 9, 0], "item_id": [0, 2, 99]})
    model.partial_fit(events)
    assert model.weights_.shape == (6, 6)
    np.testing.assert_array_equal(model.weights_[:5, :5], b_before)  # no refit
    assert not model.weights_[5].any() and not model.weights_[:, 5].any()
    new_user = model.user_map_.to_index(np.array([9]))[0]
    scores = model.score(np.array([new_user]))[0]
    expected = b_before[0] + b_before[2]  # history {0, 2} times B
    np.testing.assert_allclose(scores[:5], expected, rtol=1e-5, atol=1e-6)
    assert scores[5] < scores[:5].min()  # the new item ranks last until a refit
    recs = model.recommend([9], k=6)
    assert list(recs["item_id"])[-1] == 99
    loaded = Recommender.load(model.save(tmp_path / "ease"))
    np.testing.assert_array_equal(loaded.score(np.arange(6)), model.score(np.arange(6)))
