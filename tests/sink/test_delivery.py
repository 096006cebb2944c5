"""Signed webhooks from a real deployment to real HTTP receivers, verified with the OpenAI
SDK's own Standard Webhooks implementation (`client.webhooks.unwrap`)."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.batch_flow import wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until
from tests.receiver import Received, receiving


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def verified(client: OpenAI, received: Received, secret: str) -> Any:
    """The event, after checking its signature exactly as an OpenAI SDK user would."""
    return client.webhooks.unwrap(received.body, received.headers, secret=secret)


def new_project(http: httpx.Client, deployment: Deployment) -> tuple[str, str]:
    """A fresh project (so its endpoints hear only this test's batches): (key, secret)."""
    minted = http.post("/admin/api-keys", headers=auth(deployment.api_key),
                       json={"project": f"hooks-{uuid.uuid4().hex[:8]}"})
    key = minted.json()["key"]
    secret = http.get("/v1/webhook_secret", headers=auth(key)).json()["secret"]
    return key, secret


def upload(client: OpenAI, path: Path) -> str:
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="batch").id


def test_retries_until_2xx_even_across_a_sink_crash(
        client: OpenAI, http: httpx.Client, deployment: Deployment, model: str,
        tmp_path: Path) -> None:
    secret = http.get("/v1/webhook_secret", headers=auth(deployment.api_key)).json()["secret"]
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"w{i}", model, "Say hi.",
                                                         max_tokens=4) for i in range(3)])
    with receiving([500, 503, 200]) as receiver:
        batch = client.batches.create(
            input_file_id=upload(client, path), endpoint="/v1/chat/completions",
            completion_window="24h", extra_body={"webhook_url": receiver.url})
        receiver.wait_for(1, 300)

        def first_attempt_recorded() -> bool:
            listed = http.get(f"/v1/batches/{batch.id}/webhook_deliveries",
                              headers=auth(deployment.api_key)).json()["data"]
            return bool(listed and listed[0]["attempts"])

        wait_until(first_attempt_recorded, 30, "the failed attempt to be recorded")
        sink = deployment.ready_info("sink")
        assert sink is not None
        os.kill(int(str(sink["pid"])), signal.SIGKILL)  # the retries are the new sink's
        wait_until(lambda: (i := deployment.ready_info("sink")) is not None
                   and i["pid"] != sink["pid"], 120, "the sink to restart")
        requests = receiver.wait_for(3, 120)

        def settled() -> list[dict[str, Any]] | None:
            """The delivery log once the sink recorded the 2xx (just after it sent it)."""
            listed = http.get(f"/v1/batches/{batch.id}/webhook_deliveries",
                              headers=auth(deployment.api_key)).json()["data"]
            return listed if listed and listed[0]["status"] != "pending" else None

        deliveries = wait_until(settled, 30, "the delivery to be recorded")
        assert len(receiver.received) == 3  # delivered: no attempt after the 2xx

    events = [verified(client, r, secret) for r in requests]
    assert {e.type for e in events} == {"batch.completed"}
    assert {e.data.id for e in events} == {batch.id}
    assert len({r.headers["webhook-id"] for r in requests}) == 1  # one event, retried
    assert [r.answered for r in requests] == [500, 503, 200]
    body = json.loads(requests[-1].body)
    done = wait_done(client, batch.id)
    assert body["data"]["status"] == "completed"
    assert body["data"]["output_file_id"] == done.output_file_id
    assert body["data"]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert sorted(line["custom_id"] for line in body["data"]["results"]) == ["w0", "w1", "w2"]

    [delivery] = deliveries
    assert (delivery["status"], delivery["url"], delivery["source"]) == (
        "delivered", receiver.url, "batch")
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 200]
    assert [a["attempt"] for a in delivery["attempts"]] == [1, 2, 3]
    assert sum(1 for a in delivery["attempts"] if a["error"] is None) == 1
    assert delivery["next_attempt_at"] is None and delivery["delivered_at"]


