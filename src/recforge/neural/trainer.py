"""One training loop for every neural model.

The loop owns what every model needs and no model should rewrite: device placement, mixed precision on GPUs,
seeding, the optimiser and its learning-rate schedule, gradient clipping, a progress bar with the loss, validation
on a ranking metric every N steps with early stopping, the best weights kept and restored at the end, periodic
checkpoints that a later run resumes from, and training curves as CSV and PNG. On a GPU, a model whose loss keeps
static shapes has each step replayed from a CUDA graph (:mod:`recforge.neural.graphs`).

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
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from recforge.core.device import (
    amp_dtype,
    caller_rng_kept,
    deterministic_algorithms,
    is_auto,
    resolve_device,
    seed_torch,
)
from recforge.core.params import Boolean, Choice, Constraint, DeviceName, Integer, Real, Text, check_params
from recforge.core.progress import fit_summary, progress_bar
from recforge.core.validation import VALIDATION_METRICS
from recforge.data.io import atomic_path, save_figure
from recforge.errors import ArtifactError, DataError, ParameterError
from recforge.neural import distributed as D
from recforge.neural.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint
from recforge.neural.graphs import GraphedStep

if TYPE_CHECKING:
    from recforge.data import Interactions

log = logging.getLogger(__name__)
#: Steps between two updates of the progress bar's running loss (each reads the loss from the device).
_POSTFIX_EVERY = 50

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
#: The trainer's settings as model parameters: every model trained by :class:`Trainer` checks these.
TRAINER_CONSTRAINTS: dict[str, Constraint] = {
    "epochs": Integer(1),
    "lr": Real(0, strict=True),
    "weight_decay": Real(0),
    "optimizer": Choice(*OPTIMIZERS),
    "schedule": Choice(*SCHEDULES),
    "warmup_steps": Integer(0),
    "grad_clip": Real(0, strict=True, optional=True),
    "validate_every": Integer(0),
    "patience": Integer(0),
    "metric": Text(),
    "device": DeviceName(),
    "amp": Boolean(),
    "deterministic": Boolean(),
    "cuda_graphs": Boolean(),
    "seed": Integer(0),
    "progress": Boolean(),
    "checkpoint_dir": Text(optional=True),
    "resume": Boolean(),
    "desc": Text(),
}
#: The trainer settings models expose as constructor parameters of the same names (the metric: ``valid_metric``,
#: one of what :class:`~recforge.core.validation.RankingValidator` reports).
MODEL_TRAINER_CONSTRAINTS: dict[str, Constraint] = {
    **{name: TRAINER_CONSTRAINTS[name] for name in (
        "epochs", "lr", "weight_decay", "grad_clip", "schedule", "warmup_steps", "validate_every", "patience",
        "device", "amp", "deterministic", "checkpoint_dir", "resume", "seed", "progress")},
    "valid_metric": Choice(*VALIDATION_METRICS),
}


@dataclass
class TrainerConfig:
    """Settings of :class:`Trainer` (models expose them as constructor parameters of the same names).

    ``validate_every``: steps between validations (0 = once per epoch). ``patience``: validations without
    improvement before stopping (0 = never stop early). ``checkpoint_dir``: where the last and best checkpoints
    and the training curves go; with ``resume`` a run continues from the last checkpoint found there.
    ``cuda_graphs``: replay each step from a CUDA graph where :attr:`Trainer.can_graph` allows it and the model's
    loss keeps static shapes (``fit(graphs=True)``).
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
    deterministic: bool = False
    cuda_graphs: bool = True
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

    def with_epochs(self, epochs: int) -> TrainerConfig:
        """The same settings for ``epochs`` epochs of a continuation, without early stopping, writing its
        checkpoints to ``continued/`` under ``checkpoint_dir`` (the first fit's stay as they are) and never
        resuming: a continuation starts from the fitted model, not from a checkpoint."""
        folder = str(Path(self.checkpoint_dir) / "continued") if self.checkpoint_dir else None
        return replace(self, epochs=epochs, patience=0, checkpoint_dir=folder, resume=False)

    def check(self) -> TrainerConfig:
        """Raise :class:`~recforge.errors.ParameterError` naming the first invalid setting."""
        check_params(self, TRAINER_CONSTRAINTS, {f.name: getattr(self, f.name) for f in fields(self)})
        return self


