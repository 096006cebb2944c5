"""`/admin` (admin keys only): minting API keys, and sweeping batches that are stuck."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway import control
from gateway.api.auth import Admin
from gateway.context import Ctx
from gateway.control import Sweep, SweepReport
from gateway.intake import MAX_PRIORITY, MIN_PRIORITY
from millrace.errors import InvalidRequestError, NotFoundError
from millrace.storage.principals import Principal, hash_key, new_api_key

router = APIRouter(prefix="/admin", tags=["admin"])


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    admin: bool = False
    rpm: int = Field(default=0, ge=0, le=10_000_000,
                     description="requests per minute; 0 = the default")
    max_priority: int = Field(default=0, ge=MIN_PRIORITY, le=MAX_PRIORITY,
                              description="the highest batch priority the key may ask for")
    default_priority: int = Field(
        default=0, ge=MIN_PRIORITY, le=MAX_PRIORITY,
        description="the priority of the key's batches that give none (at most max_priority)")
    enqueued_token_limit: int | None = Field(
        default=None, ge=0, le=10**12,
        description="prompt tokens the project's unfinished batches may hold per model "
                    "(null: the deployment's ENQUEUED_TOKEN_LIMIT; 0: none)")


class MintedKey(BaseModel):
    id: str = Field(description="the key's SHA-256: how it is named from now on")
    key: str
    project: str
    admin: bool
    rpm: int
    max_priority: int
    default_priority: int
    enqueued_token_limit: int | None


@router.post("/api-keys", response_model=MintedKey)
async def mint(ctx: Ctx, who: Admin, params: NewKey) -> MintedKey:
    _default_within_cap(params.default_priority, params.max_priority)
    key = new_api_key()
    await ctx.registry.put_api_key(key, Principal(params.project, params.admin, params.rpm,
                                                  max_priority=params.max_priority,
                                                  default_priority=params.default_priority,
                                                  enqueued_token_limit=params.enqueued_token_limit))
    return MintedKey(id=hash_key(key), key=key, project=params.project, admin=params.admin,
                     rpm=params.rpm, max_priority=params.max_priority,
                     default_priority=params.default_priority,
                     enqueued_token_limit=params.enqueued_token_limit)


def _default_within_cap(default: int, cap: int) -> None:
    if default > cap:
        raise InvalidRequestError(
            f"default_priority {default} is above max_priority {cap}: raise max_priority "
            f"too.", param="default_priority", code="invalid_value")


Route = Annotated[str, StringConstraints(pattern=r"^(GET|POST|PUT|PATCH|DELETE) /\S{0,200}$")]


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=0, le=10_000_000)
    # "POST /v0/tasks/{id}" → requests per minute for this key (0: no limit on the route)
    routes: dict[Route, Annotated[int, Field(ge=0, le=10_000_000)]] | None = Field(
        default=None, max_length=100)
    max_priority: int | None = Field(default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    default_priority: int | None = Field(default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    # -1: back to the deployment's ENQUEUED_TOKEN_LIMIT
    enqueued_token_limit: int | None = Field(default=None, ge=-1, le=10**12)


class KeyInfo(BaseModel):
    id: str
    project: str
    admin: bool
    rpm: int
    routes: dict[str, int]
    max_priority: int
    default_priority: int
    enqueued_token_limit: int | None


@router.patch("/api-keys/{key_id}", response_model=KeyInfo)
async def set_limits(ctx: Ctx, who: Admin, key_id: str, params: KeyLimits) -> KeyInfo:
    """Change a key's budgets or priority cap after minting (each process sees it within
    2 s)."""
    found = await ctx.store.principal_of_hash(key_id) if len(key_id) == 64 else None
    if found is None:
        raise NotFoundError(f"No such API key: {key_id}", param="key_id")
    routes = dict(found.routes) | (params.routes or {})
    changed = replace(found, rpm=found.rpm if params.rpm is None else params.rpm,
                      routes=tuple(sorted(routes.items())),
                      max_priority=found.max_priority if params.max_priority is None
                      else params.max_priority,
                      default_priority=found.default_priority
                      if params.default_priority is None else params.default_priority,
                      enqueued_token_limit=found.enqueued_token_limit
                      if params.enqueued_token_limit is None
                      else None if params.enqueued_token_limit == -1
                      else params.enqueued_token_limit)
    _default_within_cap(changed.default_priority, changed.max_priority)
    await ctx.registry.put_key_hash(key_id, changed)
    return KeyInfo(id=key_id, project=changed.project, admin=changed.admin, rpm=changed.rpm,
                   routes=dict(changed.routes), max_priority=changed.max_priority,
                   default_priority=changed.default_priority,
                   enqueued_token_limit=changed.enqueued_token_limit)


@router.post("/batches/sweep", response_model=SweepReport)
async def sweep_batches(ctx: Ctx, who: Admin, params: Sweep | None = None) -> SweepReport:
    """Every batch not yet finished, with what was done to the stuck ones; nothing it does
    can count a line twice (each step is idempotent)."""
    return await control.sweep_batches(ctx, params)
