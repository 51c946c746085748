"""Training checkpoints read like any file from outside: every part is checked before a run resumes from it,
a checkpoint of another run is refused, and an unusable checkpoint folder is one clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from recforge import split as S
from recforge.data import Interactions
from recforge.data.io import atomic_directory
from recforge.errors import ArtifactError, ParameterError
from recforge.experiments.trials import Trial, run_trial
from recforge.models import Recommender, create_model
from recforge.neural import Trainer, TrainerConfig
from recforge.neural.checkpoint import load_checkpoint, save_checkpoint


class _Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


def _fit(folder: Path, epochs: int = 2, resume: bool = False, identity: dict | None = None,
         **config) -> Trainer:
    """Three steps an epoch towards (1, -2); checkpoints in ``folder``."""
    net = _Pair()
    target = torch.tensor([1.0, -2.0])
    trainer = Trainer(net, TrainerConfig(epochs=epochs, lr=0.05, progress=False, seed=1,
                                         checkpoint_dir=str(folder), resume=resume, **config))

    def batches(epoch: int, rng: np.random.Generator):
        for _ in range(3):
            yield {"scale": rng.integers(1, 3, size=4)}

    trainer.fit(lambda b: ((net.w - target) ** 2).sum() * b["scale"].float().mean(), batches, 3,
                identity=identity)
    return trainer


def _edit_info(folder: Path, edit, name: str = "last") -> None:
    path = folder / name / "trainer.json"
    meta = json.loads(path.read_text())
    edited = edit(meta)
    path.write_text(edited if isinstance(edited, str) else json.dumps(meta if edited is None else edited))


def _set(key: str, value):
    return lambda meta: meta["trainer"].update({key: value})


@pytest.mark.parametrize(("edit", "message"), [
    (_set("epoch", "2"), "its epoch is '2'"),
    (_set("epoch", -1), "its epoch is -1"),
    (_set("epoch", 1.5), "its epoch is 1.5"),
    (_set("epoch", True), "its epoch is True"),
    (_set("step", "4"), "its step is '4'"),
    (_set("history", "x"), "its history"),
    (_set("history", [1, 2]), "its history"),
    (_set("best", "x"), "its best is 'x'"),
    (_set("elapsed", -1e9), "its elapsed"),
    (_set("stopped", 1), "its stopped is 1"),
    (_set("epoch", 10**12), "stands at epoch 1000000000000"),
    (_set("step", 10**9), "step 1000000000"),
    (lambda meta: meta["trainer"].update(step=1, history=[], best_step=None), "epoch 2, step 1"),
    (lambda meta: meta.pop("trainer"), "'trainer' object"),
    (lambda meta: [meta], "'trainer' object"),
    (lambda meta: meta["trainer"].pop("run"), "records no run"),
    (_set("history", [{"step": 1, "epoch": 0, "loss": "x", "lr": 0.05, "seconds": 1.0}]), "its history"),
    (_set("history", [{"step": 1}]), "its history"),
    (_set("history", [{"step": 6, "epoch": 2, "loss": 1.0, "lr": 0.05, "seconds": 1.0},
                      {"step": 3, "epoch": 1, "loss": 1.0, "lr": 0.05, "seconds": 1.0}]), "its history"),
    (lambda meta: "[" * 100_000, "not a usable training checkpoint"),
    (lambda meta: meta["optimizer"]["param_groups"][0].update(params=[0, 0]), "do not list"),
    (lambda meta: meta["trainer"]["run"]["trainer"].update(lr=0.5), r"its trainer\.lr differs"),
    (lambda meta: meta["optimizer"].update(param_groups={}), "parameter-group list"),
    (lambda meta: meta["optimizer"]["param_groups"][0].update(params=["0"]), "do not list"),
    (lambda meta: meta["optimizer"]["plain"].update({"0": {"step": 10**400}}), "plain values"),
])
def test_a_malformed_checkpoint_is_one_line_naming_it(tmp_path: Path, edit, message: str) -> None:
    _fit(tmp_path, epochs=2)
    _edit_info(tmp_path, edit)
    with pytest.raises(ArtifactError, match=message) as err:
        _fit(tmp_path, epochs=4, resume=True)
    assert "\n" not in str(err.value) and str(tmp_path / "last") in str(err.value)


def _edit_tensors(folder: Path, name: str, edit) -> None:
    path = folder / "last" / name
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(("name", "edit", "message"), [
    ("model.safetensors", lambda t: t.update(w=torch.full((2,), float("nan"))), "w holds NaN or infinite"),
    ("model.safetensors", lambda t: t.update(w=torch.zeros(2, dtype=torch.int64)), "w is torch.int64"),
    ("model.safetensors", lambda t: t.update(w=torch.zeros(3)), r"w has shape \(3,\)"),
    ("model.safetensors", lambda t: t.update(v=torch.zeros(3)), "unknown v"),
    ("optimizer.safetensors", lambda t: t.update({"state.0.exp_avg": torch.zeros(42)}), "shape"),
    ("optimizer.safetensors", lambda t: t.update({"state.0.exp_avg_sq": -torch.ones(2)}), "negative"),
    ("optimizer.safetensors", lambda t: t.update({"state.0.step": torch.tensor(float("inf"))}), "NaN or infinite"),
    ("optimizer.safetensors", lambda t: t.update({"state.0.max_exp_avg_sq": torch.zeros(2)}), "no use for"),
    ("optimizer.safetensors", lambda t: t.pop("state.0.exp_avg"), "lacks"),
    # finite, but no gradients make them: the next step would blow the weights up, or freeze them
    ("optimizer.safetensors", lambda t: t.update({"state.0.exp_avg": torch.full((2,), 3e38),
                                                  "state.0.exp_avg_sq": torch.zeros(2)}), "first moment larger"),
    ("optimizer.safetensors", lambda t: t.update({"state.0.exp_avg_sq": torch.full((2,), 3.4e38)}),
     "above the clipping norm 1"),
])
def test_checkpoint_tensors_are_checked_before_they_are_loaded(tmp_path: Path, name: str, edit, message: str) -> None:
    _fit(tmp_path, epochs=2)
    _edit_tensors(tmp_path, name, edit)
    with pytest.raises(ArtifactError, match=message) as err:
        _fit(tmp_path, epochs=4, resume=True)
    assert "\n" not in str(err.value)


def test_a_checkpoint_resumes_only_its_own_run(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=2, identity={"data": "a"})
    with pytest.raises(ArtifactError, match=r"another run \(its data differs\)"):
        _fit(tmp_path, epochs=4, resume=True, identity={"data": "b"})
    with pytest.raises(ArtifactError, match=r"its trainer\.weight_decay differs"):
        _fit(tmp_path, epochs=4, resume=True, identity={"data": "a"}, weight_decay=0.1)
    assert _fit(tmp_path, epochs=4, resume=True, identity={"data": "a"}).module.w.abs().sum() > 0
    _fit(tmp_path, epochs=2, identity={"data": "b"})  # resume=False starts over there, as asked


def test_unusable_checkpoint_folders_are_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ParameterError, match="is a file, not a folder"):
        _fit(tmp_path / "file")
    with pytest.raises(ParameterError, match="cannot be used"):
        _fit(tmp_path / "file" / "below")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "linked" / "last")
    with pytest.raises(ParameterError, match="symbolic link"):
        _fit(tmp_path / "linked")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "last").write_text("not a folder")
    with pytest.raises(ArtifactError, match="not a usable training checkpoint"):
        _fit(tmp_path / "broken", resume=True)


def test_a_run_stopped_while_replacing_its_checkpoint_resumes_from_the_one_moved_aside(tmp_path: Path) -> None:
    full = _fit(tmp_path / "full", epochs=4)
    _fit(tmp_path / "ck", epochs=2)
    os.replace(tmp_path / "ck" / "last", tmp_path / "ck" / ".last.old-123-abcd")  # stopped between the renames
    resumed = _fit(tmp_path / "ck", epochs=4, resume=True)
    assert torch.equal(resumed.module.w, full.module.w)
    (tmp_path / "target" / f".x.old-{os.getpid()}").mkdir(parents=True)  # a stopped run's leftover, same pid
    (tmp_path / "target" / f".x.old-{os.getpid()}" / "f").write_text("old")
    for _ in range(2):
        with atomic_directory(tmp_path / "target" / "x") as tmp:
            (tmp / "f").write_text("new")
    assert (tmp_path / "target" / "x" / "f").read_text() == "new"


def test_a_model_resumes_only_on_the_data_and_parameters_it_was_checkpointed_with(tmp_path: Path,
                                                                                  planted: Interactions) -> None:
    params = {"max_len": 20, "n_factors": 8, "epochs": 1, "num_threads": 1, "progress": False,
              "checkpoint_dir": str(tmp_path), "resume": True}
    create_model("pooling", **params).fit(planted)
    with pytest.raises(ArtifactError, match=r"its params\.n_factors differs"):
        create_model("pooling", **{**params, "n_factors": 16}).fit(planted)
    with pytest.raises(ArtifactError, match="its train differs"):
        create_model("pooling", **params).fit(planted.subset(np.arange(len(planted) - 10)))
    more = create_model("pooling", **{**params, "epochs": 2}).fit(planted)  # more epochs: the same run, resumed
    assert len(more.training_history_) == 2


def test_optimizer_settings_come_from_the_live_optimizer(tmp_path: Path) -> None:
    net = _Pair()
    opt = torch.optim.Adam(net.parameters(), lr=0.1, weight_decay=0.5)
    net.w.sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", net, opt, {"epoch": 1})
    fresh = _Pair()
    live = torch.optim.Adam(fresh.parameters(), lr=0.01)
    load_checkpoint(tmp_path / "ck", fresh, live)
    assert live.param_groups[0]["weight_decay"] == 0.0 and live.param_groups[0]["lr"] == 0.01
    assert torch.equal(live.state[fresh.w]["exp_avg"], opt.state[net.w]["exp_avg"])


def test_every_trial_checkpoints_in_a_folder_of_its_own(tmp_path: Path, planted: Interactions) -> None:
    """A tuning trial and the refit after it train on different data: in one folder the refit would find the
    trial's checkpoint (another run's); each gets its own, so each resumes itself after a stop."""
    params = {"epochs": 1, "n_factors": 8, "max_len": 20, "num_threads": 1, "checkpoint_dir": str(tmp_path),
              "resume": True}
    split = S.leave_one_out(planted)
    for _ in range(2):  # the second time, each trial resumes its own finished run
        for part, tid in (("select", "a1"), ("test", "b2")):
            result = run_trial(Trial(tid, "pooling", "pooling", params, part, 0), [split])
            assert result.metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["select-a1", "test-b2"]


def _fit_validated(folder: Path, scores: list[float], epochs: int, resume: bool = False, patience: int = 0,
                   validated: bool = True) -> tuple[Trainer, list]:
    """:func:`_fit` with a validation that reports ``scores`` in turn; returns the trainer and its history."""
    net = _Pair()
    target = torch.tensor([1.0, -2.0])
    trainer = Trainer(net, TrainerConfig(epochs=epochs, lr=0.05, progress=False, seed=1, patience=patience,
                                         checkpoint_dir=str(folder), resume=resume))
    it = iter(scores)

    def batches(epoch: int, rng: np.random.Generator):
        for _ in range(3):
            yield {"scale": rng.integers(1, 3, size=4)}

    result = trainer.fit(lambda b: ((net.w - target) ** 2).sum() * b["scale"].float().mean(), batches, 3,
                         (lambda: {"ndcg@10": next(it)}) if validated else None)
    return trainer, result.history[["epoch", "step"]].values.tolist()


def test_a_resume_takes_only_its_own_runs_best_weights(tmp_path: Path) -> None:
    """A run without validation never writes best/: a best/ left there by an earlier run is not its best; nor is a
    best/ of a step other than the one last/ records."""
    _fit_validated(tmp_path, [0.5, 0.9], epochs=2)  # writes best/
    _fit_validated(tmp_path, [], epochs=2, validated=False)  # resume=False: another run, no best/ of its own
    uninterrupted = _fit_validated(tmp_path / "u", [], epochs=4, validated=False)[0].module.w.detach().clone()
    resumed = _fit_validated(tmp_path, [], epochs=4, resume=True, validated=False)[0]
    assert torch.equal(resumed.module.w, uninterrupted)
    _fit_validated(tmp_path / "v", [0.9, 0.5], epochs=2)  # best at epoch 1, last at epoch 2
    _edit_info(tmp_path / "v", lambda meta: meta["trainer"].update(step=6, best_step=6), name="best")
    with pytest.raises(ArtifactError, match="best weights at step 3"):
        _fit_validated(tmp_path / "v", [0.1, 0.1], epochs=4, resume=True)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda trainer: trainer.update(best=1e300), "best ndcg@10 its history does not show"),
    (lambda trainer: trainer.update(bad=1_000_000), "validations without improvement"),
    (lambda trainer: trainer.update(best_step=6, best_epoch=2, seconds_to_best=trainer["history"][1]["seconds"],
                                    best=trainer["history"][1]["valid_ndcg@10"]), "below one its history shows"),
])
def test_an_early_stopping_record_its_history_contradicts_is_refused(tmp_path: Path, edit, message: str) -> None:
    """best and bad decide when the resumed run stops and which weights it keeps: they must be its history's."""
    _fit_validated(tmp_path, [0.9, 0.5], epochs=2)
    _edit_info(tmp_path, lambda meta: edit(meta["trainer"]))
    with pytest.raises(ArtifactError, match=message):
        _fit_validated(tmp_path, [0.1, 0.1], epochs=4, resume=True)


