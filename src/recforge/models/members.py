"""Member models of ensembles (rating blend, score blend, slate mixing): creation, shared state and persistence."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np

from recforge.core.params import Custom
from recforge.data.interactions import Interactions
from recforge.errors import ArtifactError, ParameterError
from recforge.models.artifact import check_state
from recforge.models.base import Recommender, without_local_params
from recforge.models.registry import get_model_class

#: Settings an ensemble passes down to members that take them, unless the member's own params say otherwise.
SHARED_SETTINGS = ("seed", "progress", "num_threads")
#: The ``params`` of an ensemble: member name -> that member's hyper-parameters.
MEMBER_PARAMS = Custom(
    lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(p, dict) for k, p in v.items()),
    "a mapping of member model names to parameter dicts",
    ("ease", {"ease": 3}, [1]),
    optional=True,
)


def accepts(cls: type, name: str) -> bool:
    """Whether ``cls``'s constructor takes a parameter ``name``."""
    return name in inspect.signature(cls.__init__).parameters


def build_member(name: str, params: dict[str, Any] | None, parent: Recommender, owner: str,
                 defaults: dict[str, Any] | None = None, stage: str | None = None) -> Recommender:
    """An unfitted member ``name`` with ``params`` over ``defaults``; shared settings come from ``parent``.

    ``stage`` names the fit when an ensemble fits its members more than once (tuning, then on all the data): a
    member's ``checkpoint_dir`` gets a ``<name>-<stage>`` folder below it, so each fit resumes only itself.
    Unknown parameter names raise :class:`ParameterError` naming the ensemble (``owner``) and the valid ones.
    """
    cls = get_model_class(name)
    given = {**(defaults or {}), **(params or {})}
    for shared in SHARED_SETTINGS:
        if shared not in given and accepts(cls, shared) and hasattr(parent, shared):
            given[shared] = getattr(parent, shared)
    if stage and isinstance(given.get("checkpoint_dir"), str) and given["checkpoint_dir"]:
        given["checkpoint_dir"] = str(Path(given["checkpoint_dir"]) / f"{name}-{stage}")
    try:
        return cls(**cls.check_param_names(given))
    except ParameterError as exc:
        raise ParameterError(f"{owner} for {name!r}: {exc}") from None


def sync_member(parent: Recommender, member: Recommender) -> None:
    """Share the ensemble's id maps, seen items and titles with a member (they were fitted on the same data)."""
    member.user_map_, member.item_map_ = parent.user_map_, parent.item_map_
    member.seen_ = parent.seen_
    member.item_titles_ = getattr(parent, "item_titles_", None)


def members_state(members: list[Recommender]) -> dict[str, Any]:
    """The members' names, parameters and fitted arrays, flattened under ``m{i}.`` prefixes."""
    state: dict[str, Any] = {"members": json.dumps([{"name": m.name, "params": m.get_params()} for m in members])}
    for i, member in enumerate(members):
        for key, value in member._state().items():
            state[f"m{i}.{key}"] = value
    return state


def restore_members(parent: Recommender, state: dict[str, Any]) -> list[Recommender]:
    """Rebuild the members saved by :func:`members_state`, sharing ``parent``'s maps and seen items; each member's
    parameters and arrays are checked as a whole artifact's are."""
    specs = json.loads(state["members"])
    if not isinstance(specs, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                              and isinstance(s.get("params"), dict) for s in specs):
        raise ArtifactError("the saved members must be a list of {name, params} objects")
    sizes = {"users": parent.n_users_, "items": parent.n_items_}
    out = []
    for i, spec in enumerate(specs):
        cls = get_model_class(spec["name"])
        try:
            member = cls(**without_local_params(cls.check_param_names(dict(spec["params"]))))
            member.check_params()
        except ParameterError as exc:
            raise ArtifactError(f"member {i} ({spec['name']}): {exc}") from None
        sync_member(parent, member)
        prefix = f"m{i}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        arrays = {k: v for k, v in own.items() if isinstance(v, np.ndarray)}
        scalars = {k: v for k, v in own.items() if not isinstance(v, np.ndarray)}
        check_state(arrays, scalars, cls.state_shapes, cls.state_indices, sizes, f"member {i} ({spec['name']})")
        member._load_state(own)
        member._check_loaded()
        out.append(member)
    return out


class EnsembleUpdates:
    """Mixin for ensembles holding fitted ``members_``: incremental updates are passed on to every member.

    Put it before the Recommender base class so that its ``supports_partial_fit`` property wins.
    """

    members_: list[Recommender]

    @property
    def learns_from(self) -> str:
        """What the members learn from, joined by ``+`` (once fitted; before, ``"members"``)."""
        members = getattr(self, "members_", None)
        return "+".join(sorted({m.learns_from for m in members})) if members else "members"

    @property
    def supports_partial_fit(self) -> bool:
        """True once fitted when every member supports incremental updates."""
        members = getattr(self, "members_", None)
        return bool(members) and all(m.supports_partial_fit for m in members)

    @property
    def member_weights_(self) -> dict[str, float]:
        """The fitted ``weights_`` of a weighting ensemble by member name (a repeated name gets ``#2``, ``#3``)."""
        out: dict[str, float] = {}
        for member, weight in zip(self.members_, self.weights_):  # type: ignore[attr-defined]
            key, n = member.name, 1
            while key in out:
                n += 1
                key = f"{member.name}#{n}"
            out[key] = float(weight)
        return out

    def _grow(self, n_new_users: int, n_new_items: int) -> None:
        for member in self.members_:
            sync_member(self, member)  # type: ignore[arg-type]
            member._grow(n_new_users, n_new_items)

    def _partial_fit(self, new: Interactions) -> None:
        for member in self.members_:
            member._partial_fit(new)