@dataclass
class TrainingResult:
    """What a run produced: the per-validation ``history`` and where/when the best score was reached;
    ``tuned_epochs`` is the number of epochs that reaches the best validated step (None without validation)."""

    history: pd.DataFrame
    best_metric: float | None
    best_step: int | None
    best_epoch: int | None
    seconds_to_best: float | None
    seconds: float
    steps: int
    stopped_early: bool = False
    tuned_epochs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingState:
    """Where a run stands: what a checkpoint stores (as JSON) and a resumed run continues from."""

    epoch: int = 0
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    seconds_to_best: float | None = None
    bad: int = 0  # validations since the last improvement
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    stopped: bool = False
    halted: bool = False  # a callback raised StopTraining

    @classmethod
    def from_json(cls, info: dict[str, Any]) -> TrainingState:
        """A state from a checkpoint's ``trainer`` entry, every field checked for its type and range (unknown
        keys are ignored); a problem is an :class:`~recforge.errors.ArtifactError` naming the field."""
        state = cls(**{f.name: info[f.name] for f in fields(cls) if f.name in info})
        for name, constraint in _STATE_FIELDS.items():
            if not constraint.accepts(getattr(state, name)):
                raise ArtifactError(f"its {name} is {getattr(state, name)!r}"[:200])
        for name, ok in (("best_step", state.best_step is None or state.best_step <= state.step),
                         ("best_epoch", state.best_epoch is None or state.best_epoch <= state.epoch),
                         ("history", _history(state.history, state))):
            if not ok:
                raise ArtifactError(f"its {name} is {getattr(state, name)!r}"[:200])
        return state

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-ready dict."""
        return asdict(self)


#: What each field of a restored :class:`TrainingState` accepts (the history is checked row by row).
_STATE_FIELDS: dict[str, Constraint] = {
    "epoch": Integer(0), "step": Integer(0), "bad": Integer(0), "best": Real(optional=True),
    "best_step": Integer(0, optional=True), "best_epoch": Integer(0, optional=True),
    "seconds_to_best": Real(0, optional=True), "elapsed": Real(0), "stopped": Boolean(), "halted": Boolean(),
}
_COUNT, _NUMBER = Integer(0), Real()
#: What every history row holds (validation adds ``validation_seconds`` and ``valid_<metric>`` entries).
_ROW_KEYS = frozenset({"epoch", "step", "loss", "lr", "seconds"})


def _history(rows: Any, state: TrainingState) -> bool:
    """Rows as :meth:`Trainer._validate` appends them: numbers only, counters that never decrease and stay
    within the state's."""
    if not isinstance(rows, list):
        return False
    last_step = last_epoch = 0
    for row in rows:
        if not (isinstance(row, dict) and _ROW_KEYS <= row.keys() and all(
                isinstance(k, str) and _NUMBER.accepts(v) for k, v in row.items())):
            return False
        if not (_COUNT.accepts(row["step"]) and _COUNT.accepts(row["epoch"]) and last_step <= row["step"] <= state.step
                and last_epoch <= row["epoch"] <= state.epoch):
            return False
        last_step, last_epoch = row["step"], row["epoch"]
    return True


def _best_problem(state: TrainingState, metric: str) -> str | None:
    """What in a restored state's early-stopping record its own history contradicts (it decides when the resumed
    run stops and which weights it keeps), or None."""
    key = f"valid_{metric}"
    validated = [row for row in state.history if key in row]
    if state.best_step is None:
        if state.best is None and not validated and state.bad == 0:
            return None
        return "validations without a best step"
    row = next((r for r in validated if r["step"] == state.best_step), None)
    if row is None or (row[key], row["epoch"], row["seconds"]) != (state.best, state.best_epoch,
                                                                    state.seconds_to_best):
        return f"a best {metric} its history does not show at step {state.best_step}"
    if any(r[key] > state.best + 1e-9 for r in validated):
        return f"a best {metric} below one its history shows"
    if state.bad != sum(r["step"] > state.best_step for r in validated):
        return "a count of validations without improvement its history does not show"
    return None


#: Model parameters that say how long, where or how fast a run goes, not what it learns: a checkpoint resumes
#: under other values of these.
RUN_SETTINGS = frozenset({"epochs", "patience", "validate_every", "resume", "checkpoint_dir", "progress", "device",
                          "amp", "deterministic", "cuda_graphs", "num_threads"})


