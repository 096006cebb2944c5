"""`/admin`: minting API keys (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gateway.auth import Admin
from gateway.context import Ctx
from millrace.store import Principal, new_api_key

router = APIRouter(prefix="/admin", tags=["admin"])


class NewKey(BaseModel):
    project: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    admin: bool = False
    rpm: int = Field(default=0, ge=0, description="requests per minute; 0 = the default")


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
