"""Sequential models and their pipeline: tokens and windows, losses, the trainer, history scoring, protocols."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from recforge import split as S
from recforge.cli import app
from recforge.core.device import amp_dtype, deterministic_algorithms, resolve_device
from recforge.data import Interactions
from recforge.data.datasets import make_synthetic
from recforge.errors import ArtifactError, DataError, ParameterError, UnsupportedError
from recforge.evaluation import get_protocol
from recforge.evaluation import next_event as NE
from recforge.experiments import compare
from recforge.models import Recommender, create_model
from recforge.models.sequential.pooling import sums_in_fixed_order, window_sums
from recforge.neural import Trainer, TrainerConfig
from recforge.neural import losses as L
from recforge.neural.checkpoint import flatten_optimizer_state, load_checkpoint, save_checkpoint
from recforge.neural.sequences import TokenSequences, next_event_histories, pad_right, vocabulary

FAST = {"max_len": 30, "n_factors": 32, "epochs": 15, "lr": 3e-3, "batch_size": 64, "num_threads": 1,
        "progress": False}


@pytest.fixture(scope="module")
def chains() -> Interactions:
    """Strongly sequential synthetic data: most events are the successor of the previous one."""
    return make_synthetic(n_users=200, n_items=60, n_interactions=8_000, n_clusters=3, sequential_strength=0.8,
                          seed=3)


# ------------------------------------------------------------------------------------------------ pipeline
def test_pad_right_hand_example() -> None:
    flat = np.array([5, 6, 7, 8, 9])
    out = pad_right(flat, np.array([0, 3, 4]), np.array([3, 2, 0]))
    assert out.tolist() == [[5, 6, 7], [8, 9, 0], [0, 0, 0]]


def test_windows_make_every_event_but_the_first_a_target_once() -> None:
    lengths = np.array([1, 2, 5, 9, 4])
    offsets = np.r_[0, np.cumsum(lengths)]
    seqs = TokenSequences(np.arange(1, offsets[-1] + 1), offsets)
    starts, lens = seqs.windows(max_len=3)
    targets = np.concatenate([seqs.tokens[s + 1 : s + n] for s, n in zip(starts, lens)])
    expected = np.concatenate([seqs.tokens[offsets[u] + 1 : offsets[u + 1]] for u in range(len(lengths))])
    assert sorted(targets.tolist()) == sorted(expected.tolist())
    assert lens.max() <= 4 and lens.min() >= 2
    last_starts, last_lens = seqs.windows(max_len=3, all_windows=False)
    assert len(last_starts) == 4  # one per user with >= 2 events, the most recent
    assert (last_starts + last_lens == offsets[1:][lengths >= 2]).all()


def test_keep_last_and_last() -> None:
    seqs = TokenSequences(np.array([1, 2, 3, 4, 5, 6]), np.array([0, 4, 4, 6]))
    kept = seqs.keep_last(2)
    assert kept.tokens.tolist() == [3, 4, 5, 6] and kept.offsets.tolist() == [0, 2, 2, 4]
    tok, ln = seqs.last(np.array([0, 1, 2]), 3)
    assert tok.tolist() == [[2, 3, 4], [0, 0, 0], [5, 6, 0]] and ln.tolist() == [3, 0, 2]


def test_vocabulary_maps_rare_items_to_oov() -> None:
    inter = Interactions.from_frame(pd.DataFrame({"user_id": [1, 1, 2, 2, 3], "item_id": [1, 2, 1, 2, 3]}))
    vocab, counts = vocabulary(inter, min_item_count=2)
    assert counts.tolist() == [2, 2, 1] and vocab.tolist() == [1, 2, 4]  # OOV token = n_items + 1


def test_next_event_histories_use_all_earlier_events() -> None:
    df = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2], "item_id": [10, 11, 12, 13, 10, 12],
                       "timestamp": [1, 2, 5, 6, 3, 4]})
    inter = Interactions.from_frame(df)
    train = inter.subset(inter.timestamps < 4)
    events = inter.subset(inter.timestamps >= 4)
    vocab, _ = vocabulary(inter)
    s = next_event_histories(train, events, vocab, max_len=10)
    # user 1: 12 after [10, 11]; 13 after [10, 11, 12] (an earlier validation event); user 2: 12 after [10]
    got = sorted((int(o), int(t), tuple(h[:n].tolist())) for o, t, h, n in zip(s.users, s.targets, s.tokens, s.lengths))
    assert got == [(0, 2, (1, 2)), (0, 3, (1, 2, 3)), (1, 2, (1,))]
    # the full history (item indices) of each sample, also beyond the token window
    short = next_event_histories(train, events, vocab, max_len=1)
    rows = {(int(o), int(t)): sorted(short.history[r].indices.tolist()) for r, (o, t) in
            enumerate(zip(short.users, short.targets))}
    assert rows == {(0, 2): [0, 1], (0, 3): [0, 1, 2], (1, 2): [0]}
    assert short.lengths.tolist() == [1, 1, 1]


# ------------------------------------------------------------------------------------------------ losses
def test_full_softmax_is_cross_entropy_over_items() -> None:
    torch.manual_seed(0)
    items = torch.randn(6, 4)  # pad + 5 items
    q = torch.randn(3, 4)
    pos = torch.tensor([1, 5, 3])
    logits = q @ items[1:].T
    manual = -(logits.log_softmax(1)[torch.arange(3), pos - 1]).mean()
    assert torch.allclose(L.full_softmax(q, pos, items), manual)


def test_in_batch_masks_accidental_hits_and_applies_logq() -> None:
    items = torch.eye(4)  # pad, items 1..3 (one-hot embeddings)
    q = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    pos = torch.tensor([1, 2, 1])
    torch.manual_seed(0)
    got = L.in_batch_softmax(q, pos, items, n_negatives=10)
    # rows 0 and 2 (item 1) see item 2 as their only real negative; row 1 sees item 1 twice (its positive masked)
    def row(pos_logit: float, negs: list[float]) -> float:
        return -(pos_logit - math.log(sum(math.exp(x) for x in [pos_logit, *negs])))
    expected = (row(2.0, [0.0]) + row(1.0, [0.0, 0.0]) + row(2.0, [0.0])) / 3
    assert got.item() == pytest.approx(expected, rel=1e-5)
    log_q = torch.log(torch.tensor([1e-9, 0.5, 0.25, 0.25]))
    corrected = L.in_batch_softmax(q, pos, items, n_negatives=10, log_q=log_q)
    # every candidate logit is shifted by -log Q: item 1 by +log 2, item 2 by +log 4
    expected = (row(2 + math.log(2), [math.log(4)]) + row(1 + math.log(4), [math.log(2)] * 2)
                + row(2 + math.log(2), [math.log(4)])) / 3
    assert corrected.item() == pytest.approx(expected, rel=1e-5)


def test_full_softmax_in_chunks_is_the_same_loss_and_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(37, 8, generator=gen, dtype=torch.float64)
    items = torch.randn(51, 8, generator=gen, dtype=torch.float64)  # row 0: padding
    bias = torch.randn(51, generator=gen, dtype=torch.float64)
    pos = torch.randint(1, 51, (37,), generator=gen)
    reference = torch.nn.functional.cross_entropy(query @ items[1:].T + bias[1:], pos - 1)  # every logit at once

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        leaves = [t.clone().requires_grad_() for t in (query, items, bias)]
        loss = L.full_softmax(leaves[0], pos, leaves[1], leaves[2])
        loss.backward()
        return loss.item(), [t.grad for t in leaves]

    whole, whole_grads = loss_and_grads()
    monkeypatch.setattr(L, "SOFTMAX_CHUNK_LOGITS", 50 * 5)  # 5 predictions per chunk: 8 chunks
    chunked, chunked_grads = loss_and_grads()
    assert whole == pytest.approx(reference.item(), rel=1e-6) and chunked == pytest.approx(whole, rel=1e-6)
    for a, b in zip(whole_grads, chunked_grads):
        torch.testing.assert_close(a, b)


def test_bce_one_negative_rewards_separating_positive() -> None:
    items = torch.eye(3) * 5
    pos = torch.tensor([1, 1])
    good = L.bce_one_negative(torch.tensor([[0.0, 1.0, -1.0]] * 2), pos, items)
    bad = L.bce_one_negative(torch.tensor([[0.0, -1.0, 1.0]] * 2), pos, items)
    assert good < bad


# ------------------------------------------------------------------------------------------------ trainer
class _Quadratic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


def _run(cfg: TrainerConfig, scores: list[float] | None = None) -> tuple[Trainer, object, list[float]]:
    net = _Quadratic()
    seen: list[float] = []
    target = torch.tensor([1.0, -2.0])

    def loss(batch: dict) -> torch.Tensor:  # the trainer moved the module (and the batch) to its device
        return ((net.w - target.to(net.w.device)) ** 2).sum() * batch["scale"].float().mean()

    def batches(epoch: int, rng: np.random.Generator):
        for _ in range(3):
            yield {"scale": rng.integers(1, 3, size=4)}

    it = iter(scores or [])

    def validate() -> dict[str, float]:
        value = next(it, 0.0)
        seen.append(float(net.w[0]))
        return {"ndcg@10": value}

    trainer = Trainer(net, cfg)
    result = trainer.fit(loss, batches, 3, validate if scores is not None else None)
    return trainer, result, seen


def test_trainer_learns_and_restores_best_weights() -> None:
    cfg = TrainerConfig(epochs=6, lr=0.1, progress=False, patience=2)
    trainer, result, seen = _run(cfg, [0.1, 0.5, 0.4, 0.3, 0.9])
    assert result.best_epoch == 2 and result.stopped_early and result.steps == 12  # stops after 2 bad validations
    assert float(trainer.module.w[0].detach()) == pytest.approx(seen[1])  # the weights of the best validation
    assert list(result.history.columns[:5]) == ["epoch", "step", "loss", "lr", "seconds"]


def test_trainer_loss_decreases_without_validation() -> None:
    _, result, _ = _run(TrainerConfig(epochs=5, lr=0.1, progress=False))
    losses = result.history["loss"].tolist()
    assert len(losses) == 5 and losses[-1] < losses[0] / 2


def test_trainer_resume_retraces_an_uninterrupted_run(tmp_path: Path) -> None:
    full, _, _ = _run(TrainerConfig(epochs=4, lr=0.05, progress=False, seed=1))
    ckpt = str(tmp_path / "ckpt")
    _run(TrainerConfig(epochs=2, lr=0.05, progress=False, seed=1, checkpoint_dir=ckpt))
    resumed, result, _ = _run(TrainerConfig(epochs=4, lr=0.05, progress=False, seed=1, checkpoint_dir=ckpt,
                                            resume=True))
    assert torch.equal(resumed.module.w, full.module.w)
    assert result.steps == 12 and len(result.history) == 4
    assert (tmp_path / "ckpt" / "training_curves.csv").is_file() and (tmp_path / "ckpt" / "training_curves.png").is_file()
    assert not list((tmp_path / "ckpt").rglob("*.pt")) and not list((tmp_path / "ckpt").rglob("*.pkl"))


def test_deterministic_training_uses_deterministic_kernels_repeats_and_restores(chains: Interactions) -> None:
    """``deterministic=True`` switches torch to deterministic kernels while training only; a SASRec trained so
    (attention by the math kernel) repeats itself and matches the default run on the CPU to float rounding."""
    inside: list[bool] = []

    def loss_fn(batch: dict) -> torch.Tensor:
        inside.append(torch.are_deterministic_algorithms_enabled())
        return batch["x"].float().sum() * torch.zeros(1, requires_grad=True).sum()

    net = _Quadratic()
    Trainer(net, TrainerConfig(epochs=1, progress=False, deterministic=True)).fit(
        loss_fn, lambda epoch, rng: iter([{"x": np.ones(2)}]), 1)
    assert inside == [True] and not torch.are_deterministic_algorithms_enabled()
    params = {"epochs": 3, "max_len": 20, "n_factors": 16, "num_threads": 1, "progress": False}
    runs = [create_model("sasrec", **params, deterministic=d).fit(chains).score(np.arange(5)) for d in (True, True, False)]
    np.testing.assert_array_equal(runs[0], runs[1])
    if resolve_device("auto").type == "cpu":  # on a GPU the default kernels (and their rounding) differ
        np.testing.assert_allclose(runs[0], runs[2], atol=1e-4)


def test_validation_scores_in_float32_while_training_steps_in_mixed_precision() -> None:
    """Mixed precision is for the training steps: validation ranks the catalogue, and bfloat16 scores tie at the
    top (8-bit mantissas), so it scores in float32 as the fitted model does (CPU autocast stands in for CUDA's)."""
    seen: dict[str, list] = {"step": [], "valid": []}

    def loss_fn(batch: dict) -> torch.Tensor:
        seen["step"].append(torch.is_autocast_enabled("cpu"))
        return (trainer.module.w ** 2).sum()

    def validate() -> dict[str, float]:
        seen["valid"].append((torch.is_autocast_enabled("cpu"), (torch.ones(2, 2) @ torch.ones(2, 2)).dtype))
        return {"ndcg@10": 0.5}

    trainer = Trainer(_Quadratic(), TrainerConfig(epochs=2, progress=False, device="cpu"))
    trainer.amp = torch.bfloat16
    trainer.fit(loss_fn, lambda epoch, rng: iter([{"x": np.ones(2)}]), 1, validate=validate)
    assert seen["step"] == [True, True] and seen["valid"] == [(False, torch.float32)] * 2


def test_mixed_precision_is_bfloat16_from_ampere_float16_before_none_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """By the training GPU's compute capability: ``torch.cuda.is_bf16_supported()`` counts emulated bfloat16, so it
    chose bfloat16 (and no loss scaler) on a T4 or V100 too."""
    capability = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert amp_dtype(torch.device("cuda:0"), True) is torch.float16
    assert amp_dtype(torch.device("cuda:1"), True) is torch.bfloat16
    assert amp_dtype(torch.device("cuda:1"), False) is None and amp_dtype(torch.device("cpu"), True) is None


def test_a_fit_leaves_the_callers_random_state_alone(chains: Interactions) -> None:
    """The trainer seeds torch's generators each epoch (so a resumed run retraces itself) and a model seeds its net's
    initialisation; the caller's draws, on the CPU and on every GPU, go on as if nothing had trained."""
    def states() -> list[torch.Tensor]:
        return [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])]

    trainer = Trainer(_Quadratic(), TrainerConfig(epochs=2, progress=False))
    torch.manual_seed(123)
    before = states()
    trainer.fit(lambda batch: (trainer.module.w ** 2).sum() + torch.rand(1, device=trainer.device).sum() * 0,
                lambda epoch, rng: iter([{"x": np.ones(2)}]), 1)
    create_model("pooling", **{**FAST, "epochs": 1}).fit(chains)
    assert all(torch.equal(a, b) for a, b in zip(states(), before, strict=True))