def test_an_early_stopped_run_stays_stopped_when_resumed(tmp_path: Path) -> None:
    _, history = _fit_validated(tmp_path, [0.9, 0.5, 0.4, 0.3], epochs=6, patience=1)
    assert history == [[1, 3], [2, 6]]
    _, again = _fit_validated(tmp_path, [0.1] * 5, epochs=6, patience=1, resume=True)
    assert again == history


def test_a_decaying_learning_rate_resumes_only_with_the_same_epochs(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=2, schedule="cosine")
    with pytest.raises(ArtifactError, match="its epochs differs"):
        _fit(tmp_path, epochs=4, resume=True, schedule="cosine")


def test_the_data_fingerprint_covers_weights_and_side_data(planted: Interactions) -> None:
    import pandas as pd

    frame = planted.to_frame()
    base = Interactions.from_frame(frame)
    weighted = Interactions.from_frame(frame.assign(weight=1.5), weight_col="weight")
    items = pd.DataFrame({"item_id": planted.item_map.ids, "tags": [[i % 3] for i in range(planted.n_items)]})
    described = Interactions.from_frame(frame, item_data=items)
    prints = {base.fingerprint(), weighted.fingerprint(), described.fingerprint()}
    assert len(prints) == 3 and Interactions.from_frame(frame).fingerprint() == base.fingerprint()


def test_ensemble_members_checkpoint_each_fit_apart_and_artifacts_never_carry_their_folders(
        tmp_path: Path, planted: Interactions) -> None:
    """A score blend fits its members to tune its weights, then on all the data: each fit has its own folder (one
    would hold the other's run); a saved blend's member folders are not followed when it loads."""
    member = {"max_len": 20, "n_factors": 8, "epochs": 1, "num_threads": 1, "progress": False,
              "checkpoint_dir": str(tmp_path / "ck"), "resume": True}
    params = {"models": ["pop", "pooling"], "params": {"pooling": member}}
    for _ in range(2):  # the second fit resumes each member fit from its own folder
        blend = create_model("scoreblend", **params).fit(planted)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["pooling-refit", "pooling-tune"]
    path = blend.save(tmp_path / "blend")
    loaded = Recommender.load(path)
    assert "checkpoint_dir" not in loaded.params["pooling"] and "resume" not in loaded.params["pooling"]
    assert all(getattr(m, "checkpoint_dir", None) is None for m in loaded.members_)
