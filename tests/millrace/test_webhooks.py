"""Webhook signing (checked by the OpenAI SDK's own verifier), the retry schedule and the
per-project secret (the SSRF guard: test_outbound.py)."""

from __future__ import annotations

import itertools
import json
import time

import pytest
from openai import OpenAI
from openai.types.webhooks import BatchCompletedWebhookEvent
from pydantic import SecretStr

from millrace.settings import Settings
from millrace.webhooks import (
    WebhookEvent,
    event_id,
    project_secret,
    retry_delay,
    signed_headers,
)


def test_signature_verifies_with_the_openai_sdk() -> None:
    secret = project_secret(SecretStr("deployment-key"), "team-a")
    assert secret.startswith("whsec_")
    body = WebhookEvent(id=event_id("batch_1", "batch.completed"), type="batch.completed",
                        created_at=int(time.time()), data={"id": "batch_1"}).model_dump_json()
    headers = signed_headers(secret, "evt_1", int(time.time()), body)

    sdk = OpenAI(api_key="unused", base_url="http://127.0.0.1:9")
    event = sdk.webhooks.unwrap(body, headers, secret=secret)

    assert isinstance(event, BatchCompletedWebhookEvent) and event.data.id == "batch_1"
    other = project_secret(SecretStr("deployment-key"), "team-b")
    with pytest.raises(Exception, match="signature"):
        sdk.webhooks.unwrap(body, headers, secret=other)
    with pytest.raises(Exception, match="signature"):
        sdk.webhooks.unwrap(body.replace("batch_1", "batch_2"), headers, secret=secret)
    assert json.loads(body)["object"] == "event"


def test_each_project_has_its_own_stable_secret() -> None:
    key = SecretStr("k")
    assert project_secret(key, "a") == project_secret(key, "a") != project_secret(key, "b")
    assert project_secret(SecretStr("other"), "a") != project_secret(key, "a")


def test_event_ids_are_stable_per_batch_and_type() -> None:
    assert event_id("b", "batch.completed") == event_id("b", "batch.completed")
    assert event_id("b", "batch.completed") != event_id("b", "batch.expired")
    assert event_id("b", "batch.completed").startswith("evt_")


def test_retries_back_off_exponentially_with_bounded_jitter() -> None:
    lows = [retry_delay(n, 5, 3600, rand=lambda: 0.0) for n in range(1, 12)]
    highs = [retry_delay(n, 5, 3600, rand=lambda: 1.0) for n in range(1, 12)]
    assert lows[:4] == [2.5, 5.0, 10.0, 20.0] and highs[:4] == [5.0, 10.0, 20.0, 40.0]
    assert highs[-1] == 3600 and lows[-1] == 1800  # capped
    assert all(a <= b for a, b in itertools.pairwise(highs))


def test_an_empty_signing_key_means_webhooks_off() -> None:
    # compose writes `MILLRACE_WEBHOOK_SIGNING_KEY: ${…:-}`: unset must not mean "sign with ''"
    assert Settings(webhook_signing_key="").webhook_signing_key is None
    assert Settings(api_key="").api_key is None
    key = Settings(webhook_signing_key="k").webhook_signing_key
    assert key is not None and key.get_secret_value() == "k"
