"""`/health`: liveness plus a Redis round trip."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.context import Ctx

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(ctx: Ctx) -> dict[str, str]:
    await ctx.store.ping()
    return {"status": "ok"}
