"""Webhooks: which events exist, how a payload is signed, where one may be sent, and when a
failed delivery is tried again. Shared by the gateway (checks a target when it is given,
shows a project its secret) and the sink (delivers).

Signing follows Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature:
v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, `whsec_` secrets), as OpenAI's own webhooks
do, so `client.webhooks.unwrap` of the OpenAI SDK verifies them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import random
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from standardwebhooks import Webhook

from millrace.errors import InvalidRequestError
from millrace.settings import Settings
from millrace.status import BatchStatus

# Terminal status → the event a subscriber receives (OpenAI's names).
EVENT_TYPES: dict[BatchStatus, str] = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.EXPIRED: "batch.expired",
    BatchStatus.CANCELLED: "batch.cancelled",
}

ADDRESS_CLASSES = ("loopback", "private", "link-local")


class WebhookEvent(BaseModel):
    """The body POSTed to a webhook target."""

    model_config = ConfigDict(frozen=True)

    id: str
    object: Literal["event"] = "event"
    type: str
    created_at: int
    data: dict[str, Any] = Field(description="the Batch object; `results` for small batches")


def event_id(batch_id: str, event_type: str) -> str:
    """Deterministic, so a transition seen twice (at-least-once) is one event."""
    return "evt_" + hashlib.sha256(f"{batch_id}:{event_type}".encode()).hexdigest()[:24]


def project_secret(signing_key: SecretStr, project: str) -> str:
    """A project's `whsec_` secret, derived from the deployment's signing key: nothing secret
    is stored, and gateway and sink agree without talking."""
    raw = hmac.new(signing_key.get_secret_value().encode(), f"webhooks:{project}".encode(),
                   hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(raw).decode()


def signing_key(settings: Settings, param: str | None = None) -> SecretStr:
    """The deployment's signing key; a 400 where webhooks are not enabled."""
    if settings.webhook_signing_key is None:
        raise InvalidRequestError("webhooks are not enabled on this deployment (set "
                                  "MILLRACE_WEBHOOK_SIGNING_KEY)", param=param,
                                  code="webhooks_disabled")
    return settings.webhook_signing_key


def signed_headers(secret: str, msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def retry_delay(attempt: int, base: float, cap: float,
                rand: Callable[[], float] = random.random) -> float:
    """Wait before attempt `attempt + 1`: exponential, half of it jittered ("equal jitter"),
    so retries of many deliveries spread out but never come sooner than half the step."""
    step = min(cap, base * 2 ** max(attempt - 1, 0))
    return float(step / 2 + rand() * step / 2)


class UnsafeTarget(InvalidRequestError):
    """A webhook URL millrace refuses to call (scheme, or an internal address)."""

    def __init__(self, message: str, param: str = "webhook_url") -> None:
        super().__init__(message, param=param, code="invalid_webhook_url")


def address_class(address: str) -> str | None:
    """'loopback', 'private' or 'link-local' for internal addresses; None for public ones."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private or ip.is_reserved or ip.is_multicast or not ip.is_global:
        return "private"
    return None


def allowed_classes(settings: Settings) -> set[str]:
    return {c.strip() for c in settings.webhook_allow.split(",") if c.strip()}


def check_url(url: str, settings: Settings, param: str = "webhook_url") -> str:
    """Refuse a malformed URL, a non-https one in https-only mode, and a literal internal
    address that is not allowed. Returns the host to resolve."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
    except ValueError as exc:
        raise UnsafeTarget(f"'{url[:200]}' is not a valid URL: {exc}", param) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeTarget(f"'{url[:200]}' is not an http(s) URL", param)
    if settings.webhook_https_only and parts.scheme != "https":
        raise UnsafeTarget("webhook URLs must use https on this deployment", param)
    if parts.username or parts.password:
        raise UnsafeTarget("webhook URLs may not carry credentials", param)
    host = parts.hostname
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # a name: checked once resolved
    _refuse_internal([host], settings, param)
    return host


async def check_target(url: str, settings: Settings, param: str = "webhook_url") -> None:
    """`check_url`, then every address the host resolves to (at registration and again
    before each delivery, so a name that later points inside is refused too)."""
    host = check_url(url, settings, param)
    port = urlsplit(url).port or 443
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a label IDNA cannot encode
        raise UnsafeTarget(f"cannot resolve webhook host '{host}': {exc}", param) from exc
    _refuse_internal([str(info[4][0]) for info in infos], settings, param)


def _refuse_internal(addresses: list[str], settings: Settings, param: str) -> None:
    allowed = allowed_classes(settings)
    for address in addresses:
        kind = address_class(address)
        if kind is not None and kind not in allowed:
            raise UnsafeTarget(
                f"webhook target {address} is a {kind} address; allow it with "
                f"MILLRACE_WEBHOOK_ALLOW={kind}", param)
