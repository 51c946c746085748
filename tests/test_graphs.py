"""Training steps replayed from CUDA graphs: the static-shape losses and batches they need, the replay logic (run on
the CPU through a stand-in for the CUDA calls), and, on a GPU, the real thing."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from recforge.data import Interactions
from recforge.data.datasets import make_synthetic
from recforge.errors import UnsupportedError
from recforge.models import create_model
from recforge.models.sequential.base import SequentialRecommender
from recforge.neural import graphs as G
from recforge.neural import losses as L
from recforge.neural.checkpoint import load_checkpoint, save_checkpoint
from recforge.neural.sequences import TokenSequences, window_batches
from recforge.neural.trainer import Trainer, TrainerConfig

# on the CPU even where a GPU is present: these check shapes and the replay logic to float32 rounding (the CUDA
# tests below say device="cuda")
SMALL = {"max_len": 12, "n_factors": 16, "epochs": 4, "batch_size": 16, "num_threads": 1, "progress": False,
         "lr": 3e-3, "device": "cpu"}


@pytest.fixture(scope="module")
def chains() -> Interactions:
    return make_synthetic(n_users=120, n_items=40, n_interactions=3_000, n_clusters=3, sequential_strength=0.8,
                          seed=5)


class FakeGraphs:
    """The CUDA calls of :class:`GraphedStep` on the CPU: a capture records nothing and runs nothing (as a real
    one); a replay runs the recorded step again on the static inputs and writes its loss into the captured tensor."""

    streams = 0
    captures = 0
    fail = False
    invalid = False

    def __init__(self, device: torch.device) -> None:
        pass

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        FakeGraphs.streams += 1
        yield

    def capture(self, run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        FakeGraphs.captures += 1
        if FakeGraphs.invalid:
            raise G.CaptureInvalidated("operation not permitted when stream is capturing")
        if FakeGraphs.fail:
            raise RuntimeError("the step raised, the capture ended cleanly")
        loss = torch.zeros(())
        return lambda: loss.copy_(run().detach()), loss


@pytest.fixture()
def fake_graphs(monkeypatch: pytest.MonkeyPatch) -> type[FakeGraphs]:
    """Trainers replay their steps through :class:`FakeGraphs` wherever a GPU would use CUDA graphs."""
    FakeGraphs.streams, FakeGraphs.captures, FakeGraphs.fail, FakeGraphs.invalid = 0, 0, False, False
    monkeypatch.setattr(G, "CudaGraphs", FakeGraphs)
    monkeypatch.setattr(Trainer, "can_graph", property(lambda self: self.config.cuda_graphs))
    return FakeGraphs


def _batch(model: SequentialRecommender, data: Interactions, width: int | None, size: int = 16) -> torch.Tensor:
    seqs = TokenSequences.from_interactions(data, model.vocab_)
    starts, lengths = seqs.windows(model.max_len, True)
    rng = np.random.default_rng(0)
    batches = list(window_batches(seqs, starts, lengths, size, rng, width=width))
    return torch.from_numpy(batches[-1])


@pytest.mark.parametrize(("name", "rare", "chunked"), [("sasrec", 0, False), ("gru4rec", 0, False),
                                                     ("pooling", 0, False), ("sasrec", 80, True)])
def test_graph_loss_is_the_loss_at_any_padding(name: str, rare: int, chunked: bool, chains: Interactions,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph's loss over every position (padding masked) equals the loss over the selected target positions,
    value and gradients, also with extra padding columns and rows of padding (an epoch's last batch), with
    out-of-vocabulary tokens (never targets) and in chunks of the catalogue's logits."""
    model = create_model(name, **{**SMALL, "epochs": 1, "dropout": 0.0, "min_item_count": rare}).fit(chains)
    if rare:
        assert (model.vocab_ == model.net_.n_items + 1).any()
    if chunked:
        monkeypatch.setattr(L, "SOFTMAX_CHUNK_LOGITS", 40 * 7)
    net = model.net_.train()
    tight = _batch(model, chains, None, size=50)
    padded = torch.zeros((64, tight.shape[1] + 7), dtype=tight.dtype)
    padded[: len(tight), : tight.shape[1]] = tight
    assert net.has_graph_loss
    values, grads = [], []
    for loss_fn, batch in ((net.loss, tight), (net.graph_loss, padded)):
        net.zero_grad()
        loss = loss_fn({"seq": batch})
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_only_the_full_softmax_has_a_graph_loss(chains: Interactions) -> None:
    assert not create_model("sasrec", **SMALL, loss="bce").fit(chains).net_.has_graph_loss
    assert not create_model("bert4rec", **{**SMALL, "epochs": 1}).fit(chains).net_.has_graph_loss
    # dropout between GRU layers draws from cuDNN's own random state, which a graph would freeze
    assert not create_model("gru4rec", **{**SMALL, "epochs": 1}, n_layers=2).fit(chains).net_.has_graph_loss


