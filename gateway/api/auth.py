"""API-key authentication: `Authorization: Bearer <key>` or `x-api-key: <key>`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Request

from gateway.api.ratelimit import enforce
from gateway.context import Context, context
from millrace.errors import AuthenticationError, PermissionDeniedError
from millrace.storage.principals import Principal


def api_key_of(headers: Iterable[tuple[str, str]]) -> str | None:
    """The API key of a request (its header pairs, repeats included): `x-api-key` or
    `Authorization: Bearer`. A request that names two different keys, or repeats either
    header, is refused (401) rather than one of them chosen."""
    keys: list[str] = []
    auths: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == "x-api-key":
            keys.append(value.strip())
        elif lowered == "authorization":
            auths.append(value.strip())
    if len(keys) > 1 or len(auths) > 1:
        raise AuthenticationError("Send one API key, in one 'Authorization: Bearer <key>' "
                                  "or one 'x-api-key' header.")
    bearer = auths[0][7:].strip() if auths and auths[0].lower().startswith("bearer ") else ""
    key = keys[0] if keys else ""
    if key and bearer and key != bearer:
        raise AuthenticationError("The 'Authorization' and 'x-api-key' headers name different "
                                  "API keys; send one.")
    return key or bearer or None


async def principal(request: Request, ctx: Annotated[Context, Depends(context)]) -> Principal:
    """The caller (both key headers are declared in the OpenAPI document:
    gateway/api/openapi.py)."""
    # the body-limits middleware authenticated the caller before the body was read
    found: Principal | None = getattr(request.state, "principal", None)
    if found is None:
        key = api_key_of(request.headers.items())
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
