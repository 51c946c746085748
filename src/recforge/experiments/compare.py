"""``compare`` and ``evaluate``: thin fronts of the fitting pipeline for a list of models or one model.

Both build an :class:`~recforge.experiments.config.ExperimentConfig` and run it with the
:class:`~recforge.experiments.runner.ExperimentRunner`, so a model compared here is tuned, refitted and tested
exactly as in ``recforge run`` and the benchmarks.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from recforge.data.interactions import Interactions
from recforge.errors import DataError
from recforge.evaluation.protocols import get_protocol
from recforge.experiments.config import ExperimentConfig
from recforge.experiments.runner import ExperimentResult, ExperimentRunner
from recforge.models import get_model_class

#: Trials per model when ``compare``/``evaluate`` tune (the model's defaults and seven proposals): keeps the default
#: ``recforge compare`` on the embedded data within a few minutes on 2 cores.
DEFAULT_TUNE_TRIALS = 8


def dataset_slug(dataset: Any) -> str:
    """A folder-friendly name of a dataset (``ml-latest-small``, ``ml-100k``, ``files-<train file>``)."""
    if isinstance(dataset, dict):
        name = f"files-{Path(str(dataset['train'])).stem}" if "train" in dataset else str(dataset.get("name"))
    else:
        name = Path(str(dataset)).name.removesuffix(".zip") or str(dataset)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "data"


def compare(
    data: Interactions | str | os.PathLike[str] | Mapping[str, Any],
    models: Sequence[str] | Mapping[str, Mapping[str, Any]],
    protocol: str = "loo",
    k: int | Sequence[int] | None = None,
    seed: int = 0,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    metrics: Sequence[str] | None = None,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    workers: int = 1,
    backend: str = "auto",
    validation: str = "warm",
    rank_rating_models: bool = False,
    exclude_seen: bool = True,
    dedupe: str | None = None,
    keep_models: bool = False,
    name: str = "compare",
    tune: bool = False,
    tune_trials: int | None = DEFAULT_TUNE_TRIALS,
    tune_seconds: float | None = None,
    metric: str | None = None,
) -> ExperimentResult:
    """Fit, tune and test several models on the same split(s) through the fitting pipeline.

    ``data``: interactions, a dataset name or path, or split files ``{"train": ..., "test": ...}``. ``models``:
    registry names (``params`` maps a name to constructor arguments) or a mapping label → ``{"name": ...,
    "params": {...}, "grid": {...}}`` (a grid, or an Optuna ``space``, is tuned on the validation part). ``out``: the results folder (trials saved, resumable); None: a temporary one.
    ``validation``: ``warm`` (default: models early-stopped on validation continue on train + validation for a
    tenth of their epochs), ``refit`` (from scratch), ``reuse`` or ``off`` (see :mod:`recforge.experiments.runner`);
    ``exclude_seen``: leave each user's training items out of the rankings; ``dedupe`` (``first``, ``last``,
    ``sum``, ``mean``): keep one event per (user, item) pair before splitting; ``keep_models``: hand back the final
    fitted models (``result.models``; they are fitted in this process). Rating models are skipped (with a
    warning) on data without ratings. ``tune``: models given without a grid or space are tuned on validation in
    their own ``search_space`` (their defaults first), ``tune_trials`` trials and/or ``tune_seconds`` each; split
    files without a validation file then have one carved from TRAIN. ``metric``: what the leaderboard is sorted
    by and models are tuned on (default: the protocol's first metric, e.g. ``ndcg@10``).
    """
    specs: list[dict[str, Any]] = []
    if isinstance(models, Mapping):
        for label, spec in models.items():
            specs.append({"label": label, "name": spec.get("name", label), "params": dict(spec.get("params") or {}),
                          **{key: dict(spec[key]) for key in ("grid", "space") if spec.get(key)}})
    else:
        for m in models:
            specs.append({"name": str(m), "params": dict((params or {}).get(str(m), {}))})
    if not progress:
        for spec in specs:
            spec["params"].setdefault("progress", False)
    in_memory = isinstance(data, Interactions)
    dataset = f"in-memory:{data.fingerprint()}" if in_memory else data  # type: ignore[arg-type]
    raw = {"name": name, "dataset": dict(dataset) if isinstance(dataset, Mapping) else str(dataset),
           "protocol": protocol, "models": specs, "seed": seed, "validation": validation,
           "rank_rating_models": rank_rating_models, "workers": workers, "exclude_seen": exclude_seen,
           "tune": tune, "search": {"n_trials": tune_trials, "timeout": tune_seconds}}
    if dedupe is not None:
        raw["filters"] = {"deduplicate": dedupe}
    if k is not None:
        raw["k"] = [k] if isinstance(k, int) else list(k)
    # tuned on what the leaderboard ranks by (the protocol's first column for these list lengths)
    scoring = get_protocol(protocol)
    available = scoring.default_metrics(raw.get("k") or scoring.ks)
    if metric is not None and metric not in available:
        raise DataError(f"cannot sort by {metric!r} under the {scoring.name} protocol; its metrics: "
                        f"{', '.join(available)}")
    raw["select_metric"] = metric or available[0]
    if metrics:
        raw["metrics"] = list(metrics)
    cfg = ExperimentConfig.from_dict(_drop_progress_where_unknown(raw))
    with tempfile.TemporaryDirectory(prefix="recforge-compare-") as tmp:
        runner = ExperimentRunner(cfg, tmp if out is None else out, progress=progress, backend=backend,
                                  data=data if in_memory else None, keep_models=keep_models)
        return runner.run()


def _drop_progress_where_unknown(raw: dict[str, Any]) -> dict[str, Any]:
    """``progress=False`` only for models that have the parameter (quiet runs silence their training bars)."""
    for spec in raw["models"]:
        if "progress" not in get_model_class(spec["name"])._param_names():
            spec["params"].pop("progress", None)
    return raw
