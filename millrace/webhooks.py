"""Webhooks: which events exist, how a payload is signed, where one may be sent, and when a
failed delivery is tried again. Shared by the gateway (checks a target when it is given,
shows a project its secret) and the sink (delivers).

Signing follows Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature:
v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, `whsec_` secrets), as OpenAI's own webhooks
do, so `client.webhooks.unwrap` of the OpenAI SDK verifies them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from standardwebhooks import Webhook

from millrace.errors import InvalidRequestError
from millrace.lifecycle.status import BatchStatus
from millrace.outbound import Guard, Resolver, Target, resolve
from millrace.protocol import BATCH_EVENT_TYPES, StoredEndpoint
from millrace.records import BatchFinished, WebhookTarget
from millrace.settings import Settings
from millrace.storage.store import Store

# Terminal status → the event a subscriber receives (OpenAI's names).
EVENT_TYPES: dict[BatchStatus, str] = dict(zip(
    (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED),
    BATCH_EVENT_TYPES, strict=True))

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


def endpoint_secret(signing_key: SecretStr, project: str, endpoint_id: str,
                    generation: int) -> str:
    """An endpoint's `whsec_` secret of one generation (each rotation is the next): derived
    like the project's, so nothing secret is stored. Generation 0 is the project's own."""
    if generation == 0:
        return project_secret(signing_key, project)
    raw = hmac.new(signing_key.get_secret_value().encode(),
                   f"webhooks:{project}:{endpoint_id}:{generation}".encode(),
                   hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(raw).decode()


def signing_secrets(signing_key: SecretStr, project: str, endpoint: StoredEndpoint | None,
                    now: float) -> list[str]:
    """The secrets a delivery is signed with: the endpoint's current one, and its previous
    one while a rotation's overlap lasts (Standard Webhooks sends each signature, space
    apart, and a receiver accepts any it can verify). A batch's own `webhook_url` (no
    endpoint): the project's."""
    if endpoint is None:
        return [project_secret(signing_key, project)]
    found = [endpoint_secret(signing_key, project, endpoint.id, endpoint.generation)]
    if endpoint.previous_generation is not None and (endpoint.previous_until or 0) > now:
        found.append(endpoint_secret(signing_key, project, endpoint.id,
                                     endpoint.previous_generation))
    return found


def secret_hint(secret: str) -> str:
    """What the endpoint shows of its secret after creation: `whsec_…` and its last 4."""
    return f"whsec_...{secret.rstrip('=')[-4:]}"


def signing_key(settings: Settings, param: str | None = None) -> SecretStr:
    """The deployment's signing key; a 400 where webhooks are not enabled."""
    if settings.webhook_signing_key is None:
        raise InvalidRequestError("webhooks are not enabled on this deployment (set "
                                  "MILLRACE_WEBHOOK_SIGNING_KEY)", param=param,
                                  code="webhooks_disabled")
    return settings.webhook_signing_key


def signed_headers(secrets: str | list[str], msg_id: str, timestamp: int,
                   body: str) -> dict[str, str]:
    at = datetime.fromtimestamp(timestamp, UTC)
    signature = " ".join(Webhook(secret).sign(msg_id, at, body) for secret in (
        [secrets] if isinstance(secrets, str) else secrets))
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


def allowed_classes(settings: Settings) -> set[str]:
    return {c.strip() for c in settings.webhook_allow.split(",") if c.strip()}


def webhook_guard(settings: Settings, resolver: Resolver = resolve) -> Guard:
    """The outbound guard with this deployment's policy for webhook targets."""
    return Guard(allow=allowed_classes(settings), https_only=settings.webhook_https_only,
                 resolver=resolver)


async def check_target(url: str, settings: Settings, param: str = "webhook_url") -> Target:
    """The target of a webhook URL, or a 400 `invalid_webhook_url` (checked when given and
    again before each delivery, so a name that later points inside is refused too)."""
    return await webhook_guard(settings).check(url, param)


async def with_endpoints(store: Store, event: BatchFinished) -> BatchFinished:
    """Who hears that a batch is finished: its own `webhook_url`, and its project's
    endpoints that want this event."""
    event_type = EVENT_TYPES.get(event.status)
    targets = list(event.webhooks)
    urls = {t.url for t in targets}
    for endpoint in await store.endpoints(event.project):
        wanted = event_type in endpoint.event_types
        if wanted and endpoint.url not in urls:
            targets.append(WebhookTarget(url=endpoint.url, source="endpoint",
                                         endpoint_id=endpoint.id))
            urls.add(endpoint.url)
    return event.model_copy(update={"webhooks": targets})