def test_batches_of_one_shape_hold_the_same_windows() -> None:
    seqs = TokenSequences(np.arange(1, 24, dtype=np.int64), np.array([0, 5, 6, 15, 23]))
    starts, lengths = seqs.windows(4, True)
    loose = list(window_batches(seqs, starts, lengths, 3, np.random.default_rng(1)))
    fixed = list(window_batches(seqs, starts, lengths, 3, np.random.default_rng(1), width=5))
    assert len(loose) == len(fixed) and all(b.shape == (3, 5) for b in fixed)
    for a, b in zip(loose, fixed):
        np.testing.assert_array_equal(b[: len(a), : a.shape[1]], a)
        assert not b[len(a):].any() and not b[:, a.shape[1]:].any()
    # a batch size beyond the data's windows is one batch of them all, not rows of padding by the billion
    (huge,) = window_batches(seqs, starts, lengths, 10**30, np.random.default_rng(1), width=5)
    assert huge.shape == (len(starts), 5)


def test_graphed_step_warms_up_captures_replays_and_falls_back(fake_graphs: type[FakeGraphs],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Three eager warm-up steps on the side stream, then one capture, prepared just before; replays copy each
    batch into the captured inputs; another shape runs eagerly; a capture that fails in Python warns once and
    leaves every later step eager; one that CUDA invalidated is an error naming the way out."""
    seen: list[float] = []
    prepared: list[int] = []

    def step(batch: dict) -> torch.Tensor:
        seen.append(float(batch["x"].sum()))
        return batch["x"].sum()

    graphed = G.GraphedStep(step, torch.device("cpu"), lambda: prepared.append(fake_graphs.captures))
    losses = [float(graphed({"x": torch.full((2,), float(i))})) for i in range(6)]
    assert losses == [0, 2, 4, 6, 8, 10] and seen == losses  # the capture ran nothing, each replay its batch
    assert fake_graphs.streams == 3 and graphed.replay is not None
    assert prepared == [0] and fake_graphs.captures == 1
    assert float(graphed({"x": torch.ones(3)})) == 3  # another shape: eager
    assert float(graphed({"x": torch.full((2,), 7.0)})) == 14  # and the graph still replays

    fake_graphs.fail = True
    failing = G.GraphedStep(step, torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        out = [float(failing({"x": torch.full((2,), float(i))})) for i in range(6)]
    assert out == [0, 2, 4, 6, 8, 10] and failing.failed
    assert caplog.text.count("CUDA graph capture of the training step failed") == 1

    fake_graphs.invalid = True
    invalidated = G.GraphedStep(step, torch.device("cpu"))
    for i in range(3):
        invalidated({"x": torch.ones(2)})
    with pytest.raises(UnsupportedError, match="cuda_graphs=False"):
        invalidated({"x": torch.ones(2)})


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_graphed_fit_trains_as_its_eager_steps(fake_graphs: type[FakeGraphs], chains: Interactions,
                                                 dropout: float) -> None:
    """SASRec through the replay logic (stand-in graphs on the CPU) equals the same steps run eagerly, bit for bit,
    dropout included; against the ordinary CPU fit (tight batches, selected positions) the losses agree to
    rounding when there is no dropout (its masks are drawn for other shapes)."""
    params = {**SMALL, "dropout": dropout}
    graphed = create_model("sasrec", **params).fit(chains)
    assert fake_graphs.streams == 3
    fake_graphs.fail = True
    eager = create_model("sasrec", **params).fit(chains)
    for a, b in zip(graphed.net_.parameters(), eager.net_.parameters()):
        assert torch.equal(a, b)
    assert graphed.loss_history_ == eager.loss_history_  # each replay's loss counted, not the last one twice
    plain = create_model("sasrec", **params, cuda_graphs=False).fit(chains)
    if dropout == 0.0:
        np.testing.assert_allclose(graphed.loss_history_, plain.loss_history_, rtol=1e-5)
    assert plain.loss_history_[-1] < plain.loss_history_[0] and graphed.loss_history_[-1] < graphed.loss_history_[0]


def test_a_checkpoint_keeps_the_optimizers_implementation(tmp_path) -> None:
    """A checkpoint of the plain Adam resumes into a fused one (as a GPU run's), which stays fused, with its step
    counts where the fused update wants them; the state itself comes back."""
    net = torch.nn.Linear(3, 2)
    plain = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(4, 3)).sum().backward()
    plain.step()
    save_checkpoint(tmp_path / "ck", net, plain, {"epoch": 1})
    fused = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)
    load_checkpoint(tmp_path / "ck", net, fused)
    assert all(group["fused"] for group in fused.param_groups)
    for p in net.parameters():
        state = fused.state[p]
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 1.0
        torch.testing.assert_close(state["exp_avg"], plain.state[p]["exp_avg"])


def test_no_graphs_with_a_schedule_or_without_cuda(chains: Interactions) -> None:
    net = torch.nn.Linear(2, 2)
    assert not Trainer(net, TrainerConfig(device="cpu", progress=False)).can_graph
    if torch.cuda.is_available():
        assert Trainer(net, TrainerConfig(device="cuda", progress=False)).can_graph
        assert not Trainer(net, TrainerConfig(device="cuda", schedule="cosine", progress=False)).can_graph
        assert not Trainer(net, TrainerConfig(device="cuda", warmup_steps=5, progress=False)).can_graph
        assert not Trainer(net, TrainerConfig(device="cuda", cuda_graphs=False, progress=False)).can_graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_cuda_graphs_train_as_eager_steps_on_a_gpu(name: str, chains: Interactions,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """On a GPU the captured graph replays: no capture warning, and the fit learns as the eager one does (float32,
    no dropout: the losses agree to kernel rounding)."""
    params = {**SMALL, "epochs": 6, "dropout": 0.0, "amp": False, "device": "cuda"}
    with caplog.at_level(logging.INFO, logger="recforge.neural"):
        graphed = create_model(name, **params).fit(chains)
    assert "replayed from a CUDA graph" in caplog.text and "capture of the training step failed" not in caplog.text
    eager = create_model(name, **params, cuda_graphs=False).fit(chains)
    np.testing.assert_allclose(graphed.loss_history_, eager.loss_history_, rtol=2e-3)
    users = np.arange(20)
    assert (graphed.recommend(users, k=5)["item_id"].to_numpy() == eager.recommend(users, k=5)["item_id"].to_numpy()).mean() > 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graphs_with_the_defaults_learn_and_resume_on_a_gpu(chains: Interactions, tmp_path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """SASRec's defaults on a GPU (bfloat16 autocast without its weight cache, dropout drawn anew by every replay):
    the graph replays and the model learns the chains; with deterministic kernels, a run resumed from its
    checkpoint retraces the uninterrupted one (the epochs' seeds reach the replayed dropout)."""
    with caplog.at_level(logging.INFO, logger="recforge.neural"):
        model = create_model("sasrec", **{**SMALL, "epochs": 8, "device": "cuda"}).fit(chains)
    assert "replayed from a CUDA graph" in caplog.text and "capture of the training step failed" not in caplog.text
    assert model.loss_history_[-1] < 0.8 * model.loss_history_[0]
    params = {**SMALL, "device": "cuda", "deterministic": True, "checkpoint_dir": str(tmp_path / "ck")}
    full = create_model("sasrec", **{**params, "checkpoint_dir": None, "epochs": 4}).fit(chains)
    create_model("sasrec", **{**params, "epochs": 2}).fit(chains)
    resumed = create_model("sasrec", **{**params, "epochs": 4, "resume": True}).fit(chains)
    for a, b in zip(full.net_.parameters(), resumed.net_.parameters()):
        assert torch.equal(a, b)


_INVALID_CAPTURE = """
import os

import torch
from recforge.errors import UnsupportedError
from recforge.neural.graphs import GraphedStep

layer, drop = torch.nn.Linear(4, 1).cuda(), torch.nn.Dropout(0.5)

def step(batch):
    loss = drop(layer(batch["x"])).sum()
    float(loss)  # the host waits for the device: a capture forbids it
    return loss

graphed, batch = GraphedStep(step, torch.device("cuda")), {"x": torch.ones(8, 4, device="cuda")}
for _ in range(3):
    graphed(batch)
try:
    graphed(batch)
except UnsupportedError as exc:
    assert "cuda_graphs=False" in str(exc), exc
else:
    raise SystemExit("the invalidated capture raised nothing")
assert torch.cuda.current_stream() == torch.cuda.default_stream(), "the capture's stream stayed current"
print("ok", flush=True)
os._exit(0)  # the abandoned capture's allocator state is not this test's business at teardown
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_a_capture_cuda_invalidates_is_an_error_and_restores_the_stream() -> None:
    """A step that waits for the device inside the capture: one clear error, and the default stream current again
    (torch.cuda.graph would leave the side stream current). In a process of its own: CUDA's allocator stays
    mid-capture after it, which is why it is an error and not a fallback."""
    done = subprocess.run([sys.executable, "-c", _INVALID_CAPTURE], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
