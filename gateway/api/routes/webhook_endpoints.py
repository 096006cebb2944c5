"""Webhooks (millrace extensions): a project's signing secret, its configured endpoints,
and the delivery log of a batch.

A batch's own `webhook_url` (create field or `metadata.webhook_url`) and every endpoint of
its project receive `batch.completed`, `batch.failed`, `batch.expired` and
`batch.cancelled`, signed with the project's secret (Standard Webhooks).
"""

from __future__ import annotations

import secrets
import time
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.api.auth import Caller
from gateway.api.deps import owned_batch
from gateway.context import Context, Ctx
from millrace.errors import NotFoundError
from millrace.protocol import ListPage, WebhookEndpoint
from millrace.storage.deliveries import Deliveries
from millrace.webhooks import EVENT_TYPES, check_target, project_secret, signing_key

router = APIRouter(tags=["webhooks"])


class WebhookSecret(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str


def secret_for(ctx: Context, project: str, param: str | None = None) -> str:
    return project_secret(signing_key(ctx.settings, param), project)


@router.get("/v1/webhook_secret", response_model=WebhookSecret)
async def secret(ctx: Ctx, who: Caller) -> WebhookSecret:
    """The `whsec_` secret that signs every webhook of the caller's project."""
    return WebhookSecret(secret=secret_for(ctx, who.project))


class NewEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048)
    events: list[str] | None = None

    @field_validator("events")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        known = set(EVENT_TYPES.values())
        if value is not None and (not value or set(value) - known):
            raise ValueError(f"events must be a non-empty subset of {sorted(known)}")
        return value


class CreatedEndpoint(WebhookEndpoint):
    secret: str


@router.post("/v1/webhook_endpoints", response_model=CreatedEndpoint)
async def create_endpoint(ctx: Ctx, who: Caller, params: NewEndpoint) -> CreatedEndpoint:
    signing = secret_for(ctx, who.project, "url")
    await check_target(params.url, ctx.settings, "url")
    endpoint = WebhookEndpoint(id="we_" + secrets.token_hex(12), url=params.url,
                               events=params.events, created_at=int(time.time()))
    await ctx.registry.put_endpoint(who.project, endpoint)
    return CreatedEndpoint(**endpoint.model_dump(), secret=signing)


@router.get("/v1/webhook_endpoints", response_model=ListPage)
async def list_endpoints(ctx: Ctx, who: Caller) -> ListPage:
    return ListPage.of(await ctx.store.endpoints(who.project))


@router.delete("/v1/webhook_endpoints/{endpoint_id}")
async def delete_endpoint(ctx: Ctx, who: Caller, endpoint_id: str) -> dict[str, object]:
    if not any(e.id == endpoint_id for e in await ctx.store.endpoints(who.project)):
        raise NotFoundError(f"No such webhook endpoint: {endpoint_id}", param="endpoint_id")
    await ctx.registry.delete_endpoint(who.project, endpoint_id)
    return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}


@router.get("/v1/batches/{batch_id}/webhook_deliveries", response_model=ListPage)
async def deliveries(ctx: Ctx, who: Caller, batch_id: str) -> ListPage:
    """Every webhook delivery of the batch, each with all its attempts."""
    batch = await owned_batch(ctx, who, batch_id)
    return ListPage.of(await Deliveries(ctx.store).for_batch(batch.id))