def test_trainer_schedule_and_bad_settings() -> None:
    trainer = Trainer(_Quadratic(), TrainerConfig(schedule="cosine", warmup_steps=10, progress=False))
    assert trainer._lr_factor(0, 110) == pytest.approx(0.1)
    assert trainer._lr_factor(10, 110) == pytest.approx(1.0)
    assert trainer._lr_factor(60, 110) == pytest.approx(0.5)
    with pytest.raises(ParameterError, match="schedule"):
        TrainerConfig(schedule="step").check()
    with pytest.raises(ParameterError, match="epochs"):
        TrainerConfig(epochs=0).check()
    with pytest.raises(ParameterError, match="no CUDA GPU|device"):
        resolve_device("cuda") if not torch.cuda.is_available() else resolve_device("tpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_trainer_reports_a_diverging_loss() -> None:
    net = _Quadratic()
    trainer = Trainer(net, TrainerConfig(epochs=1, progress=False))
    with pytest.raises(DataError, match="loss became"):
        trainer.fit(lambda b: net.w.sum() * float("nan"), lambda e, r: iter([{}]), 1)


def test_optimizer_state_round_trips_without_pickle(tmp_path: Path) -> None:
    net = _Quadratic()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net.w.sum().backward()
    opt.step()
    _, meta = flatten_optimizer_state(opt.state_dict())
    json.dumps(meta)
    save_checkpoint(tmp_path / "ck", net, opt, {"epoch": 1})
    fresh = _Quadratic()
    again = torch.optim.Adam(fresh.parameters(), lr=0.5)
    assert load_checkpoint(tmp_path / "ck", fresh, again) == {"epoch": 1} and torch.equal(fresh.w, net.w)
    for name in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(again.state_dict()["state"][0][name], opt.state_dict()["state"][0][name])
    assert again.param_groups[0]["lr"] == 0.5  # the settings are the live optimiser's, the state the saved one


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "bert4rec"])
def test_learns_successor_chains(name: str, chains: Interactions) -> None:
    """On chain data the next item is mostly the successor of the last one: ordered models must find it."""
    # masked-item training sees each target less often than next-item training: BERT4Rec needs more epochs
    model = create_model(name, **{**FAST, "epochs": 40 if name == "bert4rec" else FAST["epochs"]}).fit(chains)
    data = chains.item_data
    succ = dict(zip(data.index, data["successor"]))
    items = list(data.index[:20])
    hits = sum(model.recommend_for_history([i], k=3, exclude_history=False)["item_id"].iloc[:3].eq(succ[i]).any()
               for i in items)
    assert hits >= 14, f"{name}: successor in the top 3 for only {hits}/20 items"


