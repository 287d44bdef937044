"""Every route against its own OpenAPI schema (schemathesis): generated requests, good and
bad, never get a 5xx, and every response conforms to what the schema says."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from servers import start_server

KEY = "schema-key-0123456789"


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    limits = ["--max-tokens", "16", "--max-n", "2", "--max-prompt-tokens", "256", "--queue", "64"]
    server = start_server(tmp_path_factory.mktemp("schema") / "data", "--api-key", KEY, *limits)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema.config.generation.update(modes=list(GenerationMode))  # requests that fit the schema, and ones that do not
    yield schema
    server.stop()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_keeps_to_its_schema(case):
    case.call_and_validate(
        headers={"Authorization": f"Bearer {KEY}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
        timeout=60,
    )
