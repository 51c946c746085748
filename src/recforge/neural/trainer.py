"""One training loop for every neural model.

The loop owns what every model needs and no model should rewrite: device placement, mixed precision on GPUs,
seeding, the optimiser and its learning-rate schedule, gradient clipping, a progress bar with the loss, validation
on a ranking metric every N steps with early stopping, the best weights kept and restored at the end, periodic
checkpoints that a later run resumes from, and training curves as CSV and PNG.

A model hands the trainer a ``torch.nn.Module``, a ``loss_fn(batch) -> scalar tensor``, a
``batches(epoch, rng) -> iterator of dicts of numpy arrays`` and optionally ``validate() -> {metric: value}``.

Callbacks see every validation row (epoch, step, loss, ``valid_<metric>``); they are given to the trainer or
installed around any code that trains with :func:`training_callbacks`, which is how a tuner prunes a model's
training without the model knowing. A callback raises :class:`StopTraining` to end a run early (the best
weights are kept) or any other exception to abandon it.

Under ``torchrun`` the loop trains data-parallel (see :mod:`recforge.neural.distributed`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from recforge.data.io import atomic_path, save_figure
from recforge.errors import DataError
from recforge.neural import distributed as D
from recforge.neural.checkpoint import load_checkpoint, save_checkpoint
from recforge.neural.device import amp_dtype, resolve_device

log = logging.getLogger(__name__)

Batch = dict[str, Any]
Callback = Callable[[dict[str, Any]], None]
SCHEDULES = ("constant", "cosine", "linear")
_CALLBACKS: contextvars.ContextVar[tuple[Callback, ...]] = contextvars.ContextVar("recforge_training_callbacks",
                                                                                   default=())


class StopTraining(Exception):
    """Raised by a callback to end training now; the best weights so far are kept."""


@contextlib.contextmanager
def training_callbacks(*callbacks: Callback) -> Iterator[None]:
    """Every :class:`Trainer` created inside the block also calls ``callbacks`` after each validation."""
    token = _CALLBACKS.set(_CALLBACKS.get() + tuple(callbacks))
    try:
        yield
    finally:
        _CALLBACKS.reset(token)
OPTIMIZERS = ("adam", "adamw")


@dataclass
class TrainerConfig:
    """Settings of :class:`Trainer` (models expose them as constructor parameters of the same names).

    ``validate_every``: steps between validations (0 = once per epoch). ``patience``: validations without
    improvement before stopping (0 = never stop early). ``checkpoint_dir``: where the last and best checkpoints
    and the training curves go; with ``resume`` a run continues from the last checkpoint found there.
    """

    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    validate_every: int = 0
    patience: int = 5
    metric: str = "ndcg@10"
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    progress: bool = True
    checkpoint_dir: str | None = None
    resume: bool = False
    desc: str = "training"

    @classmethod
    def from_model(cls, model: Any, **overrides: Any) -> TrainerConfig:
        """Settings from a model's constructor parameters of the same names (``epochs``, ``lr``, ...), with the
        optimizer AdamW when the model has a ``weight_decay``, Adam otherwise; ``overrides`` win."""
        names = set(model._param_names())
        shared = {f.name: getattr(model, f.name) for f in fields(cls) if f.name in names}
        shared["optimizer"] = "adamw" if shared.get("weight_decay") else "adam"
        shared["desc"] = type(model).__name__
        return cls(**{**shared, **overrides})

    def check(self) -> TrainerConfig:
        """Raise :class:`DataError` naming the first invalid setting."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise DataError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not self.lr > 0:
            raise DataError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise DataError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise DataError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise DataError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.validate_every < 0 or self.patience < 0:
            raise DataError("warmup_steps, validate_every and patience must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise DataError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        return self


@dataclass
class TrainingResult:
    """What a run produced: the per-validation ``history`` and where/when the best score was reached."""

    history: pd.DataFrame
    best_metric: float | None
    best_step: int | None
    best_epoch: int | None
    seconds_to_best: float | None
    seconds: float
    steps: int
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Train ``module`` with the settings of a :class:`TrainerConfig` (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, config: TrainerConfig,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.config = config.check()
        self.callbacks = [*callbacks, *_CALLBACKS.get()]
        self.distributed = D.init_distributed()
        self.device = resolve_device(config.device)
        if self.distributed and self.device.type == "cuda":  # one GPU per rank on each machine
            self.device = torch.device("cuda", D.local_rank())
        self.module = module.to(self.device)
        self.amp = amp_dtype(self.device, config.amp)
        params = [p for p in module.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay)
        # float16 needs loss scaling to keep small gradients; bfloat16 and float32 do not
        self.scaler = torch.amp.GradScaler("cuda") if self.amp is torch.float16 else None

    # ------------------------------------------------------------------ helpers
    def to_device(self, batch: Batch) -> Batch:
        """numpy arrays in a batch become tensors on the training device (non-blocking from pinned memory)."""
        out: Batch = {}
        for key, value in batch.items():
            if isinstance(value, np.ndarray):
                t = torch.from_numpy(value)
                if self.device.type == "cuda":
                    t = t.pin_memory().to(self.device, non_blocking=True)
                out[key] = t
            elif isinstance(value, torch.Tensor):
                out[key] = value.to(self.device)
            else:
                out[key] = value
        return out

    def autocast(self) -> Any:
        """The mixed-precision context for forward passes (a no-op on the CPU)."""
        if self.amp is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def _lr_factor(self, step: int, total: int) -> float:
        cfg = self.config
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total - cfg.warmup_steps)
        done = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * done)) if cfg.schedule == "cosine" else 1.0 - done

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

    # ------------------------------------------------------------------ the loop
    def fit(
        self,
        loss_fn: Callable[[Batch], torch.Tensor],
        batches: Callable[[int, np.random.Generator], Iterator[Batch]],
        steps_per_epoch: int,
        validate: Callable[[], dict[str, float]] | None = None,
    ) -> TrainingResult:
        """Run the loop; afterwards ``module`` holds the best validated weights (or the last ones without
        validation). Each epoch's batch order comes from a generator seeded by (seed, epoch) and dropout from a
        torch seed derived the same way, so a run resumed from an epoch-end checkpoint retraces an uninterrupted
        one."""
        cfg = self.config
        total_steps = cfg.epochs * max(1, steps_per_epoch)
        ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        state = {"epoch": 0, "step": 0, "best": None, "best_step": None, "best_epoch": None, "seconds_to_best": None,
                 "bad": 0, "history": [], "elapsed": 0.0}
        best_weights: dict[str, torch.Tensor] | None = None
        if ckpt is not None and cfg.resume and (ckpt / "last" / "trainer.json").is_file():
            state = load_checkpoint(ckpt / "last", self.module, self.optimizer)
            if (ckpt / "best" / "trainer.json").is_file():
                current = self._snapshot()
                load_checkpoint(ckpt / "best", self.module)
                best_weights = self._snapshot()
                self.module.load_state_dict(current)
            log.info("resumed %s from %s at epoch %d, step %d", cfg.desc, ckpt / "last", state["epoch"], state["step"])
        metric = cfg.metric
        start = time.perf_counter() - state["elapsed"]
        stop = state.get("stopped", False)
        running, n_running = 0.0, 0
        main = D.is_main_process()
        parts, part = D.world_size(), D.rank()
        forward = D.wrap_ddp(self.module, loss_fn, self.device) if self.distributed else loss_fn
        bar = tqdm(total=total_steps, initial=state["step"], desc=cfg.desc, unit="step",
                   disable=not (cfg.progress and main), leave=False)

        def run_validation(epoch_done: bool) -> bool:
            nonlocal best_weights, running, n_running
            row = {"epoch": state["epoch"], "step": state["step"],
                   "loss": running / max(1, n_running), "lr": self.optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - start}
            running, n_running = 0.0, 0
            improved = False
            if validate is not None:
                self.module.eval()
                with torch.no_grad(), self.autocast():
                    scores = validate()
                self.module.train()
                scores = D.broadcast_object(scores)  # every rank takes the same early-stopping decisions
                if metric not in scores:
                    raise DataError(f"validation metric {metric!r} is not among {sorted(scores)}")
                row.update({f"valid_{k}": float(v) for k, v in scores.items()})
                value = float(scores[metric])
                if state["best"] is None or value > state["best"] + 1e-9:
                    state.update(best=value, best_step=state["step"], best_epoch=row["epoch"],
                                 seconds_to_best=row["seconds"], bad=0)
                    best_weights = self._snapshot()
                    improved = True
                else:
                    state["bad"] += 1
                bar.set_postfix(loss=f"{row['loss']:.4f}", **{metric: f"{value:.4f}"})
            state["history"].append(row)
            for callback in self.callbacks:
                try:
                    callback(dict(row))
                except StopTraining:
                    state["halt"] = True
            return improved

        def checkpoint(improved: bool) -> None:
            if ckpt is None or not main:
                return
            state["elapsed"] = time.perf_counter() - start
            save_checkpoint(ckpt / "last", self.module, self.optimizer, state)
            if improved:
                save_checkpoint(ckpt / "best", self.module, None, state)

        self.module.train()
        while state["epoch"] < cfg.epochs and not stop:
            epoch = state["epoch"]
            rng = np.random.default_rng([cfg.seed, epoch])
            torch.manual_seed(cfg.seed * 1_000_003 + epoch)
            skip = state["step"] - epoch * steps_per_epoch  # steps of this epoch already done before a resume
            for i, batch in enumerate(batches(epoch, rng)):
                if i < skip:
                    continue
                factor = self._lr_factor(state["step"], total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
                if self.distributed:
                    batch = D.shard_batch(batch, part, parts)
                with self.autocast():
                    loss = forward(self.to_device(batch))
                loss_value = D.mean_across_ranks(float(loss.detach()))  # the same on every rank
                if not math.isfinite(loss_value):
                    raise DataError(f"{cfg.desc}: the loss became {loss_value} at step {state['step']}; "
                                    "lower lr or raise grad_clip")
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.optimizer)
                else:
                    loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                state["step"] += 1
                running += loss_value
                n_running += 1
                bar.update(1)
                if cfg.progress and validate is None:
                    bar.set_postfix(loss=f"{running / n_running:.4f}")
                if cfg.validate_every and state["step"] % cfg.validate_every == 0:
                    improved = run_validation(False)
                    checkpoint(improved)
                    if (cfg.patience and state["bad"] >= cfg.patience) or state.get("halt"):
                        stop = True
                        break
            if stop:
                break
            state["epoch"] += 1
            if not cfg.validate_every or validate is None:
                improved = run_validation(True) if (not cfg.validate_every or n_running) else False
                checkpoint(improved)
                if (validate is not None and cfg.patience and state["bad"] >= cfg.patience) or state.get("halt"):
                    stop = True
        bar.close()
        state["stopped"] = stop
        seconds = time.perf_counter() - start
        if best_weights is not None:
            self.module.load_state_dict(best_weights)
        self.module.eval()
        history = pd.DataFrame(state["history"])
        if ckpt is not None and main:
            write_training_curves(history, ckpt, metric)
        if validate is not None and state["best"] is not None:
            log.info("%s: best %s %.5f at epoch %s (step %s, %.1fs); %d steps in %.1fs", cfg.desc, metric,
                     state["best"], state["best_epoch"], state["best_step"], state["seconds_to_best"], state["step"],
                     seconds)
        return TrainingResult(history, state["best"], state["best_step"], state["best_epoch"],
                              state["seconds_to_best"], seconds, state["step"], stop,
                              {"config": asdict(cfg), "world_size": parts})


