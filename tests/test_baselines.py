"""Baselines checked against values computed by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recforge.data import Interactions
from recforge.errors import DataError, ParameterError
from recforge.models import create_model


@pytest.fixture()
def ratings() -> Interactions:
    # mean = 3; item a: +2, +0 ; item b: -2 ; user 1 rated a=5, b=1 ; user 2 rated a=3
    df = pd.DataFrame({"user_id": [1, 1, 2], "item_id": ["a", "b", "a"], "rating": [5.0, 1.0, 3.0], "timestamp": [0, 86400 * 10, 86400 * 20]})
    return Interactions.from_frame(df)


def test_most_popular_counts_and_decay(ratings: Interactions) -> None:
    pop = create_model("pop").fit(ratings)
    assert pop.popularity_.tolist() == [2.0, 1.0]
    decayed = create_model("pop", half_life_days=10).fit(ratings)
    # ages 20, 10, 0 days -> weights 1/4, 1/2, 1: a = 1/4 + 1, b = 1/2
    np.testing.assert_allclose(decayed.popularity_, [1.25, 0.5])
    with pytest.raises(ParameterError, match="half_life_days"):
        create_model("pop", half_life_days=0).fit(ratings)


def test_global_mean(ratings: Interactions) -> None:
    model = create_model("globalmean").fit(ratings)
    assert model.predict([1, 2], ["a", "b"]).tolist() == [3.0, 3.0]


def test_bias_one_round_by_hand(ratings: Interactions) -> None:
    model = create_model("bias", item_reg=1.0, user_reg=1.0, epochs=1).fit(ratings)
    # b_a = (2 + 0) / (2 + 1) = 2/3, b_b = -2 / (1 + 1) = -1
    np.testing.assert_allclose(model.item_bias_, [2 / 3, -1.0], rtol=1e-6)
    # b_1 = ((2 - 2/3) + (-2 + 1)) / (2 + 1) = 1/9, b_2 = (0 - 2/3) / (1 + 1) = -1/3
    np.testing.assert_allclose(model.user_bias_, [1 / 9, -1 / 3], rtol=1e-6)
    pred = model.predict([1, 2, 99], ["a", "b", "a"])
    np.testing.assert_allclose(pred, [3 + 1 / 9 + 2 / 3, 3 - 1 / 3 - 1, 3 + 2 / 3], rtol=1e-6)
    clamped = create_model("bias", item_reg=0.0, user_reg=0.0, epochs=5).fit(ratings).predict([1], ["a"])
    assert 1.0 <= clamped[0] <= 5.0


def test_rating_model_needs_ratings() -> None:
    df = pd.DataFrame({"user_id": [1], "item_id": [1]})
    with pytest.raises(DataError, match="needs a rating column"):
        create_model("bias").fit(Interactions.from_frame(df))
