"""Webhook signing (checked by the OpenAI SDK's own verifier), the SSRF policy, the retry
schedule and the per-project secret."""

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
    UnsafeTarget,
    WebhookEvent,
    address_class,
    check_target,
    check_url,
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


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "loopback"),
    ("10.1.2.3", "private"), ("192.168.0.5", "private"), ("172.16.9.9", "private"),
    ("fd00::1", "private"), ("100.64.0.1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("::ffff:10.0.0.1", "private"), ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_addresses_are_classified(address: str, kind: str | None) -> None:
    assert address_class(address) == kind


def test_internal_targets_are_refused_unless_allowed() -> None:
    default = Settings()  # allows loopback only (local testing)
    assert check_url("http://127.0.0.1:8080/hook", default) == "127.0.0.1"
    for url in ("http://10.0.0.7/hook", "http://169.254.169.254/latest/meta-data",
                "http://[fd00::1]/x", "http://[::ffff:192.168.1.1]/x"):
        with pytest.raises(UnsafeTarget) as refused:
            check_url(url, default)
        assert refused.value.code == "invalid_webhook_url"
        assert refused.value.status_code == 400
    strict = Settings(webhook_allow="")
    with pytest.raises(UnsafeTarget, match="loopback"):
        check_url("http://127.0.0.1/hook", strict)
    assert check_url("http://10.0.0.7/hook", Settings(webhook_allow="private")) == "10.0.0.7"


def test_https_only_and_malformed_urls() -> None:
    production = Settings(webhook_https_only=True, webhook_allow="")
    with pytest.raises(UnsafeTarget, match="https"):
        check_url("http://example.com/hook", production)
    assert check_url("https://example.com/hook", production) == "example.com"
    for url in ("ftp://example.com/x", "example.com/hook", "https://", "file:///etc/passwd",
                "https://user:pw@example.com/x"):
        with pytest.raises(UnsafeTarget):
            check_url(url, Settings())


async def test_names_are_checked_by_what_they_resolve_to() -> None:
    await check_target("http://localhost:9/hook", Settings())  # loopback: allowed by default
    with pytest.raises(UnsafeTarget, match="loopback"):
        await check_target("http://localhost:9/hook", Settings(webhook_allow=""))
    with pytest.raises(UnsafeTarget, match="resolve"):
        await check_target("http://no-such-host.invalid/hook", Settings())


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


@pytest.mark.parametrize("url", ["http://[::1", "http://h:99999/x", "http://h:port/x"])
def test_unparseable_urls_are_a_400_not_a_crash(url: str) -> None:
    with pytest.raises(UnsafeTarget, match="not a valid URL"):
        check_url(url, Settings())


async def test_a_host_name_idna_cannot_encode_is_refused() -> None:
    with pytest.raises(UnsafeTarget, match="resolve"):
        await check_target(f"http://{'a' * 300}.com/hook", Settings())