def test_a_windows_loss_does_not_depend_on_its_batch(chains: Interactions) -> None:
    """A short window's positions count from its own last target, whatever the batch's longest window: its loss
    alone equals its share of a batch with a longer one (before the fix its positions shifted by one)."""
    net = create_model("sasrec", **{**FAST, "epochs": 1, "dropout": 0.0, "device": "cpu"}).fit(chains).net_.train()
    short = torch.tensor([[3, 4, 5, 6]])
    long = torch.tensor([[7, 8, 9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        alone = [float(net.loss({"seq": row})) for row in (short, long)]
        both = float(net.loss({"seq": torch.cat([torch.nn.functional.pad(short, (0, 4)), long])}))
    assert both == pytest.approx((3 * alone[0] + 7 * alone[1]) / 10, rel=1e-5)


def test_pooling_ignores_order_and_sasrec_uses_it(chains: Interactions) -> None:
    pool = create_model("pooling", **{**FAST, "window": 0}).fit(chains)
    sas = create_model("sasrec", **FAST).fit(chains)
    hist = [0, 5, 9, 17]
    for model, same in ((pool, True), (sas, False)):
        a, b = model.score_histories([hist, hist[::-1]])
        assert np.allclose(a, b, atol=1e-5) == same


@pytest.mark.parametrize("window", [0, 1, 3, 7, 9])
def test_pooling_window_sums_banded_equal_the_cumulative_ones(window: int) -> None:
    """The banded product (what a deterministic CUDA run uses, as CUDA's float cumsum has no deterministic kernel)
    gives the windowed sums of the cumulative path, checked against a plain loop."""
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(0))
    by_loop = torch.stack([x[:, max(0, t - window + 1) if window else 0: t + 1].sum(1) for t in range(7)], dim=1)
    for banded in (False, True):
        torch.testing.assert_close(window_sums(x, window, banded), by_loop, rtol=1e-5, atol=1e-5)


def test_a_deterministic_pooling_model_sums_windows_in_a_fixed_order_on_cuda_in_scoring_too() -> None:
    """Scoring after a ``deterministic=True`` fit runs outside the fit's deterministic mode: the model's own flag
    keeps CUDA's cumsum (no deterministic kernel) out of it; the CPU keeps cumsum, deterministic anyway."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sums_in_fixed_order(cuda, True) and not sums_in_fixed_order(cuda, False)
    assert not sums_in_fixed_order(cpu, True)
    with deterministic_algorithms(True):
        assert sums_in_fixed_order(cuda, False)
    assert create_model("pooling", deterministic=True)._build_net(5).deterministic
    assert not create_model("pooling")._build_net(5).deterministic


def test_recommend_for_history_excludes_and_handles_unknown(chains: Interactions, caplog: pytest.LogCaptureFixture) -> None:
    model = create_model("sasrec", **FAST).fit(chains)
    hist = list(chains.item_map.ids[:5])
    recs = model.recommend_for_history(hist, k=10)
    assert len(recs) == 10 and not set(recs["item_id"]) & set(hist)
    assert list(recs.columns) == ["item_id", "score", "rank"] and recs["rank"].tolist() == list(range(1, 11))
    with caplog.at_level(logging.WARNING):
        with_unknown = model.recommend_for_history([*hist, 10**9], k=10)
    assert "unknown" in caplog.text.lower() or "not known" in caplog.text.lower()
    pd.testing.assert_frame_equal(with_unknown, recs)
    empty = model.recommend_for_history([], k=5)  # a brand-new session: popularity
    assert len(empty) == 5


def test_history_scoring_for_classic_models(chains: Interactions) -> None:
    pop = create_model("pop").fit(chains)
    assert np.allclose(pop.score_histories([[1, 2]])[0], pop.popularity_)
    knn = create_model("itemknn").fit(chains)
    user0 = chains.sequences()[0]
    assert np.allclose(knn.score_histories([user0])[0], knn.score(np.array([0]))[0], atol=1e-5)
    with pytest.raises(UnsupportedError, match="known users only"):
        create_model("als", n_factors=4, epochs=1, progress=False).fit(chains).score_histories([[1]])


def test_saved_model_scores_histories_identically(chains: Interactions, tmp_path: Path) -> None:
    model = create_model("bert4rec", **{**FAST, "epochs": 2}).fit(chains)
    model.save(tmp_path / "m")
    again = Recommender.load(tmp_path / "m")
    hist = [[1, 2, 3], [4], []]
    assert np.allclose(model.score_histories(hist), again.score_histories(hist), atol=1e-5)
    assert not list((tmp_path / "m").rglob("*.pkl"))
    (tmp_path / "m" / "arrays.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError):
        Recommender.load(tmp_path / "m")


def test_bad_hyper_parameters_name_the_problem(chains: Interactions) -> None:
    with pytest.raises(ParameterError, match="loss"):
        create_model("sasrec", **{**FAST, "loss": "hinge"}).fit(chains)
    with pytest.raises(ParameterError, match="divisible"):
        create_model("sasrec", **{**FAST, "n_factors": 30, "n_heads": 4}).fit(chains)
    with pytest.raises(ParameterError, match="max_len"):
        create_model("gru4rec", **{**FAST, "max_len": 1}).fit(chains)


@pytest.mark.parametrize("loss", ["bce", "inbatch", "logq"])
def test_every_sasrec_loss_learns(loss: str, chains: Interactions) -> None:
    split = S.leave_one_out(chains)
    pop = create_model("pop").fit(split.train_valid)
    model = create_model("sasrec", **{**FAST, "loss": loss}).fit(split.train_valid)
    from recforge.evaluation import evaluate

    assert evaluate(model, split.test)["ndcg@10"] > evaluate(pop, split.test)["ndcg@10"] + 0.05


def test_early_stopping_with_validation(chains: Interactions, tmp_path: Path) -> None:
    split = S.leave_one_out(chains)
    model = create_model("sasrec", **{**FAST, "epochs": 40, "patience": 2, "lr": 1e-2},
                         checkpoint_dir=str(tmp_path / "run"))
    model.fit(split.train, valid=split.valid)
    hist = model.training_history_
    assert "valid_ndcg@10" in hist.columns and model.best_score_ == pytest.approx(hist["valid_ndcg@10"].max())
    assert model.stopped_early_ and len(hist) < 40
    assert (tmp_path / "run" / "training_curves.png").is_file()


# ------------------------------------------------------------------------------------------------ protocols
@pytest.fixture()
def timeline() -> Interactions:
    return Interactions.from_frame(pd.DataFrame({
        "user_id": [1, 1, 1, 1, 2, 2, 2, 3],
        "item_id": [10, 11, 12, 13, 11, 12, 13, 10],
        "timestamp": [1, 2, 8, 9, 3, 7, 10, 9],
    }))


def test_next_event_samples_see_earlier_scored_events(timeline: Interactions) -> None:
    late = timeline.timestamps >= 8
    samples = S.next_event_samples(timeline.subset(~late), timeline.subset(late))
    hist = {(int(u), int(i)): tuple(samples.history(s).tolist())
            for s, (u, i) in enumerate(zip(samples.users, samples.items))}
    # user 3's only event has no history and is dropped; user 1's 13 sees the earlier scored event 12
    assert hist == {(0, 2): (0, 1), (0, 3): (0, 1, 2), (1, 3): (1, 2)}


def test_next_event_evaluation_scores_each_sample_from_its_history(timeline: Interactions) -> None:
    class LastItemNext(Recommender):
        """Scores item (last + 1) highest: a hand-checkable sequential model."""

        name = "lastnext"
        uses_history = True

        def _fit(self, interactions: Interactions) -> None:
            pass

        def _score_histories(self, offsets: np.ndarray, items: np.ndarray) -> np.ndarray:
            out = np.zeros((len(offsets) - 1, self.n_items_), np.float32)
            last = items[offsets[1:] - 1]
            out[np.arange(len(last)), np.minimum(last + 1, self.n_items_ - 1)] = 1.0
            return out

    late = timeline.timestamps >= 8
    train, scored = timeline.subset(~late), timeline.subset(late)
    result = get_protocol("next-event").evaluate(LastItemNext().fit(train), train, scored, k=[1, 5])
    assert result["hr@1"] == 1.0 and result["dcg@1"] == 1.0 and result["samples"] == 3


def test_next_event_split_cuts(chains: Interactions) -> None:
    split = NE.next_event_split(chains, core=5)
    assert split.train.timestamps.max() < split.valid.timestamps.min() <= split.valid.timestamps.max()
    assert split.valid.timestamps.max() < split.test.timestamps.min()
    samples = S.next_event_samples(split.train_valid, split.test)
    assert 0 < len(samples) <= len(split.test) and (samples.positions > 0).all()


def test_sequence_windows_cut_from_the_end() -> None:
    df = pd.DataFrame({"user_id": [1] * 23 + [2] * 5, "item_id": list(range(23)) + list(range(5)),
                       "timestamp": list(range(28))})
    inter = Interactions.from_frame(df)
    split = NE.sequence_mrr_split(inter, test_users=0.5, seed=0)
    win = NE.cut_windows(split.test, window=10)
    held_user = 0 if len(split.train.to_frame().query("user_id == 1")) == 0 else 1
    lens = np.diff(win.offsets).tolist()
    assert lens == ([10, 10, 3] if held_user == 0 else [5])
    if held_user == 0:
        assert win.items[: 10].tolist() == list(range(13, 23))  # the most recent window first


def test_sequence_mrr_by_hand() -> None:
    df = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 2, 2, 3, 3], "item_id": [1, 1, 2, 3, 3, 3, 1, 2, 3],
                       "timestamp": range(9)})
    inter = Interactions.from_frame(df)
    split = NE.sequence_mrr_split(inter, test_users=1 / 3, seed=1)
    win = NE.cut_windows(split.test)
    pop = create_model("pop").fit(split.train)
    res = NE.evaluate_windows(pop, win)
    pop_rank = np.argsort(-pop.popularity_, kind="stable")
    targets = win.items[win.offsets[1:] - 1]
    expected = np.mean([1 / (1 + np.flatnonzero(pop_rank == t)[0]) for t in targets])
    assert res["mrr"] == pytest.approx(expected)


def test_cli_next_event_on_files(tmp_path: Path, chains: Interactions) -> None:
    df = chains.to_frame()
    cut1, cut2 = np.quantile(df["timestamp"], [0.8, 0.9])
    df[df.timestamp < cut1].to_csv(tmp_path / "train.csv", index=False)
    df[(df.timestamp >= cut1) & (df.timestamp < cut2)].to_csv(tmp_path / "valid.csv", index=False)
    df[df.timestamp >= cut2].to_csv(tmp_path / "test.csv", index=False)
    runner = CliRunner()
    args = ["evaluate", "--protocol", "next-event", "--train", str(tmp_path / "train.csv"), "--test",
            str(tmp_path / "test.csv"), "--json"]
    out = runner.invoke(app, [*args, "--model", "pop"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)  # progress goes to stderr, also with --json
    for key in ("hr@5", "hr@10", "hr@20", "dcg@5", "dcg@10", "dcg@20", "coverage@10", "fit_seconds"):
        assert key in res
    assert res["hr@5"] <= res["hr@10"] <= res["hr@20"]
    sas = runner.invoke(app, [*args, "--valid", str(tmp_path / "valid.csv"), "--model", "sasrec",
                              "--set", "epochs=8", "--set", "max_len=30", "--set", "num_threads=1", "--no-tune"])
    assert sas.exit_code == 0, sas.output
    assert json.loads(sas.stdout)["dcg@10"] > res["dcg@10"]


def test_compare_on_next_item_protocols(chains: Interactions) -> None:
    res = compare(chains, {"pop": {"name": "pop"}, "sasrec": {"name": "sasrec", "params": FAST}},
                  protocol="next-event", progress=False)
    table = res.leaderboard
    assert table.iloc[0]["model"] == "sasrec" and "dcg@10" in table.columns and "hr@20" in table.columns
    assert res.params["sasrec"]["epochs"] <= FAST["epochs"]  # early-stopped on validation, then refitted
    res = compare(chains, ["pop", "als"], protocol="sequence-mrr", progress=False)
    assert list(res.results) == ["pop"] and "als" in res.skipped  # als cannot score a session: skipped


def test_partial_fit_appends_history_without_touching_weights(planted, tmp_path) -> None:
    """New events extend the histories: recommending afterwards equals scoring the whole history as a session."""
    model = create_model("sasrec", max_len=20, n_factors=16, epochs=2, num_threads=1, progress=False).fit(planted)
    weights = {k: v.clone() for k, v in model.net_.state_dict().items()}
    model.score(np.arange(3))  # fill the query cache: partial_fit must refresh the touched users only
    user = planted.user_map.ids[5]
    extra = planted.item_map.ids[[3, 7, 11]]
    ts = planted.timestamps.max() + np.arange(1, 4)
    model.partial_fit(pd.DataFrame({"user_id": [user] * 3 + [10**6], "item_id": [*extra, 10**7],
                                    "timestamp": [*ts, ts[-1]]}))
    for key, value in model.net_.state_dict().items():
        assert torch.equal(value, weights[key])
    frame = planted.to_frame()
    history = [*frame.sort_values(["timestamp"], kind="stable").query("user_id == @user")["item_id"], *extra]
    expected = model.recommend_for_history(history, k=10, exclude_history=False)["item_id"].tolist()
    got = model.recommend([user], k=10, exclude_seen=False)["item_id"].tolist()
    assert got == expected
    assert model.score(model.user_map_.to_index([10**6])).shape == (1, model.n_items_)
    assert model.score(np.arange(2))[:, -1].max() < -1e30  # the new item is unknown to the network: last
    loaded = Recommender.load(model.save(tmp_path / "m"))
    assert loaded.recommend([user], k=10, exclude_seen=False)["item_id"].tolist() == got


def test_order_models_say_when_the_data_has_no_trustworthy_order() -> None:
    from recforge.models.sequential.base import order_problem

    frame = make_synthetic(n_users=30, n_items=20, n_interactions=300, seed=1).to_frame()
    assert order_problem(Interactions.from_frame(frame)) is None
    assert "no timestamps" in order_problem(Interactions.from_frame(frame.drop(columns="timestamp")))
    flat = frame.assign(timestamp=frame["user_id"] * 10)  # one timestamp per user: only the file's order
    assert "share a timestamp" in order_problem(Interactions.from_frame(flat))


def test_a_sequential_fit_on_data_without_timestamps_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """Once a process per model and data: a tuning run fits the same data for every trial."""
    from recforge.models.sequential.base import warn_order_problem

    warn_order_problem.cache_clear()
    frame = make_synthetic(n_users=30, n_items=20, n_interactions=300, seed=1).to_frame().drop(columns="timestamp")
    data = Interactions.from_frame(frame)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            create_model("pooling", epochs=1, progress=False, num_threads=1).fit(data)
    assert caplog.text.count("file's row order is taken as time") == 1 and "give a timestamp column" in caplog.text
    with caplog.at_level(logging.WARNING):
        create_model("pooling", epochs=1, progress=False, num_threads=1).fit(Interactions.from_frame(frame[:-5]))
    assert caplog.text.count("file's row order is taken as time") == 2  # other data: said again


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_sasrec_batches_are_the_same_on_every_device(planted: Interactions, device: str) -> None:
    # batch_size=None: 32 windows per step on the CPU and on a GPU; one window per user here (300 users)
    model = create_model("sasrec", epochs=1, max_len=20, n_factors=16, all_windows=False, device=device,
                         progress=False).fit(planted)
    assert model.batch_size is None
    assert model.training_history_["step"].iloc[-1] == math.ceil(planted.n_users / 32)
    fixed = create_model("sasrec", epochs=1, max_len=20, n_factors=16, all_windows=False, batch_size=100,
                         device=device, progress=False).fit(planted)
    assert fixed.training_history_["step"].iloc[-1] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_gru4rec_runs_its_gru_in_float32_under_autocast(chains: Interactions) -> None:
    """Under autocast cuDNN's GRU would run in float16 whatever the autocast type (bfloat16 included), without a
    loss scaler: the net keeps it in float32."""
    net = create_model("gru4rec", **{**FAST, "epochs": 1, "device": "cuda"}).fit(chains).net_
    tokens = torch.tensor([[3, 4, 5, 0]], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert net.hidden(tokens).dtype == torch.float32
