"""OpenAI's Webhook Endpoints API, driven by the unmodified OpenAI SDK against a real
deployment, with real HTTP receivers: per-endpoint secrets, rotation with and without the
overlap, `/test`, and the refusals."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from openai._exceptions import InvalidWebhookSignatureError
from pydantic import SecretStr

from millrace.protocol import StoredEndpoint
from millrace.webhooks import endpoint_secret, signing_secrets
from tests.deployment import Deployment
from tests.receiver import Received, receiving
from tests.sink.test_delivery import auth, new_project


def verifies(client: OpenAI, received: Received, secret: str) -> bool:
    try:
        client.webhooks.unwrap(received.body, received.headers, secret=secret)
    except InvalidWebhookSignatureError:
        return False
    return True


def test_an_endpoint_signs_with_its_own_secret_and_rotates(
        http: httpx.Client, deployment: Deployment) -> None:
    key, project_secret = new_project(http, deployment)
    sdk = deployment.sdk(key)
    with receiving() as receiver:
        created = sdk.webhooks.create(url=receiver.url, event_types=["batch.completed"],
                                      name="results")
        first = created.signing_secret
        assert first.startswith("whsec_") and first != project_secret
        assert (created.name, created.event_types) == ("results", ["batch.completed"])
        shown = sdk.webhooks.retrieve(created.id)
        assert shown.signing_secret_hint == created.signing_secret_hint
        assert shown.signing_secret_hint and shown.signing_secret_hint.endswith(
            first.rstrip("=")[-4:])
        assert "signing_secret" not in shown.model_dump()  # shown once only

        result = sdk.webhooks.test(created.id, event_type="batch.completed")
        assert (result.status_code, result.webhook_endpoint_id) == (200, created.id)
        [sample] = receiver.wait_for(1, 30)
        event = sdk.webhooks.unwrap(sample.body, sample.headers, secret=first)
        assert event.type == "batch.completed"
        assert not verifies(sdk, sample, project_secret)

        # rotated, keeping the old secret: both sign, each verifies on its own
        kept = sdk.webhooks.rotate_secret(created.id, keep_old_secret_active_for_24_hours=True)
        second = kept.signing_secret
        assert second not in (first, project_secret)
        assert kept.signing_secret_hint != created.signing_secret_hint
        sdk.webhooks.test(created.id, event_type="batch.failed")
        overlap = receiver.wait_for(2, 30)[1]
        assert len(overlap.headers["webhook-signature"].split()) == 2
        assert verifies(sdk, overlap, first) and verifies(sdk, overlap, second)

        # rotated again without the overlap: only the newest secret signs
        third = sdk.webhooks.rotate_secret(created.id).signing_secret
        sdk.webhooks.test(created.id, event_type="batch.expired")
        after = receiver.wait_for(3, 30)[2]
        assert len(after.headers["webhook-signature"].split()) == 1
        assert verifies(sdk, after, third)
        assert not verifies(sdk, after, second) and not verifies(sdk, after, first)


def test_a_batch_event_reaches_an_endpoint_signed_with_its_secret(
        http: httpx.Client, deployment: Deployment) -> None:
    key, project_secret = new_project(http, deployment)
    sdk = deployment.sdk(key)
    with receiving() as cancelled, receiving() as completed:
        mine = sdk.webhooks.create(url=cancelled.url, event_types=["batch.cancelled"],
                                   name="cancellations")
        sdk.webhooks.create(url=completed.url, event_types=["batch.completed"], name="done")
        batch = http.post("/v1/batches", headers=auth(key), json={
            "input": "stream", "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).json()["id"]
        http.post(f"/v1/batches/{batch}/cancel", headers=auth(key))
        [delivery] = cancelled.wait_for(1, 120)
        event = sdk.webhooks.unwrap(delivery.body, delivery.headers,
                                    secret=mine.signing_secret)
        assert (event.type, event.data.id) == ("batch.cancelled", batch)
        assert not verifies(sdk, delivery, project_secret)
        assert completed.received == []  # it did not ask for cancellations


def test_list_update_and_delete_in_openai_shape(
        http: httpx.Client, deployment: Deployment) -> None:
    key, project_secret = new_project(http, deployment)
    sdk = deployment.sdk(key)
    made = [sdk.webhooks.create(url=f"http://127.0.0.1:9/hook{i}", name=f"n{i}",
                                event_types=["batch.completed"]) for i in range(3)]
    # the older form still works: its secret is the project's, `events` null = all
    older = http.post("/v1/webhook_endpoints", headers=auth(key),
                      json={"url": "http://127.0.0.1:9/old"}).json()
    assert older["secret"] == older["signing_secret"] == project_secret
    assert older["events"] is None and len(older["event_types"]) == 4

    first = sdk.webhooks.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    rest = sdk.webhooks.list(limit=2, after=first.data[-1].id)
    listed = [e.id for e in first.data + rest.data]
    assert listed == [older["id"]] + [e.id for e in reversed(made)]  # newest first
    assert not rest.has_more
    assert [e.id for e in sdk.webhooks.list()] == listed  # the SDK's auto-paging

    changed = sdk.webhooks.update(made[0].id, name="renamed",
                                  event_types=["batch.failed", "batch.expired"])
    assert (changed.name, changed.event_types) == ("renamed", ["batch.failed", "batch.expired"])
    assert changed.updated_at is not None and changed.url == made[0].url
    same = sdk.webhooks.update(made[0].id, name="renamed")
    assert same.updated_at == changed.updated_at  # nothing changed: not advanced

    deleted = sdk.webhooks.delete(made[1].id)
    assert deleted.deleted and deleted.object == "webhook_endpoint.deleted"
    with pytest.raises(NotFoundError):
        sdk.webhooks.retrieve(made[1].id)


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), [
    ("POST", "", {"url": "http://127.0.0.1:9/h", "event_types": ["batch.done"], "name": "x"},
     400, "event_types"),
    ("POST", "", {"url": "http://127.0.0.1:9/h", "event_types": ["response.completed"],
                  "name": "x"}, 400, "event_types"),
    ("POST", "", {"url": "http://127.0.0.1:9/h", "event_types": []}, 400, "event_types"),
    ("POST", "", {"url": "http://127.0.0.1:9/h", "event_types": ["batch.failed"]}, 400, "name"),
    ("POST", "", {"url": "http://127.0.0.1:9/h", "events": ["batch.failed"],
                  "event_types": ["batch.failed"], "name": "x"}, 400, "events"),
    ("POST", "", {"url": "http://127.0.0.1:9/h", "colour": "red"}, 400, "colour"),
    ("POST", "", {"url": "http://10.0.0.3/h", "event_types": ["batch.failed"], "name": "x"},
     400, "url"),
    ("GET", "/we_nope", None, 404, "webhook_endpoint_id"),
    ("POST", "/we_nope/rotate_secret", {}, 404, "webhook_endpoint_id"),
    ("POST", "/{id}", {"url": "http://169.254.169.254/latest"}, 400, "url"),
    ("POST", "/{id}", {"secret": "mine"}, 400, "secret"),
    ("POST", "/{id}/test", {"event_type": "video.completed"}, 400, "event_type"),
    ("POST", "/{id}/rotate_secret", {"keep_old_secret_active_for_24_hours": "later"}, 400,
     "keep_old_secret_active_for_24_hours"),
    ("GET", "?limit=0", None, 400, "limit"),
])
def test_bad_requests_are_refused_naming_the_parameter(
        http: httpx.Client, deployment: Deployment, method: str, path: str,
        body: dict[str, object] | None, status: int, param: str) -> None:
    headers = auth(new_project(http, deployment)[0])  # its endpoints hear no other test
    endpoint = http.post("/v1/webhook_endpoints", headers=headers, json={
        "url": "http://127.0.0.1:9/h", "event_types": ["batch.failed"], "name": "ok"}).json()
    answer = http.request(method, "/v1/webhook_endpoints" + path.format(id=endpoint["id"]),
                          headers=headers, json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


def test_a_test_event_to_an_endpoint_that_does_not_answer_is_a_clear_400(
        http: httpx.Client, deployment: Deployment) -> None:
    key, _ = new_project(http, deployment)
    sdk = deployment.sdk(key)
    nobody = sdk.webhooks.create(url="http://127.0.0.1:9/hook", name="nobody",
                                 event_types=["batch.completed"])
    with pytest.raises(BadRequestError) as refused:
        sdk.webhooks.test(nobody.id, event_type="batch.completed")
    assert refused.value.code == "webhook_unreachable"


def test_the_old_secret_signs_only_until_the_overlap_ends() -> None:
    key = SecretStr("k" * 32)
    now = time.time()
    endpoint = StoredEndpoint(id="we_1", url="https://x.example", created_at=0, generation=3,
                              previous_generation=2, previous_until=int(now) + 60)
    current, previous = (endpoint_secret(key, "p", "we_1", g) for g in (3, 2))
    assert signing_secrets(key, "p", endpoint, now) == [current, previous]
    assert signing_secrets(key, "p", endpoint, now + 61) == [current]
    legacy = StoredEndpoint(id="we_2", url="https://x.example", created_at=0)
    assert signing_secrets(key, "p", legacy, now) == signing_secrets(key, "p", None, now)


def test_an_endpoint_stored_before_event_types_keeps_its_events() -> None:
    older = StoredEndpoint.model_validate_json(
        '{"id": "we_0", "url": "https://x.example", "events": ["batch.failed"], '
        '"created_at": 1}')
    assert (older.event_types, older.generation) == (["batch.failed"], 0)