def test_project_endpoints_hear_every_terminal_event(
        http: httpx.Client, deployment: Deployment, model: str, tmp_path: Path) -> None:
    key, secret = new_project(http, deployment)
    project = OpenAI(base_url=deployment.base_url, api_key=key, max_retries=0)
    with receiving() as everything, receiving() as failures, receiving() as own:
        created = http.post("/v1/webhook_endpoints", headers=auth(key),
                            json={"url": everything.url})
        assert created.status_code == 200, created.text
        assert created.json()["secret"] == secret and created.json()["events"] is None
        http.post("/v1/webhook_endpoints", headers=auth(key),
                  json={"url": failures.url, "events": ["batch.failed"]})
        assert len(http.get("/v1/webhook_endpoints", headers=auth(key)).json()["data"]) == 2

        # completed (and its own webhook via metadata), failed, cancelled, expired
        good = write_jsonl(tmp_path / "good.jsonl", [chat_line("g", model, "Hi.",
                                                               max_tokens=2)])
        completed = project.batches.create(
            input_file_id=upload(project, good), endpoint="/v1/chat/completions",
            completion_window="24h", metadata={"webhook_url": own.url})
        bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json"])
        failed = project.batches.create(input_file_id=upload(project, bad),
                                        endpoint="/v1/chat/completions",
                                        completion_window="24h")
        stream = {"input": "stream", "endpoint": "/v1/chat/completions"}
        to_cancel = http.post("/v1/batches", headers=auth(key),
                              json={**stream, "completion_window": "24h"}).json()["id"]
        http.post(f"/v1/batches/{to_cancel}/cancel", headers=auth(key))
        to_expire = http.post("/v1/batches", headers=auth(key),
                              json={**stream, "completion_window": "2s"}).json()["id"]

        events = {(e := verified(project, r, secret)).type: e
                  for r in everything.wait_for(4, 300)}
        assert {t: e.data.id for t, e in events.items()} == {
            "batch.completed": completed.id, "batch.failed": failed.id,
            "batch.cancelled": to_cancel, "batch.expired": to_expire}
        [only_failure] = failures.wait_for(1, 30)
        assert verified(project, only_failure, secret).data.id == failed.id
        [mine] = own.wait_for(1, 30)
        assert verified(project, mine, secret).type == "batch.completed"
        assert len(failures.received) == 1 and len(own.received) == 1

    removed = http.delete(f"/v1/webhook_endpoints/{created.json()['id']}", headers=auth(key))
    assert removed.json()["deleted"] is True
    assert len(http.get("/v1/webhook_endpoints", headers=auth(key)).json()["data"]) == 1


@pytest.mark.parametrize(("field", "url", "param"), [
    ("webhook_url", "http://10.0.0.8/hook", "webhook_url"),
    ("webhook_url", "http://169.254.169.254/latest/meta-data", "webhook_url"),
    ("webhook_url", "ftp://example.com/hook", "webhook_url"),
    ("metadata", "http://192.168.1.1/hook", "metadata.webhook_url"),
])
def test_internal_or_malformed_webhook_urls_are_refused(
        http: httpx.Client, deployment: Deployment, field: str, url: str, param: str) -> None:
    body: dict[str, Any] = {"input": "stream", "endpoint": "/v1/chat/completions",
                            "completion_window": "24h"}
    body[field] = {"webhook_url": url} if field == "metadata" else url
    refused = http.post("/v1/batches", headers=auth(deployment.api_key), json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_webhook_url"
    assert refused.json()["error"]["param"] == param


def test_bad_endpoints_are_refused(http: httpx.Client, deployment: Deployment) -> None:
    headers = auth(deployment.api_key)
    private = http.post("/v1/webhook_endpoints", headers=headers,
                        json={"url": "http://10.9.9.9/hook"})
    assert private.status_code == 400 and private.json()["error"]["param"] == "url"
    unknown_event = http.post("/v1/webhook_endpoints", headers=headers,
                              json={"url": "http://127.0.0.1:9/hook", "events": ["batch.done"]})
    assert unknown_event.status_code == 400 and unknown_event.json()["error"]["param"] == "events"
    missing = http.delete("/v1/webhook_endpoints/we_nope", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
