"""Webhooks: OpenAI's Webhook Endpoints API (`client.webhooks.create/retrieve/update/list/
delete/rotate_secret/test`), the project's signing secret, and the delivery log of a batch.

An endpoint hears the batch events named in its `event_types` (`batch.completed`,
`batch.failed`, `batch.expired`, `batch.cancelled`), signed (Standard Webhooks) with its
own secret, given once at create and at each rotation (afterwards only a hint). Rotating
with `keep_old_secret_active_for_24_hours` signs each delivery with both secrets for the
overlap. A batch's own `webhook_url` (create field or `metadata.webhook_url`) is signed
with the project's secret (`GET /v1/webhook_secret`).

millrace's older form, `{"url", "events"}` (`events` null = every batch event), still
works: such an endpoint signs with the project's secret until its first rotation.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from gateway.api.auth import Caller
from gateway.api.deps import owned_batch
from gateway.context import Context, Ctx
from millrace.errors import InvalidRequestError, NotFoundError
from millrace.outbound import NO_ANSWER, TIMED_OUT
from millrace.protocol import BATCH_EVENT_TYPES, ListPage, StoredEndpoint, WebhookEndpoint
from millrace.storage.deliveries import Deliveries
from millrace.webhooks import (
    WebhookEvent,
    check_target,
    endpoint_secret,
    project_secret,
    secret_hint,
    signed_headers,
    signing_key,
    signing_secrets,
    webhook_guard,
)

router = APIRouter(tags=["webhooks"])


class WebhookSecret(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str


def secret_for(ctx: Context, project: str, param: str | None = None) -> str:
    return project_secret(signing_key(ctx.settings, param), project)


@router.get("/v1/webhook_secret", response_model=WebhookSecret)
async def secret(ctx: Ctx, who: Caller) -> WebhookSecret:
    """The `whsec_` secret that signs the webhooks of the caller's batches' own
    `webhook_url`, and of endpoints made with `{url, events}`."""
    return WebhookSecret(secret=secret_for(ctx, who.project))


def _batch_events(value: list[str] | None) -> list[str] | None:
    if value is not None and (not value or set(value) - set(BATCH_EVENT_TYPES)):
        raise ValueError(f"must be a non-empty list of the batch events millrace sends: "
                         f"{list(BATCH_EVENT_TYPES)}")
    return None if value is None else list(dict.fromkeys(value))


# `event_types` (and the older `events`): a 400 naming the field for any other event type
EventTypes = Annotated[list[str] | None, AfterValidator(_batch_events)]


class NewEndpoint(BaseModel):
    """OpenAI's `{url, event_types, name}`, or millrace's older `{url, events}`."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048)
    event_types: EventTypes = None
    name: str | None = Field(default=None, max_length=256)
    events: EventTypes = None


class EndpointChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=2048)
    event_types: EventTypes = None
    name: str | None = Field(default=None, max_length=256)


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_old_secret_active_for_24_hours: bool = False


class TestEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: str

    @field_validator("event_type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BATCH_EVENT_TYPES:
            raise ValueError(f"event_type must be one of the batch events millrace sends: "
                             f"{list(BATCH_EVENT_TYPES)}")
        return value


class EndpointWithSecret(WebhookEndpoint):
    """What create and rotate_secret answer: the only time the secret is shown."""

    signing_secret: str
    secret: str  # the same, under millrace's older name


class DeletedEndpoint(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class TestResult(BaseModel):
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    event_type: str
    status_code: int
    success: Literal[True] = True
    webhook_endpoint_id: str


async def _owned(ctx: Context, project: str, endpoint_id: str) -> StoredEndpoint:
    endpoint = await ctx.store.endpoint(project, endpoint_id)
    if endpoint is None:
        raise NotFoundError(f"No such webhook endpoint: {endpoint_id}",
                            param="webhook_endpoint_id")
    return endpoint


def _with_secret(ctx: Context, project: str, endpoint: StoredEndpoint) -> EndpointWithSecret:
    given = endpoint_secret(signing_key(ctx.settings), project, endpoint.id,
                            endpoint.generation)
    return EndpointWithSecret(**endpoint.public().model_dump(), signing_secret=given,
                              secret=given)


@router.post("/v1/webhook_endpoints", response_model=EndpointWithSecret)
async def create_endpoint(ctx: Ctx, who: Caller, params: NewEndpoint) -> EndpointWithSecret:
    key = signing_key(ctx.settings, "url")
    if params.events is not None and params.event_types is not None:
        raise InvalidRequestError("Give event_types (or the older events), not both.",
                                  param="events", code="invalid_value")
    openai_form = params.event_types is not None
    if openai_form and not params.name:
        raise InvalidRequestError("name is required with event_types", param="name",
                                  code="missing_required_parameter")
    await check_target(params.url, ctx.settings, "url")
    # time-ordered (microseconds, then random), so a list is newest first within a second
    endpoint_id = f"we_{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"
    # OpenAI's form: the endpoint's own secret; the older form: the project's
    generation = 1 if openai_form else 0
    now = int(time.time())
    endpoint = StoredEndpoint(
        id=endpoint_id, url=params.url, name=params.name or "",
        event_types=params.event_types or params.events or list(BATCH_EVENT_TYPES),
        events=None if openai_form else params.events, created_at=now, updated_at=now,
        generation=generation, signing_secret_hint=secret_hint(
            endpoint_secret(key, who.project, endpoint_id, generation)))
    await ctx.registry.put_endpoint(who.project, endpoint)
    return _with_secret(ctx, who.project, endpoint)


@router.get("/v1/webhook_endpoints", response_model=ListPage)
async def list_endpoints(
    ctx: Ctx, who: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> ListPage:
    """Newest first, `after` the id of the last endpoint of the previous page."""
    found = list(reversed(await ctx.store.endpoints(who.project)))
    if after is not None:
        ids = [e.id for e in found]
        found = found[ids.index(after) + 1:] if after in ids else []
    page = [e.public() for e in found[:limit]]
    return ListPage.of(page, has_more=len(found) > limit)


@router.get("/v1/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpoint)
async def retrieve_endpoint(ctx: Ctx, who: Caller, webhook_endpoint_id: str) -> WebhookEndpoint:
    return (await _owned(ctx, who.project, webhook_endpoint_id)).public()


@router.post("/v1/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpoint)
async def update_endpoint(ctx: Ctx, who: Caller, webhook_endpoint_id: str,
                          params: EndpointChange) -> WebhookEndpoint:
    """Change its url, name or event types; a change applies to deliveries still being
    retried too. An update that changes nothing leaves `updated_at` as it was."""
    endpoint = await _owned(ctx, who.project, webhook_endpoint_id)
    if params.url is not None:
        await check_target(params.url, ctx.settings, "url")
    change: dict[str, Any] = {k: v for k, v in params.model_dump(exclude_none=True).items()
                              if v != getattr(endpoint, k)}
    if change.get("event_types") is not None:
        change["events"] = None  # the older field said the same thing
    if change:
        endpoint = endpoint.model_copy(update={**change, "updated_at": int(time.time())})
        await ctx.registry.put_endpoint(who.project, endpoint)
    return endpoint.public()


@router.delete("/v1/webhook_endpoints/{webhook_endpoint_id}", response_model=DeletedEndpoint)
async def delete_endpoint(ctx: Ctx, who: Caller, webhook_endpoint_id: str) -> DeletedEndpoint:
    """Deliveries still being retried to it stop."""
    await _owned(ctx, who.project, webhook_endpoint_id)
    await ctx.registry.delete_endpoint(who.project, webhook_endpoint_id)
    return DeletedEndpoint(id=webhook_endpoint_id)


@router.post("/v1/webhook_endpoints/{webhook_endpoint_id}/rotate_secret",
             response_model=EndpointWithSecret)
async def rotate_secret(ctx: Ctx, who: Caller, webhook_endpoint_id: str,
                        params: Rotation | None = None) -> EndpointWithSecret:
    """A new secret, signing from the next attempt on; with
    `keep_old_secret_active_for_24_hours`, deliveries carry the old secret's signature too
    for `MILLRACE_WEBHOOK_SECRET_OVERLAP_S` (24 h)."""
    key = signing_key(ctx.settings)
    endpoint = await _owned(ctx, who.project, webhook_endpoint_id)
    keep = params is not None and params.keep_old_secret_active_for_24_hours
    now = int(time.time())
    generation = endpoint.generation + 1
    endpoint = endpoint.model_copy(update={
        "generation": generation, "updated_at": now,
        "previous_generation": endpoint.generation if keep else None,
        "previous_until": now + ctx.settings.webhook_secret_overlap_s if keep else None,
        "signing_secret_hint": secret_hint(
            endpoint_secret(key, who.project, endpoint.id, generation))})
    await ctx.registry.put_endpoint(who.project, endpoint)
    return _with_secret(ctx, who.project, endpoint)


@router.post("/v1/webhook_endpoints/{webhook_endpoint_id}/test", response_model=TestResult)
async def test_endpoint(ctx: Ctx, who: Caller, webhook_endpoint_id: str,
                        params: TestEvent) -> TestResult:
    """POST a sample event of `event_type` to the endpoint now, signed as a delivery would
    be, and answer the status code it gave. Nothing is recorded or retried."""
    key = signing_key(ctx.settings)
    endpoint = await _owned(ctx, who.project, webhook_endpoint_id)
    now = int(time.time())
    event = WebhookEvent(id="evt_test_" + secrets.token_hex(12), type=params.event_type,
                         created_at=now, data={"id": "batch_test_" + secrets.token_hex(8),
                                               "object": "batch", "test": True})
    body = event.model_dump_json()
    headers = signed_headers(signing_secrets(key, who.project, endpoint, now), event.id, now,
                             body)
    target = await check_target(endpoint.url, ctx.settings, "url")
    try:
        async with httpx.AsyncClient(timeout=ctx.settings.webhook_timeout_s,
                                     follow_redirects=False) as client:
            status = await webhook_guard(ctx.settings).post(client, target, body, headers)
    except httpx.HTTPError as exc:
        raised = TIMED_OUT if isinstance(exc, httpx.TimeoutException) else NO_ANSWER
        raise InvalidRequestError(f"The test event to {endpoint.url} got no answer: {raised}",
                                  param="url", code="webhook_unreachable") from exc
    return TestResult(event_type=params.event_type, status_code=status,
                      webhook_endpoint_id=endpoint.id)


@router.get("/v1/batches/{batch_id}/webhook_deliveries", response_model=ListPage)
async def deliveries(ctx: Ctx, who: Caller, batch_id: str) -> ListPage:
    """Every webhook delivery of the batch, each with all its attempts."""
    batch = await owned_batch(ctx, who, batch_id)
    return ListPage.of(await Deliveries(ctx.store).for_batch(batch.id))
