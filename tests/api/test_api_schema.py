"""Property-based fuzzing of every operation in the OpenAPI schema (schemathesis).

Requests generated from the live ``/schema/openapi.json`` (schema-valid and schema-invalid)
go to the real API process. No answer may be a server error, and every answer must match
the documented status codes, media types and response schemas.

Schemathesis' own pytest loader (``from_fixture``) does not work with this pytest release,
so each operation's Hypothesis strategy is driven here with ``@given``.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from dandelion_lib.core.config import Settings
from tests.api.conftest import ApiServer

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _cases() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) for every documented operation, read from the app itself:
    schema-valid requests everywhere, schema-invalid ones where there is input to break."""
    paths = create_app(Settings()).openapi_schema.to_schema()["paths"]
    out = []
    for path, item in sorted(paths.items()):
        for method, operation in sorted(item.items()):
            out.append((method.upper(), path, GenerationMode.POSITIVE))
            if operation.get("requestBody") or operation.get("parameters"):
                out.append((method.upper(), path, GenerationMode.NEGATIVE))
    return out


CASES = _cases()
OPERATIONS = sorted({(m, p) for m, p, _ in CASES})
IDS = [f"{m} {p} {mode}" for m, p, mode in CASES]


@pytest.fixture(scope="module")
def live_schema(api_server: ApiServer) -> Any:
    return schemathesis.openapi.from_url(f"{api_server.url}/schema/openapi.json")


def _fuzz(schema: Any, method: str, path: str, mode: GenerationMode, examples: int) -> None:
    operation = schema[path][method]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(timeout=60)
        case.validate_response(response, checks=CHECKS)

    run()


def test_every_route_is_documented() -> None:
    assert ("POST", "/predict") in OPERATIONS and ("POST", "/admin/reload") in OPERATIONS
    assert len(OPERATIONS) == 8
    assert ("POST", "/predict", GenerationMode.NEGATIVE) in CASES


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=IDS)
def test_fuzz_no_server_errors(
    live_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    _fuzz(live_schema, method, path, mode, examples=25)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=IDS)
def test_fuzz_no_server_errors_long(
    live_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    _fuzz(live_schema, method, path, mode, examples=300)
