"""The hot path of ``GET /recommend``: a plainly well-formed request is answered from the ASGI scope, without the
framework's routing, dependency and validation layers (about a third of a request's CPU time).

It is only a shortcut: whatever it is not sure of (a missing or repeated parameter, a value the route would have
to convert or refuse, a missing or wrong key, ``exclude_seen=false`` where that is not allowed) falls through to
the FastAPI route, which answers exactly as ``/openapi.json`` documents. Both end in the same
``Service.recommend``.
"""

from __future__ import annotations

import re
import secrets
from typing import Any
from urllib.parse import parse_qsl

#: Longest ``user`` query value the route accepts (ids proper are bounded by ``Limits.max_id_length``).
MAX_USER_CHARS = 200
_K = re.compile(r"[1-9][0-9]{0,3}")
_FLAGS = {"true": True, "1": True, "false": False, "0": False}


def recommend_query(query_string: bytes, max_k: int) -> tuple[str, int, bool] | None:
    """``(user, k, exclude_seen)`` from a ``GET /recommend`` query string, or ``None`` when the route must judge
    it. Decoded as Starlette does (latin-1, then percent-decoding as UTF-8)."""
    values: dict[str, str] = {}
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key in values:
            return None
        values[key] = value
    user, k, flag = values.get("user"), values.get("k", "10"), values.get("exclude_seen", "true")
    if user is None or not 1 <= len(user) <= MAX_USER_CHARS or flag not in _FLAGS:
        return None
    if not _K.fullmatch(k) or int(k) > max_k:
        return None
    return user, int(k), _FLAGS[flag]


def first_header(scope: dict[str, Any], name: bytes) -> bytes | None:
    """The first value of a (lower-case) header in an ASGI scope, as raw bytes."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def key_matches(given: bytes | None, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys`` (constant-time per key; any bytes, so any UTF-8 key works)."""
    return given is not None and any(secrets.compare_digest(given, key) for key in keys)