def keep_training_result(model: Any, result: TrainingResult) -> None:
    """Store a training run on the model as fitted attributes: ``training_history_``, ``best_epoch_``,
    ``best_score_``, ``seconds_to_best_``, ``stopped_early_`` and ``loss_history_``."""
    model.training_history_ = result.history
    model.best_epoch_ = result.best_epoch
    model.best_score_ = result.best_metric
    model.seconds_to_best_ = result.seconds_to_best
    model.stopped_early_ = result.stopped_early
    model.loss_history_ = result.history["loss"].tolist() if len(result.history) else []


def write_training_curves(history: pd.DataFrame, folder: str | Path, metric: str = "ndcg@10") -> tuple[Path, Path]:
    """Save ``training_curves.csv`` and ``training_curves.png`` (loss and validation metric by step)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "training_curves.csv"
    with atomic_path(csv) as tmp:
        history.to_csv(tmp, index=False)
    png = folder / "training_curves.png"
    plot_training_curves(history, png, metric)
    return csv, png


def plot_training_curves(history: pd.DataFrame, path: str | Path, metric: str = "ndcg@10") -> Path:
    """Plot the training loss (left axis) and the validation metric (right axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if len(history):
        ax.plot(history["step"], history["loss"], color="tab:blue", label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss", color="tab:blue")
        col = f"valid_{metric}"
        if col in history.columns:
            ax2 = ax.twinx()
            ax2.plot(history["step"], history[col], color="tab:orange", marker="o", ms=3, label=col)
            ax2.set_ylabel(f"validation {metric}", color="tab:orange")
    ax.set_title("training curves")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
