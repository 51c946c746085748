"""Pickle-free persistence of torch state: tensors go to safetensors, everything else to JSON.

``torch.save`` writes pickles, which can run code when loaded; recforge never reads one. A model's
``state_dict`` is a flat mapping of tensors and maps straight onto safetensors. An optimizer's state dict nests
per-parameter tensors and plain values; :func:`flatten_optimizer_state` splits it into a tensor mapping and a JSON
document, and :func:`unflatten_optimizer_state` puts it back together.
"""

from __future__ import annotations

import json
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


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state dict from :func:`flatten_optimizer_state`'s two parts."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta.get("plain", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


#: Optimiser settings that say how the update runs here (fused kernel, steps on the device), not what it computes.
_IMPLEMENTATION = ("fused", "capturable", "foreach", "differentiable")


def _keep_implementation(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Give the saved parameter groups this optimiser's implementation settings before loading: a checkpoint
    written on the CPU must not turn a GPU run's fused, capturable update (what a CUDA graph records) back into
    the plain one; torch places the step counts by these settings as it loads."""
    for live, group in zip(optimizer.param_groups, saved["param_groups"]):
        for key in _IMPLEMENTATION:
            if key in live:
                group[key] = live[key]


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: dict[str, Any],
) -> Path:
    """Write ``model.safetensors``, ``optimizer.safetensors`` and ``trainer.json`` into ``path`` atomically."""
    with atomic_directory(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        meta: dict[str, Any] = {"trainer": info}
        if optimizer is not None:
            tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta["optimizer"] = opt_meta
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    return Path(path)


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the trainer info stored with it."""
    p = Path(path)
    try:
        meta = json.loads((p / "trainer.json").read_text())
        device = next(model.parameters()).device
        model.load_state_dict(load_file(str(p / "model.safetensors"), device=str(device)))
        if optimizer is not None and "optimizer" in meta:
            tensors = load_file(str(p / "optimizer.safetensors"), device=str(device))
            saved = unflatten_optimizer_state(tensors, meta["optimizer"])
            _keep_implementation(optimizer, saved)
            optimizer.load_state_dict(saved)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ArtifactError(f"{str(p)!r} is not a usable training checkpoint: {exc}") from None
    return meta["trainer"]
