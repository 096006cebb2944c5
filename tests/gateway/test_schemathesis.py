"""Every operation of the gateway's own OpenAPI document, fuzzed with schemathesis against the
real deployment: no input gives a 5xx (503 aside: an outage is not a bug), every response has
a status the document declares and a body that matches its schema.

A fresh non-admin project key: what the fuzzing creates stays in its project, and the admin
operations are checked for their 403."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from tests.deployment import Deployment

EXAMPLES = 25  # per operation


@pytest.fixture(scope="session")
def api_schema(deployment: Deployment) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(
        deployment.base_url.removesuffix("/v1") + "/openapi.json")


@pytest.fixture(scope="session")
def fuzz_key(http: httpx.Client, deployment: Deployment) -> str:
    minted = http.post("/admin/api-keys", json={"project": "schemathesis"},
                       headers={"Authorization": f"Bearer {deployment.api_key}"})
    assert minted.status_code == 200
    return str(minted.json()["key"])


def test_no_input_gives_a_server_error(api_schema: schemathesis.BaseSchema,
                                       fuzz_key: str) -> None:
    """One Hypothesis run of EXAMPLES generated requests per operation (the first failure
    is shrunk and raised); the totals are printed."""
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]
    totals: dict[str, int] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        calls = 0

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(headers={"Authorization": f"Bearer {fuzz_key}"},
                                   checks=checks)

        call()
        totals[operation.label] = calls
    print(f"schemathesis: {sum(totals.values())} requests over {len(totals)} operations",
          totals)
    assert len(totals) >= 20 and all(totals.values())
