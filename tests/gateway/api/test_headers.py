"""What every answer carries (`gateway/api/headers.py`), seen by the unmodified OpenAI SDK and
a plain client: OpenAI's `x-request-id` (the SDK's `_request_id`), on errors and refusals
too, and `openai-processing-ms`; a caller's `X-Client-Request-Id` found in the gateway's log
beside the request id it was answered with. (The security headers: test_hardening.py.)"""

from __future__ import annotations

import re
import uuid

import httpx
import openai
import pytest
from openai import OpenAI

from tests.deployment import Deployment, wait_until

REQUEST_ID = re.compile(r"^req_[0-9a-f]{32}$")


def test_the_sdk_sees_a_request_id_on_every_call(client: OpenAI) -> None:
    uploaded = client.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="batch")
    listed = client.batches.list()
    ids = [uploaded._request_id, listed._request_id]  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError) as missing:
        client.batches.retrieve("batch_" + "0" * 24)
    ids.append(missing.value.request_id)
    assert all(i is not None and REQUEST_ID.match(i) for i in ids), ids
    assert len(set(ids)) == 3  # one per request


def test_refusals_before_the_app_carry_one_too_with_the_processing_time(
        deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.base_url.removesuffix("/v1"), timeout=30) as http:
        unauthenticated = http.get("/v1/batches", headers={"Authorization": "Bearer nope"})
        assert unauthenticated.status_code == 401
        answered = http.get("/v1/batches",
                            headers={"Authorization": f"Bearer {deployment.api_key}"})
    for response in (unauthenticated, answered):
        assert REQUEST_ID.match(response.headers["x-request-id"]), response.headers
        assert int(response.headers["openai-processing-ms"]) >= 0


def test_a_callers_client_request_id_is_logged_with_the_request_id(
        deployment: Deployment) -> None:
    mine = f"client-{uuid.uuid4().hex}"
    with httpx.Client(base_url=deployment.base_url.removesuffix("/v1"), timeout=30) as http:
        answered = http.get("/v1/files", headers={
            "Authorization": f"Bearer {deployment.api_key}", "X-Client-Request-Id": mine})
    assert answered.status_code == 200
    request_id = answered.headers["x-request-id"]
    logs = [deployment.log(name) for name in ("gateway", "gateway-2")]

    def logged() -> list[str]:
        return [line for path in logs if path.exists()
                for line in path.read_text(errors="replace").splitlines() if mine in line]

    lines = wait_until(logged, 30, "the gateway's log line")
    assert any(request_id in line and "GET /v1/files answered 200" in line
               for line in lines), lines
