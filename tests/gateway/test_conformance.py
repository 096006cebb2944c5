"""What the OpenAI SDK can see: exact object shapes, every error status, garbage input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI
from openai.types import Batch, FileObject

from tests.batch_flow import run_batch
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment


def mint(deployment: Deployment, http: httpx.Client, project: str, **extra: object) -> str:
    admin = {"Authorization": f"Bearer {deployment.api_key}"}
    response = http.post("/admin/api-keys", json={"project": project, **extra}, headers=admin)
    assert response.status_code == 200, response.text
    return str(response.json()["key"])


def test_objects_carry_the_sdk_fields_and_only_the_documented_extension(
    client: OpenAI, http: httpx.Client, model: str, tmp_path: Path
) -> None:
    batch, _ = run_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        chat_line("a", model, "Say ok.", max_tokens=2)]))
    headers = {"Authorization": f"Bearer {client.api_key}"}
    raw_batch = http.get(f"/v1/batches/{batch.id}", headers=headers).json()
    # the SDK's fields, and `priority` and `estimate`: extensions the SDK keeps as extra
    # fields
    assert set(raw_batch) - set(Batch.model_fields) == {"priority", "estimate"}
    assert set(Batch.model_fields) <= set(raw_batch)
    assert Batch.model_validate(raw_batch).status == "completed"
    raw_file = http.get(f"/v1/files/{batch.output_file_id}", headers=headers).json()
    assert set(raw_file) == set(FileObject.model_fields)
    assert raw_file["purpose"] == "batch_output"
    listed = http.get("/v1/batches", headers=headers).json()
    assert set(listed) == {"object", "data", "first_id", "last_id", "has_more"}


def test_rate_limited_keys_get_429_with_retry_after(
    deployment: Deployment, http: httpx.Client
) -> None:
    key = mint(deployment, http, "limited", rpm=3)
    headers = {"Authorization": f"Bearer {key}"}
    responses = []
    for _ in range(8):  # 3 per minute: a 4th request in the same minute is refused
        responses.append(http.get("/v1/batches", headers=headers))
        if responses[-1].status_code == 429:
            break
    limited = responses[-1]
    assert limited.status_code == 429
    assert 3 <= len(responses) - 1 <= 6  # a minute boundary may reset the window once
    error = limited.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 0 < int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-limit-requests"] == "3"
    client = deployment.sdk(key)
    with pytest.raises(openai.RateLimitError):
        for _ in range(4):
            client.files.list()


def test_the_sdk_sees_the_budget_count_down_and_a_request_id(
        deployment: Deployment, http: httpx.Client) -> None:
    client = deployment.sdk(mint(deployment, http, "counted", rpm=50))
    seen = []
    for _ in range(3):
        raw = client.files.with_raw_response.list()
        assert raw.request_id is not None and raw.request_id.startswith("req_")
        assert raw.headers["x-ratelimit-limit-requests"] == "50"
        seen.append((int(raw.headers["x-ratelimit-remaining-requests"]),
                     int(raw.headers["x-ratelimit-reset"])))
    # within one minute's window (its reset did not jump up) each call took one
    same_window = [(a, b) for a, b in itertools.pairwise(seen) if b[1] <= a[1]]
    assert same_window and all(b[0] == a[0] - 1 for a, b in same_window), seen


def test_garbage_request_bodies_are_400_not_500(client: OpenAI, http: httpx.Client) -> None:
    headers = {"Authorization": f"Bearer {client.api_key}", "content-type": "application/json"}
    for body in (b"", b"null", b"[]", b'"x"', b"{", b'{"input_file_id": 5}',
                 b'{"input_file_id": "f", "endpoint": 1, "completion_window": []}',
                 b"\xff\xfe", json.dumps({"a" * 10_000: 1}).encode()):
        response = http.post("/v1/batches", content=body, headers=headers)
        assert response.status_code == 400, (body[:40], response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(
    st.binary(max_size=300)
    | st.text(max_size=300).map(str.encode)
    | st.recursive(st.none() | st.integers() | st.text(max_size=10),
                   lambda inner: st.lists(inner, max_size=4)
                   | st.dictionaries(st.sampled_from(["custom_id", "method", "url", "body",
                                                       "model", "x"]), inner, max_size=4),
                   max_leaves=12).map(lambda v: json.dumps(v).encode()),
    max_size=6))
def test_malformed_jsonl_never_produces_a_5xx(client: OpenAI, http: httpx.Client,
                                             lines: list[bytes]) -> None:
    headers = {"Authorization": f"Bearer {client.api_key}"}
    upload = http.post("/v1/files", data={"purpose": "batch"},
                       files={"file": ("fuzz.jsonl", b"\n".join(lines))}, headers=headers)
    assert upload.status_code == 200
    file_id = upload.json()["id"]
    checked = http.post("/v1/batches/validate", json={"input_file_id": file_id},
                        headers=headers)
    assert checked.status_code == 200
    assert checked.json()["valid"] is False or checked.json()["total"] > 0
    created = http.post("/v1/batches", headers=headers, json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert created.status_code == 200


def test_validate_and_create_agree_on_a_line_too_large_for_the_broker(
        client: OpenAI, http: httpx.Client, model: str, tmp_path: Path) -> None:
    """A valid 5 MB line cannot travel as one Kafka record: the dry run and the batch both
    say so, at its line (the dry run used to pass it and the batch then failed)."""
    path = tmp_path / "huge.jsonl"
    path.write_text(chat_line("ok", model, "hi") + "\n" + json.dumps({
        "custom_id": "huge", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "x" * 5_000_000}]},
    }) + "\n")
    dry = http.post("/v1/batches/validate", files={"file": ("huge.jsonl", path.read_bytes())},
                    data={"endpoint": "/v1/chat/completions"},
                    headers={"Authorization": f"Bearer {client.api_key}"}).json()
    assert not dry["valid"] and [(e["line"], e["code"]) for e in dry["errors"]] == [
        (2, "line_too_long")]
    batch, _ = run_batch(client, path, timeout=60)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [(2, "line_too_long")]
