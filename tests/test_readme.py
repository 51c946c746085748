"""The README's Python examples run as written, in order, on the embedded data, so they cannot rot. Here the data
is its first 100 users and neural models train 2 epochs (the README gives the times of the full examples)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from recforge import datasets
from recforge.data import Interactions
from recforge.experiments import trials
from recforge.models import get_model_class

README = Path(__file__).resolve().parents[1] / "README.md"
#: Models the examples train with the neural trainer: their epochs are capped in this test.
NEURAL = ("sasrec", "twotower")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_python_examples() -> None:
    assert len(python_blocks()) >= 4


def _first_users(load: Callable[..., Interactions], n_users: int) -> Callable[..., Interactions]:
    """``load``, cut to the users with the ``n_users`` smallest ids and the side data of their items."""

    def small(name: str, **options: object) -> Interactions:
        data = load(name, **options)
        frame = data.to_frame()
        frame = frame[frame["user_id"] <= n_users]
        items = None if data.item_data is None else data.item_data.reset_index()
        if items is not None:
            items = items[items[items.columns[0]].isin(frame["item_id"])]  # the id column comes first
        return Interactions.from_frame(frame, item_data=items)

    return small


def test_the_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write artifacts/ and results/ where they run
    for name in NEURAL:  # a default of 2 epochs (the examples leave epochs to early stopping)
        init = get_model_class(name).__init__
        names = init.__code__.co_varnames[:init.__code__.co_argcount]
        defaults = list(init.__defaults__)
        defaults[names.index("epochs") - (len(names) - len(defaults))] = 2
        monkeypatch.setattr(init, "__defaults__", tuple(defaults))
    small = _first_users(datasets.load, 100)  # the same code paths in a twentieth of the time
    monkeypatch.setattr(datasets, "load", small)
    monkeypatch.setattr(trials, "load", small)
    namespace: dict[str, object] = {}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
        except Exception as exc:
            raise AssertionError(f"README python block {i + 1} failed: {type(exc).__name__}: {exc}") from exc
    assert (tmp_path / "artifacts" / "pop" / "model.json").is_file()
    assert namespace["sas"].tuned_params_["epochs"] <= 2  # type: ignore[attr-defined]
