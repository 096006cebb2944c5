"""API-key authentication: `Authorization: Bearer <key>` or `x-api-key: <key>`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request

from gateway.context import Context, context
from gateway.ratelimit import enforce
from millrace.errors import AuthenticationError, PermissionDeniedError
from millrace.store import Principal


def api_key_of(headers: Mapping[str, str]) -> str | None:
    """The API key of a request: `x-api-key`, else `Authorization: Bearer`."""
    key = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key or None


async def principal(request: Request, ctx: Annotated[Context, Depends(context)]) -> Principal:
    """The caller (both key headers are declared in the OpenAPI document: gateway/openapi.py)."""
    # the body-limits middleware authenticated the caller before the body was read
    found: Principal | None = getattr(request.state, "principal", None)
    if found is None:
        key = api_key_of(request.headers)
        if not key:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        found = await ctx.store.principal(key)
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
    await enforce(request, ctx.settings, ctx.store, found)
    return found


async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.admin:
        raise PermissionDeniedError("This endpoint needs an admin key.")
    return who


Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
