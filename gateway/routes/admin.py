"""`/admin` (admin keys only): minting API keys, and sweeping batches that are stuck."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import Admin
from gateway.context import Ctx
from millrace.store import Principal, new_api_key
from streams.resume import sweep

router = APIRouter(prefix="/admin", tags=["admin"])


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    admin: bool = False
    rpm: int = Field(default=0, ge=0, le=10_000_000,
                     description="requests per minute; 0 = the default")


class MintedKey(BaseModel):
    key: str
    project: str
    admin: bool
    rpm: int


@router.post("/api-keys", response_model=MintedKey)
async def mint(ctx: Ctx, who: Admin, params: NewKey) -> MintedKey:
    key = new_api_key()
    await ctx.registry.put_api_key(key, Principal(params.project, params.admin, params.rpm))
    return MintedKey(key=key, project=params.project, admin=params.admin, rpm=params.rpm)


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # a batch that has not changed for this long is moved again (lines without a result
    # enqueued again or filled, a stalled explode restarted); past its window, it expires
    stuck_after_s: float = Field(default=600.0, ge=0)
    dry_run: bool = False


class SweepReport(BaseModel):
    object: Literal["list"] = "list"
    dry_run: bool
    data: list[dict[str, Any]]
    acted: int


@router.post("/batches/sweep", response_model=SweepReport)
async def sweep_batches(ctx: Ctx, who: Admin, params: Sweep | None = None) -> SweepReport:
    """Every batch not yet finished, with what was done to the stuck ones; nothing it does
    can count a line twice (each step is idempotent)."""
    params = params or Sweep()
    found = await sweep(ctx.store, ctx.producer, ctx.topics, now=time.time(),
                        stuck_after_s=params.stuck_after_s, dry_run=params.dry_run)
    return SweepReport(dry_run=params.dry_run, data=[asdict(s) for s in found],
                       acted=sum(1 for s in found if s.action))
