"""Checks of a model artifact before any of it is used: an artifact may be damaged, edited or come from elsewhere,
and its arrays feed kernels that index memory without bounds checks.

An artifact folder holds ``model.json`` (class, parameters, scalars, the SHA-256 of the two array files),
``arrays.safetensors`` and ``ids.npz``. Loading verifies the hashes, the structure of ``model.json``, the id maps,
and every array's dtype, shape and index range against the id maps and the model's declared state shapes
(``Recommender.state_shapes`` / ``state_indices``); any problem is one :class:`ArtifactError` line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from recforge.errors import ArtifactError

#: The array files of an artifact whose SHA-256 ``model.json`` records.
HASHED_FILES = ("arrays.safetensors", "ids.npz")

#: What ``model.json`` must hold, and the JSON types of each entry.
_META_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "params": (dict,), "scalars": (dict,), "n_users": (int,), "n_items": (int,),
    "sha256": (dict,),
}


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 (hex) of each of :data:`HASHED_FILES` in ``folder``."""
    out = {}
    for name in HASHED_FILES:
        digest = hashlib.sha256()
        with open(folder / name, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
        out[name] = digest.hexdigest()
    return out


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """``model.json``'s content, checked for the entries and types loading relies on."""
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where}: model.json must hold an object, got {type(meta).__name__}")
    for key, types in _META_TYPES.items():
        if key not in meta:
            raise ArtifactError(f"{where}: model.json lacks {key!r}")
        if not isinstance(meta[key], types) or isinstance(meta[key], bool):
            raise ArtifactError(f"{where}: model.json's {key!r} must be {types[0].__name__}, "
                                f"got {type(meta[key]).__name__}")
    if meta["n_users"] < 1 or meta["n_items"] < 1:
        raise ArtifactError(f"{where}: model.json's n_users and n_items must be positive")
    return meta


def check_hashes(folder: Path, recorded: dict[str, Any], where: str) -> None:
    """The array files' SHA-256 equal what ``model.json`` recorded at save time."""
    actual = file_hashes(folder)
    for name in HASHED_FILES:
        if recorded.get(name) != actual[name]:
            raise ArtifactError(f"{where}: {name} does not match the SHA-256 in model.json (modified or corrupt)")


def check_ids(ids: np.ndarray, n: int, what: str, where: str) -> None:
    """An id array: one dimension, ``n`` entries, integers or strings."""
    if ids.ndim != 1 or len(ids) != n:
        raise ArtifactError(f"{where}: ids.npz holds {ids.shape} {what} ids; model.json says {n}")
    if ids.dtype.kind not in "iuU":
        raise ArtifactError(f"{where}: {what} ids have dtype {ids.dtype}; expected integers or strings")


def pack_strings(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """A string array as ``{name}.utf8`` (the UTF-8 bytes of every entry, joined) and ``{name}.offsets`` (where
    each starts, and the end): fixed-width numpy strings store 4 bytes per character of the longest entry."""
    encoded = [str(v).encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return {f"{name}.utf8": np.frombuffer(b"".join(encoded), dtype=np.uint8), f"{name}.offsets": offsets}


def unpack_strings(files: Any, name: str, n: int, where: str) -> np.ndarray | None:
    """The string array :func:`pack_strings` stored under ``name`` in an opened ``ids.npz`` (``None`` if absent),
    checked: ``n`` entries, offsets rising from 0 to the byte count, valid UTF-8."""
    if f"{name}.utf8" not in files.files:
        return None
    data, offsets = files[f"{name}.utf8"], files.get(f"{name}.offsets")
    if offsets is None or data.dtype != np.uint8 or data.ndim != 1 or offsets.dtype.kind not in "iu" \
            or offsets.shape != (n + 1,):
        raise ArtifactError(f"{where}: ids.npz's {name} is not {n} packed strings")
    if offsets[0] != 0 or offsets[-1] != len(data) or (np.diff(offsets) < 0).any():
        raise ArtifactError(f"{where}: ids.npz's {name} offsets do not cover its bytes in order")
    raw = data.tobytes()
    try:
        return np.array([raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())],
                        dtype=str)
    except UnicodeDecodeError:
        raise ArtifactError(f"{where}: ids.npz's {name} is not valid UTF-8") from None


def stored_array(files: Any, key: str, n: int, where: str) -> np.ndarray | None:
    """``key`` of an opened ``ids.npz``: its packed strings, else the plain array (ids, and the titles of artifacts
    saved before strings were packed), else ``None``."""
    packed = unpack_strings(files, key, n, where)
    if packed is not None:
        return packed
    return files[key] if key in files.files else None


def check_state(arrays: dict[str, np.ndarray], scalars: dict[str, Any], shapes: dict[str, tuple[Any, ...]],
                indices: dict[str, str], sizes: dict[str, int], where: str) -> None:
    """Arrays against declared shapes and index ranges.

    ``shapes`` maps an array name to its dimensions: an int, a name in ``sizes`` (``users``, ``items``, integer
    parameters), any other name (bound by its first use, then equal wherever it recurs, e.g. the factor count of
    user and item factors) or ``None`` (any). A declared array that is absent is fine unless the model needs it
    (``_load_state`` then fails, which is reported too). ``indices`` maps an index array to what it indexes
    (a name in ``sizes``, or a bound symbol); its values must lie in ``-1 .. size - 1`` (-1 marks "none").
    No floating array may hold NaN or +inf.
    """
    bound: dict[str, int] = dict(sizes)
    bound.update({k: v for k, v in scalars.items() if isinstance(v, int) and not isinstance(v, bool)})
    for name, dims in shapes.items():
        arr = arrays.get(name)
        if arr is None:
            continue
        if arr.ndim != len(dims):
            raise ArtifactError(f"{where}: {name} has {arr.ndim} dimensions, expected {len(dims)}")
        for axis, (dim, size) in enumerate(zip(dims, arr.shape)):
            if dim is None:
                continue
            expected = dim if isinstance(dim, int) else bound.setdefault(dim, size)
            if size != expected:
                raise ArtifactError(f"{where}: {name} has shape {arr.shape}; axis {axis} must be {expected} "
                                    f"({dim})")
    for name, what in indices.items():
        arr = arrays.get(name)
        if arr is None:
            continue
        if arr.dtype.kind not in "iu":
            raise ArtifactError(f"{where}: {name} must hold integer indices, got {arr.dtype}")
        limit = bound.get(what)
        if limit is None:
            raise ArtifactError(f"{where}: cannot check {name}: the size of {what!r} is unknown")
        if arr.size and (arr.min() < -1 or arr.max() >= limit):
            raise ArtifactError(f"{where}: {name} holds indices outside -1..{limit - 1} ({what})")
    broken = nonfinite_array(arrays)
    if broken:
        raise ArtifactError(f"{where}: {broken} holds NaN or +inf values")


def nonfinite_array(arrays: dict[str, np.ndarray]) -> str | None:
    """The name of the first floating array holding NaN or +inf (never meant; -inf is the "unscored" sentinel),
    or None: what loading refuses and saving never writes."""
    return next((name for name, arr in arrays.items()
                 if arr.dtype.kind == "f" and (np.isnan(arr).any() or np.isposinf(arr).any())), None)
