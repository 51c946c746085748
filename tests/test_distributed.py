"""Data-parallel training: batch sharding, trainer callbacks, and a real 2-process gloo run under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recforge.core.device import resolve_device
from recforge.errors import ParameterError
from recforge.neural import distributed as D
from recforge.neural.trainer import StopTraining, Trainer, TrainerConfig, training_callbacks

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def test_shard_rows_cover_the_batch_once() -> None:
    assert [D.shard_rows(10, p, 2) for p in range(2)] == [slice(0, 5), slice(5, 10)]
    assert [D.shard_rows(7, p, 3) for p in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 7)]
    # fewer rows than ranks: nobody gets an empty slice (an empty rank would skip the gradient exchange)
    assert [D.shard_rows(1, p, 3) for p in range(3)] == [slice(0, 1)] * 3


def test_shard_batch_slices_row_arrays_only() -> None:
    batch = {"seq": np.arange(12).reshape(6, 2), "item": torch.arange(6), "log_q": np.zeros(3), "tag": "x"}
    mine = D.shard_batch(batch, 1, 2)
    assert mine["seq"].tolist() == [[6, 7], [8, 9], [10, 11]]
    assert mine["item"].tolist() == [3, 4, 5]
    assert mine["log_q"].shape == (3,) and mine["tag"] == "x"  # not per-row: every rank keeps it whole


def test_not_distributed_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not D.init_distributed() and D.world_size() == 1 and D.is_main_process()
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.mean_across_ranks(2.5) == 2.5


@pytest.mark.parametrize(("gpus", "device_env", "backend"), [(0, None, "gloo"), (1, None, "gloo"), (2, None, "nccl"),
                                                          (2, "cpu", "gloo")])
def test_nccl_only_when_every_local_rank_has_a_gpu(gpus: int, device_env: str | None, backend: str,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    joined: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    if device_env is None:
        monkeypatch.delenv("RECFORGE_DEVICE", raising=False)
    else:
        monkeypatch.setenv("RECFORGE_DEVICE", device_env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(D.dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(D.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(D.dist, "get_rank", lambda: 0)
    assert D.init_distributed() and joined == [backend]
    assert ("share 1 GPU(s): training on the CPU" in caplog.text) == (gpus == 1)
    monkeypatch.setattr(D.dist, "get_backend", lambda: backend)
    auto = torch.device("cuda" if gpus and device_env is None else "cpu")
    assert D.rank_device(auto, explicit=False).type == ("cuda" if backend == "nccl" else "cpu")
    if backend == "gloo" and gpus:  # asked for by name, a shared GPU is an error, not a silent CPU run
        with pytest.raises(ParameterError, match="start at most one rank per GPU"):
            D.rank_device(torch.device("cuda"), explicit=True)
    if backend == "nccl":
        with pytest.raises(ParameterError, match="RECFORGE_DEVICE=cpu before torchrun"):
            D.rank_device(torch.device("cpu"), explicit=True)


def test_recforge_device_chooses_for_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECFORGE_DEVICE", "cpu")
    assert resolve_device("auto").type == "cpu" and resolve_device(None).type == "cpu"
    monkeypatch.setenv("RECFORGE_DEVICE", "tpu")
    with pytest.raises(ParameterError, match="RECFORGE_DEVICE='tpu'"):
        resolve_device("auto")
    assert resolve_device("cpu").type == "cpu"  # a device given by name wins over the variable
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ParameterError, match=r"has 1 GPU\(s\) \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:1")


def _regression_trainer(epochs: int, callbacks: tuple = ()) -> tuple[Trainer, Any, Any, Any]:
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    net = torch.nn.Linear(3, 1)
    cfg = TrainerConfig(epochs=epochs, lr=0.05, patience=0, progress=False, metric="neg_mse", device="cpu")
    trainer = Trainer(net, cfg, callbacks)

    def batches(epoch: int, rng: np.random.Generator):
        order = rng.permutation(64)
        for lo in range(0, 64, 16):
            yield {"x": x[order[lo:lo + 16]].numpy(), "y": y[order[lo:lo + 16]].numpy()}

    def validate() -> dict[str, float]:
        return {"neg_mse": -float(((net(x).squeeze(1) - y) ** 2).mean())}

    def loss(batch: dict) -> torch.Tensor:
        return ((net(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean()

    return trainer, loss, batches, validate


def test_callbacks_see_every_validation_and_can_stop() -> None:
    seen: list[dict] = []

    def stop_after_three(row: dict) -> None:
        seen.append(row)
        if len(seen) == 3:
            raise StopTraining

    trainer, loss, batches, validate = _regression_trainer(20, (stop_after_three,))
    result = trainer.fit(loss, batches, 4, validate)
    assert len(seen) == 3 and result.stopped_early and result.steps == 12
    assert [r["epoch"] for r in seen] == [1, 2, 3] and all("valid_neg_mse" in r for r in seen)
    assert seen[-1]["valid_neg_mse"] > seen[0]["valid_neg_mse"]  # it was learning when stopped


def test_ambient_callbacks_reach_trainers_built_inside() -> None:
    rows: list[dict] = []
    with training_callbacks(rows.append):
        trainer, loss, batches, validate = _regression_trainer(2)
    trainer.fit(loss, batches, 4, validate)
    trainer2, loss2, batches2, validate2 = _regression_trainer(2)  # built outside the block: no callback
    trainer2.fit(loss2, batches2, 4, validate2)
    assert len(rows) == 2


def test_an_exception_from_a_callback_abandons_training() -> None:
    class Pruned(Exception):
        pass

    def prune(row: dict) -> None:
        raise Pruned

    trainer, loss, batches, validate = _regression_trainer(5, (prune,))
    with pytest.raises(Pruned):
        trainer.fit(loss, batches, 4, validate)


def _run(cmd: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "RECFORGE_DEVICE": "cpu"}  # gloo also on GPUs
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([*cmd, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    """torchrun with 2 CPU ranks: each trains on half of every batch, gradients are averaged by DDP, and the
    model ends up as good as the one-process model (up to the noise of different dropout draws)."""
    single = _run([sys.executable], tmp_path / "one")
    pair = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                tmp_path / "two")
    assert len(single) == 1 and len(pair) == 2
    one, (r0, r1) = single[0], pair
    assert r0["world_size"] == r1["world_size"] == 2
    # each rank saw half of the rows: the data really was split ...
    assert r0["rows_trained"] + r1["rows_trained"] == one["rows_trained"]
    assert abs(r0["rows_trained"] - r1["rows_trained"]) <= one["rows_trained"] * 0.02
    # ... yet both ranks hold identical weights: the gradients were synchronised every step
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-9, abs=1e-9)
    assert r0["ndcg@10"] == r1["ndcg@10"]
    assert one["ndcg@10"] > 1.5 * one["pop_ndcg@10"] and r0["ndcg@10"] > 1.5 * r0["pop_ndcg@10"]
    assert abs(r0["ndcg@10"] - one["ndcg@10"]) < 0.03