def run_identity(model: Any, train: Interactions, valid: Interactions | None) -> dict[str, Any]:
    """What a checkpoint must have been written by for ``model``'s fit on ``train`` (validating on ``valid``) to
    resume from it: the model's class and parameters (but :data:`RUN_SETTINGS`) and the data's fingerprints."""
    return {"model": type(model).__name__,
            "params": {k: v for k, v in model.get_params().items() if k not in RUN_SETTINGS},
            "train": train.fingerprint(), "valid": valid.fingerprint() if valid is not None and len(valid) else None}


def _first_difference(saved: Any, current: Any, where: str = "") -> str | None:
    """The path of the first entry where two JSON values differ (``None`` when equal)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current), key=str):
            found = _first_difference(saved.get(key), current.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    return None if saved == current else (where or "run")


class Trainer:
    """Train ``module`` with the settings of a :class:`TrainerConfig` (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, config: TrainerConfig,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.config = config.check()
        self.callbacks = [*callbacks, *_CALLBACKS.get()]
        self.distributed = D.init_distributed()
        self.device = resolve_device(config.device)
        if self.distributed:
            self.device = D.rank_device(self.device, explicit=not is_auto(config.device))
        self.module = module.to(self.device)
        self.amp = amp_dtype(self.device, config.amp)
        params = [p for p in module.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        # on a GPU one fused kernel updates every parameter, its step counts on the device (a graph can record it;
        # the graph sets capturable, which torch otherwise warns about outside a capture)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
        # float16 needs loss scaling to keep small gradients; bfloat16 and float32 do not
        self.scaler = torch.amp.GradScaler("cuda") if self.amp is torch.float16 else None
        self.main = D.is_main_process()
        self._best_weights: dict[str, torch.Tensor] | None = None
        # summed loss since the last history row, kept on the device: reading it after every step would make the
        # host wait for each step to finish before queueing the next one
        self._running: torch.Tensor | None = None
        self._n_running = 0

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

    def autocast(self, cache: bool = True) -> Any:
        """The mixed-precision context for forward passes (a no-op on the CPU); ``cache=False`` recasts the weights
        at every use, as a CUDA graph capture requires."""
        if self.amp is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp, cache_enabled=cache)

    @property
    def can_graph(self) -> bool:
        """Whether ``fit(graphs=True)`` replays the steps from a CUDA graph: on a GPU, with ``cuda_graphs``, in one
        process, without a loss scaler (float16) and with a constant learning rate (a graph records the rate)."""
        cfg = self.config
        return (self.device.type == "cuda" and cfg.cuda_graphs and not self.distributed and self.scaler is None
                and cfg.schedule == "constant" and not cfg.warmup_steps)

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

    # ------------------------------------------------------------------ the steps of a run
    def _restore(self, ckpt: Path | None, steps_per_epoch: int) -> TrainingState:
        """A fresh state, or, when resuming, the last checkpoint's (with the best weights so far): only a checkpoint
        of this run (its identity, set by :meth:`fit`) whose counters fit this run's epochs."""
        cfg = self.config
        if ckpt is None:
            return TrainingState()
        self._usable_folder(ckpt)
        last = ckpt / "last"
        if not cfg.resume:
            return TrainingState()
        if not last.exists():
            # a run stopped between moving its last checkpoint aside and putting the new one in place
            aside = sorted(ckpt.glob(".last.old-*"), key=lambda q: q.stat().st_mtime)
            if not aside:
                return TrainingState()
            last = aside[-1]
            log.warning("%s: resuming from %s, the checkpoint a stopped run had moved aside", cfg.desc, last)
        info = checkpoint_info(last)
        saved_run = info.pop("run", None)
        where = f"{str(last)!r} is not a checkpoint this run can resume from"
        if not isinstance(saved_run, dict):
            raise ArtifactError(f"{where}: it records no run (an older recforge's, or edited); resume=False trains "
                                "from scratch and replaces it")
        differs = _first_difference(saved_run, self._identity)
        if differs:
            raise ArtifactError(f"{where}: it was written by another run (its {differs} differs); give this run its "
                                "own checkpoint_dir, or resume=False to train from scratch and replace it")
        try:
            state = TrainingState.from_json(info)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from None
        if state.epoch > cfg.epochs or not (
                state.epoch * steps_per_epoch <= state.step <= (state.epoch + 1) * steps_per_epoch):
            raise ArtifactError(f"{where}: it stands at epoch {state.epoch}, step {state.step}, which does not fit "
                                f"{cfg.epochs} epochs of {steps_per_epoch} steps")
        problem = _best_problem(state, cfg.metric)
        if problem:
            raise ArtifactError(f"{where}: it records {problem}")
        # clipped gradients bound Adam's moments, unless the coupled weight decay adds to them after the clip
        max_grad = cfg.grad_clip if cfg.grad_clip and (cfg.optimizer == "adamw" or not cfg.weight_decay) else None
        load_checkpoint(last, self.module, self.optimizer, max_grad)
        if state.best_step == state.step:  # saved where it improved: these weights are the best so far
            self._best_weights = self._snapshot()
        elif state.best_step is not None:
            self._best_weights = self._best_so_far(ckpt / "best", state.best_step, where)
        D.barrier()  # every rank has read the checkpoint before the first one may replace it
        log.info("resumed %s from %s at epoch %d, step %d", cfg.desc, last, state.epoch, state.step)
        return state

    def _best_so_far(self, best: Path, step: int, where: str) -> dict[str, torch.Tensor]:
        """The weights ``best/`` holds, when it is this run's best at ``step`` (what ``last/`` records)."""
        info = checkpoint_info(best) if best.exists() else {}
        if _first_difference(info.get("run"), self._identity) or info.get("step") != step:
            raise ArtifactError(f"{where}: it records its best weights at step {step}, which {str(best)!r} does not "
                                "hold; resume=False trains from scratch")
        current = self._snapshot()
        load_checkpoint(best, self.module)
        weights = self._snapshot()
        self.module.load_state_dict(current)
        return weights

    @staticmethod
    def _usable_folder(ckpt: Path) -> None:
        """``checkpoint_dir`` made and checked before the first step: a file there, a folder that cannot be made,
        or a checkpoint that is a symbolic link (which replacing it would follow) is one clear error."""
        try:
            a_file = ckpt.exists() and not ckpt.is_dir()
            if not a_file:
                ckpt.mkdir(parents=True, exist_ok=True)
            links = [name for name in ("last", "best") if (ckpt / name).is_symlink()]
        except (OSError, ValueError) as exc:
            raise ParameterError(f"checkpoint_dir {str(ckpt)[:200]!r} cannot be used: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
        if a_file:
            raise ParameterError(f"checkpoint_dir {str(ckpt)!r} is a file, not a folder")
        if links:
            raise ParameterError(f"checkpoint_dir {str(ckpt)!r} holds {links[0]!r} as a symbolic link; recforge "
                                 "replaces its checkpoints there and does not follow links")

    def _train_step(self, step: Callable[[Batch], torch.Tensor], batch: Batch, state: TrainingState,
                    total_steps: int) -> None:
        """One optimiser step on ``batch`` (by ``step``: :meth:`_step` or its graphed replay); its loss is added to
        the running sum (checked in :meth:`_mean_loss`)."""
        cfg = self.config
        factor = self._lr_factor(state.step, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        if self.distributed:
            batch = D.shard_batch(batch, D.rank(), D.world_size())
        loss = step(self.to_device(batch))
        state.step += 1
        detached = loss.detach().float()
        self._running = detached if self._running is None else self._running + detached
        self._n_running += 1

    def _step(self, forward: Callable[[Batch], torch.Tensor], batch: Batch, cache: bool = True) -> torch.Tensor:
        """Forward, backward, clipping and the optimiser's update for a batch on the device; the loss."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast(cache):
            loss = forward(batch)
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
        return loss

    def _mean_loss(self, state: TrainingState) -> float:
        """The mean loss since the last history row, over the ranks (0 without steps); a loss that is not finite is
        one clear error, raised here, once per row, rather than after every step."""
        if self._running is None:
            return 0.0
        value = D.mean_across_ranks(float(self._running) / self._n_running)  # the same on every rank
        if not math.isfinite(value):
            raise DataError(f"{self.config.desc}: the loss became {value} by step {state.step}; "
                            "lower lr or raise grad_clip")
        return value

    def _validate(self, state: TrainingState, validate: Callable[[], dict[str, float]] | None, start: float,
                  bar: Any) -> bool:
        """Append a history row (loss since the last row, validation scores and the seconds they took), keep the
        best weights, call the callbacks; True when the validation metric improved."""
        metric = self.config.metric
        loss = self._mean_loss(state)  # waits for the queued steps, so the time below counts them
        row = {"epoch": state.epoch, "step": state.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - start}
        self._running, self._n_running = None, 0
        improved = False
        if validate is not None:
            self.module.eval()
            began = time.perf_counter()
            # in float32, as the fitted model scores: under bfloat16 autocast the item scores round to 8 bits and
            # tie by the dozen at the top, which moved the validated target's rank for about 1 user in 10
            with torch.no_grad():
                scores = validate()
            row["validation_seconds"] = time.perf_counter() - began  # the metrics are floats: the device is done
            self.module.train()
            scores = D.broadcast_object(scores)  # every rank takes the same early-stopping decisions
            if metric not in scores:
                raise DataError(f"validation metric {metric!r} is not among {sorted(scores)}")
            row.update({f"valid_{k}": float(v) for k, v in scores.items()})
            value = float(scores[metric])
            if state.best is None or value > state.best + 1e-9:
                state.best, state.best_step, state.best_epoch = value, state.step, row["epoch"]
                state.seconds_to_best, state.bad = row["seconds"], 0
                self._best_weights = self._snapshot()
                improved = True
            else:
                state.bad += 1
            bar.set_postfix(loss=f"{row['loss']:.4f}", **{metric: f"{value:.4f}"})
        state.history.append(row)
        for callback in self.callbacks:
            try:
                callback(dict(row))
            except StopTraining:
                state.halted = True
        return improved

    def _checkpoint(self, ckpt: Path | None, state: TrainingState, start: float, improved: bool) -> None:
        if ckpt is None or not self.main:
            return
        state.elapsed = time.perf_counter() - start
        info = {**state.to_json(), "run": self._identity}
        save_checkpoint(ckpt / "last", self.module, self.optimizer, info)
        if improved:
            save_checkpoint(ckpt / "best", self.module, None, info)

    def _should_stop(self, state: TrainingState, validating: bool) -> bool:
        patience = self.config.patience
        return state.halted or (validating and bool(patience) and state.bad >= patience)

    # ------------------------------------------------------------------ the loop
    def fit(
        self,
        loss_fn: Callable[[Batch], torch.Tensor],
        batches: Callable[[int, np.random.Generator], Iterator[Batch]],
        steps_per_epoch: int,
        validate: Callable[[], dict[str, float]] | None = None,
        graphs: bool = False,
        identity: dict[str, Any] | None = None,
    ) -> TrainingResult:
        """Run the loop; afterwards ``module`` holds the best validated weights (or the last ones without
        validation). Each epoch's batch order comes from a generator seeded by (seed, epoch) and dropout from a
        torch seed derived the same way, so a run resumed from an epoch-end checkpoint retraces an uninterrupted
        one. With ``deterministic`` the kernels are too (:func:`~recforge.core.device.deterministic_algorithms`),
        so GPU runs repeat.

        ``graphs=True`` says that ``loss_fn`` never waits for the device and keeps its shapes for batches of one
        shape: where :attr:`can_graph`, the steps are then replayed from a CUDA graph.

        The epochs' seeds reach torch's generators, the training GPU's included: the caller's states are restored
        afterwards.

        ``identity`` (JSON-able, e.g. :func:`run_identity`) says what this run is: its checkpoints record it with
        the trainer's settings and the steps per epoch, and a run resumes only from a checkpoint that recorded
        the same."""
        steps_per_epoch = max(1, steps_per_epoch)
        cfg = self.config
        self._identity = json.loads(json.dumps({
            "trainer": {k: getattr(cfg, k) for k in ("optimizer", "lr", "weight_decay", "schedule", "warmup_steps",
                                                     "grad_clip", "metric", "seed")},
            "steps_per_epoch": steps_per_epoch, **(identity or {}),
            # a decaying learning rate follows the total steps: then the epochs are part of what the run is
            **({"epochs": cfg.epochs} if cfg.schedule != "constant" else {})}, default=str))
        with caller_rng_kept(self.device), deterministic_algorithms(self.config.deterministic):
            return self._fit(loss_fn, batches, steps_per_epoch, validate, graphs and self.can_graph)

    def _fit(
        self,
        loss_fn: Callable[[Batch], torch.Tensor],
        batches: Callable[[int, np.random.Generator], Iterator[Batch]],
        steps_per_epoch: int,
        validate: Callable[[], dict[str, float]] | None,
        graphs: bool,
    ) -> TrainingResult:
        cfg = self.config
        total_steps = cfg.epochs * steps_per_epoch
        ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        state = self._restore(ckpt, steps_per_epoch)
        start = time.perf_counter() - state.elapsed
        forward = D.wrap_ddp(self.module, loss_fn, self.device) if self.distributed else loss_fn
        step: Callable[[Batch], torch.Tensor] = functools.partial(self._step, forward)
        if graphs:
            step = GraphedStep(functools.partial(self._step, forward, cache=False), self.device, self._capturable)
        bar = progress_bar(total=total_steps, initial=state.step, desc=cfg.desc, unit="step",
                           enabled=cfg.progress and self.main, leave=False)
        validating = validate is not None
        self.module.train()
        while state.epoch < cfg.epochs and not state.stopped:
            rng = np.random.default_rng([cfg.seed, state.epoch])
            seed_torch(cfg.seed * 1_000_003 + state.epoch, self.device)
            skip = state.step - state.epoch * steps_per_epoch  # steps of this epoch already done before a resume
            for i, batch in enumerate(batches(state.epoch, rng)):
                if i < skip:
                    continue
                self._train_step(step, batch, state, total_steps)
                bar.update(1)
                if cfg.progress and self.main and not validating and self._n_running % _POSTFIX_EVERY == 0:
                    bar.set_postfix(loss=f"{float(self._running) / self._n_running:.4f}")
                if cfg.validate_every and state.step % cfg.validate_every == 0:
                    improved = self._validate(state, validate, start, bar)
                    state.stopped = self._should_stop(state, validating)  # saved too: a resume does not go on
                    self._checkpoint(ckpt, state, start, improved)
                    if state.stopped:
                        break
            if state.stopped:
                break
            state.epoch += 1
            if not cfg.validate_every or not validating:
                improved = self._validate(state, validate, start, bar) if (not cfg.validate_every or
                                                                            self._n_running) else False
                state.stopped = self._should_stop(state, validating)
                self._checkpoint(ckpt, state, start, improved)
        bar.close()
        return self._finish(state, start, ckpt, steps_per_epoch)

    def _capturable(self) -> None:
        """Let a CUDA graph record the optimiser's step (torch refuses to capture it otherwise)."""
        if self.device.type == "cuda":  # torch rejects capturable state off an accelerator (the CPU stand-in)
            for group in self.optimizer.param_groups:
                group["capturable"] = True

    def _finish(self, state: TrainingState, start: float, ckpt: Path | None, steps_per_epoch: int) -> TrainingResult:
        """Restore the best weights and describe the run."""
        seconds = time.perf_counter() - start
        # a replayed step left the gradients in its graph's memory pool: free them with the graph
        self.optimizer.zero_grad(set_to_none=True)
        if self._best_weights is not None:
            self.module.load_state_dict(self._best_weights)
        self.module.eval()
        history = pd.DataFrame(state.history)
        metric = self.config.metric
        if ckpt is not None and self.main:
            write_training_curves(history, ckpt, metric)
        tuned = None
        detail = None
        if state.best is not None:
            tuned = max(1, math.ceil(state.best_step / steps_per_epoch))
            detail = f"best validation {metric} {state.best:.4f} at epoch {state.best_epoch}"
            log.info("%s: best %s %.5f at epoch %s (step %s, %.1fs); %d steps in %.1fs", self.config.desc, metric,
                     state.best, state.best_epoch, state.best_step, state.seconds_to_best, state.step, seconds)
        elif state.history:
            detail = f"final loss {state.history[-1].get('loss', float('nan')):.5g}"
        if self.config.progress and self.main:
            sys.stderr.write(fit_summary(self.config.desc, state.epoch, seconds, detail) + "\n")
        return TrainingResult(history, state.best, state.best_step, state.best_epoch, state.seconds_to_best, seconds,
                              state.step, state.stopped, tuned, {"config": asdict(self.config),
                                                                 "world_size": D.world_size()})


def keep_training_result(model: Any, result: TrainingResult) -> None:
    """Store a training run on the model as fitted attributes: ``training_history_``, ``best_epoch_``,
    ``best_score_``, ``seconds_to_best_``, ``stopped_early_``, ``loss_history_`` and, after early stopping on
    validation, ``tuned_params_ = {"epochs": ...}`` (what a refit on train + validation should train for)."""
    if result.tuned_epochs is not None:
        model.tuned_params_ = {"epochs": int(result.tuned_epochs)}
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
