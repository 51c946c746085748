"""Pickle-free persistence of torch state: tensors go to safetensors, everything else to JSON.

``torch.save`` writes pickles, which can run code when loaded; recforge never reads one. A model's
``state_dict`` is a flat mapping of tensors and maps straight onto safetensors. An optimizer's state dict nests
per-parameter tensors and plain values; :func:`flatten_optimizer_state` splits it into a tensor mapping and a JSON
document, and :func:`load_checkpoint` puts it back together. A checkpoint is read like any file from outside:
every part is checked against the live model and optimiser before it is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recforge.data.io import atomic_directory
from recforge.errors import ArtifactError


def state_to_numpy(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, np.ndarray]:
    """A module's ``state_dict`` as contiguous numpy arrays (on the CPU), keys prefixed."""
    return {prefix + k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in state.items()}


def numpy_to_state(arrays: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of :func:`state_to_numpy`: the arrays whose key starts with ``prefix``, as tensors."""
    return {k[len(prefix) :]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(prefix)}


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param>.<name>``) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


#: Adam's per-parameter state: the moment estimates (the parameter's shape) and the step count (a scalar).
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_NONNEGATIVE = ("exp_avg_sq", "max_exp_avg_sq", "step")


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_module_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`ArtifactError` (one line, the first problem) unless ``tensors`` is a state ``module`` can
    load as it is: the same names, shapes and dtypes as its own, and no NaN or infinite floating value (loading
    would cast a wrong dtype silently, and non-finite weights score nothing)."""
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in tensors], [k for k in tensors if k not in own]
    if missing or unexpected:
        parts = ([f"lacks {_names(missing)}"] if missing else []) + ([f"has unknown {_names(unexpected)}"]
                                                                      if unexpected else [])
        raise ArtifactError(f"the saved network {' and '.join(parts)}")
    for key, value in tensors.items():
        ref = own[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise ArtifactError(f"the saved network's {key} has shape {tuple(value.shape)}; this model's is "
                                f"{tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            raise ArtifactError(f"the saved network's {key} is {value.dtype}; this model's is {ref.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ArtifactError(f"the saved network's {key} holds NaN or infinite values")


def load_module_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``tensors`` into ``module`` after :func:`check_module_state`."""
    check_module_state(module, tensors)
    module.load_state_dict(tensors)


def _moment_bound(betas: Any) -> float | None:
    """How far Adam's first moment can lie from the root of its second, ``|m| ≤ C·√v``, whatever the gradients
    (Cauchy–Schwarz on the two running means, both started at 0): ``C² = (1−β₁)² / ((1−β₂)(1−β₁²/β₂))``; None
    where the betas allow no bound."""
    b1, b2 = (float(b) for b in betas)
    if not (0 <= b1 < 1 and 0 < b2 < 1 and b1 * b1 < b2):
        return None
    return (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))


def _plausible_moments(entries: dict[str, Any], betas: Any, max_grad: float | None) -> str | None:
    """What is wrong with one parameter's Adam moments, or None: moments no gradients could have made (finite
    values can still blow the weights up on the next step, or freeze them)."""
    m, v = entries["exp_avg"].double(), entries["exp_avg_sq"].double()
    bound = _moment_bound(betas)
    if bound is not None and bool((m.abs() > bound * v.sqrt() * (1 + 1e-3) + 1e-30).any()):
        return "a first moment larger than its second moment allows"
    if max_grad is not None and bool((m.abs() > max_grad * 1.01).any() or (v > max_grad * max_grad * 1.01).any()):
        return f"moments of gradients above the clipping norm {max_grad:g}"
    if "max_exp_avg_sq" in entries and bool((entries["max_exp_avg_sq"].double() < v * (1 - 1e-6)).any()):
        return "a running maximum below its second moment"
    return None


def _checked_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                             meta: Any, max_grad: float | None = None) -> dict[str, Any]:
    """The optimiser state dict a checkpoint's two parts describe, checked against the live ``optimizer``: the
    same groups and parameters, every moment shaped as its parameter, finite, the second moments and step counts
    not negative, the moments such as gradients make (bounded by ``max_grad`` when every gradient entry was).
    Only the state comes from the checkpoint: the groups' settings (learning rate, betas, weight decay, the fused
    or capturable implementation) are the live optimiser's, i.e. this run's."""
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise ArtifactError("its optimizer entry is not a parameter-group list")
    if meta.get("plain"):  # Adam keeps only tensors (flatten_optimizer_state writes plain values for others)
        raise ArtifactError("its optimizer state holds plain values, which this optimizer does not keep")
    live_groups = optimizer.param_groups
    if len(meta["param_groups"]) != len(live_groups):
        raise ArtifactError(f"its optimizer has {len(meta['param_groups'])} parameter groups; this one "
                            f"{len(live_groups)}")
    groups, params, group_of = [], {}, {}
    for live, saved in zip(live_groups, meta["param_groups"]):
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]) or len(set(ids)) != len(ids) \
                or not all(type(i) is int and i not in params for i in ids):
            raise ArtifactError("its optimizer's parameter groups do not list this model's parameters")
        params.update(zip(ids, live["params"]))
        group_of.update(dict.fromkeys(ids, live))
        groups.append({**{k: v for k, v in live.items() if k != "params"}, "params": ids})
    amsgrad = any(g.get("amsgrad") for g in live_groups)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        kind, pid, name = (key.split(".", 2) + ["", ""])[:3]
        param = params.get(int(pid)) if kind == "state" and pid.isdigit() else None
        if param is None or name not in (*_MOMENTS, "step") or (name == "max_exp_avg_sq" and not amsgrad):
            raise ArtifactError(f"its optimizer state holds {key!r}, which this optimizer has no use for")
        shape = () if name == "step" else tuple(param.shape)
        if tuple(value.shape) != shape or not value.is_floating_point():
            raise ArtifactError(f"its optimizer's {key} is a {value.dtype} of shape {tuple(value.shape)}; "
                                f"expected floats of shape {shape}")
        finite = bool(torch.isfinite(value).all())
        if not finite or (name in _NONNEGATIVE and bool((value < 0).any())):
            raise ArtifactError(f"its optimizer's {key} holds {'negative' if finite else 'NaN or infinite'} values")
        state.setdefault(int(pid), {})[name] = value
    needed = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    for pid, entries in state.items():
        if not needed <= entries.keys():
            raise ArtifactError(f"its optimizer state of parameter {pid} lacks {sorted(needed - entries.keys())}")
        problem = _plausible_moments(entries, group_of[pid].get("betas", (0.9, 0.999)), max_grad)
        if problem:
            raise ArtifactError(f"its optimizer state of parameter {pid} holds {problem}")
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: dict[str, Any],
) -> Path:
    """Write ``model.safetensors``, ``optimizer.safetensors`` and ``trainer.json`` (``info`` under
    ``"trainer"``) into ``path`` atomically."""
    with atomic_directory(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        meta: dict[str, Any] = {"trainer": info}
        if optimizer is not None:
            tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta["optimizer"] = opt_meta
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    return Path(path)


def _read_meta(p: Path) -> dict[str, Any]:
    meta = json.loads((p / "trainer.json").read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("trainer"), dict):
        raise ArtifactError("trainer.json does not hold a 'trainer' object")
    return meta


def _unusable(p: Path, exc: Exception) -> ArtifactError:
    """One line for a checkpoint that cannot be read: the first line of the reason (torch's run to dozens)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ArtifactError(f"{str(p)!r} is not a usable training checkpoint: {reason}"[:500])


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The ``"trainer"`` object of the checkpoint at ``path`` (as saved, for its reader to check), without loading
    any tensor; an unreadable checkpoint is one :class:`ArtifactError` line."""
    p = Path(path)
    try:
        return _read_meta(p)["trainer"]
    except (ArtifactError, OSError, ValueError, RecursionError) as exc:
        raise _unusable(p, exc) from None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
    max_grad: float | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``), everything
    checked first (:func:`check_module_state`, the optimiser state against ``optimizer``, its moments against
    ``max_grad`` when the run clipped every gradient entry to it); returns the ``"trainer"`` object stored with
    it, unchecked (its reader knows what it must hold). Any problem is one :class:`ArtifactError` line naming the
    checkpoint."""
    p = Path(path)
    try:
        meta = _read_meta(p)
        device = next(model.parameters()).device
        load_module_state(model, load_file(str(p / "model.safetensors"), device=str(device)))
        if optimizer is not None:
            if "optimizer" not in meta:
                raise ArtifactError("it holds no optimizer state to resume from")
            tensors = load_file(str(p / "optimizer.safetensors"), device=str(device))
            optimizer.load_state_dict(_checked_optimizer_state(optimizer, tensors, meta["optimizer"], max_grad))
    except (ArtifactError, OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # RecursionError too
        raise _unusable(p, exc) from None
    return meta["trainer"]
