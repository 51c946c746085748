"""The published API description is the service: schemathesis generates valid and invalid requests from
``/openapi.json`` (every check, positive and negative data) against an integer-id and a string-id model, and every
answer must match what the description promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from recforge.data import Interactions
from recforge.models import create_model
from recforge.serve import create_app

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")


def _schema(model: str, data: Interactions, root: Path):
    path = root / model
    create_model(model).fit(data).save(path)
    app = create_app(path, feedback_dir=root / f"{model}-fb", api_key="w", apply_seconds=0)
    # A body over the size limit is refused unread with 413 (documented on every route), a rejection like 422.
    from schemathesis.config import SchemathesisConfig

    rejections = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
    config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": rejections}}})
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


def _string_ids(planted: Interactions) -> Interactions:
    frame = planted.to_frame()
    frame["user_id"] = "u" + frame["user_id"].astype(str)
    frame["item_id"] = "i" + frame["item_id"].astype(str)
    return Interactions.from_frame(frame)


@pytest.fixture(scope="module")
def schemas(planted: Interactions, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("schema")
    return {"int ids (ease)": _schema("ease", planted, root), "string ids (pop)": _schema("pop", _string_ids(planted), root)}


@pytest.mark.parametrize("which", ["int ids (ease)", "string ids (pop)"])
def test_every_operation_keeps_its_published_contract(schemas: dict, which: str) -> None:
    schema = schemas[which]
    settings = hypothesis.settings(max_examples=25, deadline=None, database=None, derandomize=True,
                                   suppress_health_check=list(hypothesis.HealthCheck))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/recommend", "/feedback", "/health", "/metrics"}
    for operation in operations:
        for mode in schemathesis.GenerationMode:  # schema-valid data must be served, invalid data refused (4xx)
            @settings
            @hypothesis.given(case=operation.as_strategy(mode))
            def check(case) -> None:
                case.call_and_validate(headers={"X-API-Key": "w"})

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                assert mode is schemathesis.GenerationMode.NEGATIVE  # nothing to break in a request without input


@pytest.mark.parametrize("which", ["int ids (ease)", "string ids (pop)"])
def test_linked_call_sequences_keep_the_contract(schemas: dict, which: str) -> None:
    """Stateful: sequences that follow the published links (a list → similar items and feedback on its first
    item → that user's next list) with real ids from earlier answers, each answer checked against the description."""
    schema = schemas[which]
    links = [op.get("responses", {}).get("200", {}).get("links", {}) for ops in schema.raw_schema["paths"].values()
             for op in ops.values()]
    assert sum(map(len, links)) >= (4 if which.startswith("int") else 2)

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case):  # type: ignore[no-untyped-def]
            return {"headers": {"X-API-Key": "w"}}

    Workflow.run(settings=hypothesis.settings(max_examples=20, stateful_step_count=6, deadline=None, database=None,
                                              derandomize=True, suppress_health_check=list(hypothesis.HealthCheck)))
