"""The published API description of a service, made from the loaded model: ids typed as the model's ids (integers
within int64, or strings of bounded length), the limits the service enforces, and every error status with its
``{"detail": "..."}`` body, so a client generated from ``/openapi.json`` talks to the service as it is."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from recforge.models.base import Recommender
from recforge.serve.events import INT64_MAX, INT64_MIN, TIMESTAMP_MAX, Limits, rating_bounds


class ErrorBody(BaseModel):
    """Every error answer: one line naming the problem."""

    detail: str


#: The error statuses of each route (``responses=`` of the route decorators).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in [
        (400, "the model cannot do this (e.g. no history-based recommendations)"),
        (401, "missing or wrong X-API-Key"), (403, "not allowed on this service"), (404, "unknown user or item"),
        (409, "not reloaded: the artifact is missing or invalid; the previous model keeps serving"),
        (413, "request body too large"), (422, "a malformed or out-of-range value (named in detail)"),
        (500, "internal error (logged; no details)"), (503, "the feedback log cannot be written; nothing acknowledged"),
    ]
}


def id_schema(model: Recommender, users: bool, limits: Limits) -> dict[str, Any]:
    """The JSON schema of the model's user or item ids."""
    if (model.user_map_ if users else model.item_map_).is_string:
        return {"type": "string", "minLength": 1, "maxLength": limits.max_id_length, "pattern": "^[^\\u0000]+$"}
    return {"type": "integer", "format": "int64", "minimum": INT64_MIN, "maximum": INT64_MAX}


def install(app: FastAPI, model: Recommender, limits: Limits) -> None:
    """Make ``app.openapi()`` describe ids, limits and errors of ``model`` as served."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _specialise(spec, model, limits)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


#: How answers feed further requests (OpenAPI links; stateful clients and fuzzers follow them): the items of a
#: recommendation lead to their similar items and to feedback on them, and a user's feedback to their next list.
LINKS: list[tuple[tuple[str, str], str, tuple[str, str], dict[str, Any]]] = [
    (("/recommend", "get"), "SimilarToFirst", ("/similar/{item}", "get"),
     {"parameters": {"item": "$response.body#/items/0/item_id"}}),
    (("/recommend", "get"), "FeedbackOnFirst", ("/feedback", "post"),
     {"requestBody": {"events": [{"user": "$request.query.user", "item": "$response.body#/items/0/item_id"}]}}),
    (("/recommend", "post"), "SimilarToFirst", ("/similar/{item}", "get"),
     {"parameters": {"item": "$response.body#/items/0/item_id"}}),
    (("/feedback", "post"), "RecommendForUser", ("/recommend", "get"),
     {"parameters": {"user": "$request.body#/events/0/user"}}),
]


def _link(spec: dict[str, Any]) -> None:
    paths = spec.get("paths", {})
    for (path, method), name, (to_path, to_method), fields in LINKS:
        source, target = paths.get(path, {}).get(method), paths.get(to_path, {}).get(to_method)
        if source is None or target is None:  # the model does not serve one of them
            continue
        ok = source.setdefault("responses", {}).setdefault("200", {"description": "Successful Response"})
        ok.setdefault("links", {})[name] = {"operationId": target["operationId"], **fields}


def _specialise(spec: dict[str, Any], model: Recommender, limits: Limits) -> None:
    _link(spec)
    user, item = id_schema(model, True, limits), id_schema(model, False, limits)
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            for param in operation.get("parameters", []):
                if param["name"] == "user":
                    param["schema"] = dict(user)
                elif param["name"] == "item":
                    param["schema"] = dict(item)
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's error list; this service sends ErrorBody
        schemas.pop(name, None)
    event = schemas.get("Event", {}).get("properties", {})
    if event:
        event["user"], event["item"] = dict(user), dict(item)
        event["timestamp"] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": TIMESTAMP_MAX},
                                        {"type": "null"}], "description": "Unix seconds (default: now)"}
        low, high = rating_bounds(model)
        event["rating"] = {"anyOf": [{"type": "number", "minimum": low, "maximum": high}, {"type": "null"}]}
    history = schemas.get("HistoryBody", {}).get("properties", {})
    if history:
        history["items"]["items"] = dict(item)

