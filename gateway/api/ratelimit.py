"""Request budgets per API key: a fixed one-minute window, counted in Redis.

Two budgets may apply to a call: the key's requests per minute over every route (`rpm` on
the key, else `MILLRACE_RATE_LIMIT_RPM`), and the route's own transactions per minute
(PromptLoop's table by default: `MILLRACE_ROUTE_LIMITS`, overridden per key). A call over
either gets a 429 with `Retry-After`; every limited call's answer carries
`x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset` (seconds) of the
tightest budget, and OpenAI's `x-ratelimit-{limit,remaining,reset}-requests`.

The tokens budget of a batch API is the project's enqueued-token quota per model
(`ENQUEUED_TOKEN_LIMIT`, checked at create by `gateway.estimate`): a create it applies to
answers OpenAI's `x-ratelimit-{limit,remaining,reset}-tokens` too.
"""

from __future__ import annotations

import re
import time

from fastapi import Request

from gateway.estimate import duration
from millrace.errors import RateLimitError
from millrace.settings import Settings
from millrace.storage.principals import Principal
from millrace.storage.store import Store

WINDOW_S = 60
_PARAM = re.compile(r"\{[^}]+\}")


def route_key(request: Request) -> str | None:
    """`"POST /v0/tasks/{id}"`: the method and the route's template, path parameters all
    written `{id}` as PromptLoop's table writes them."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return f"{request.method} {_PARAM.sub('{id}', path)}" if path else None


async def take_request(store: Store, key_hash: str, route: str | None) -> tuple[int, int]:
    """Count one request in the key's current minute (of one route, or of all):
    (requests so far, seconds left)."""
    now = time.time()
    minute = int(now // WINDOW_S)
    key = (store.keys.route_rate(key_hash, route, minute) if route
           else store.keys.rate(key_hash, minute))
    used = await store.count_request(key, WINDOW_S)
    return used, WINDOW_S - int(now % WINDOW_S)


def budget_headers(limit: int, remaining: int, reset_s: int) -> dict[str, str]:
    """PromptLoop's names and OpenAI's (`…-requests`, reset as a duration)."""
    return {"x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-reset": str(reset_s), "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": duration(reset_s)}


async def enforce(request: Request, settings: Settings, store: Store, who: Principal) -> None:
    route = route_key(request)
    budgets: list[tuple[str | None, int]] = []
    rpm = who.rpm or settings.rate_limit_rpm
    if rpm:
        budgets.append((None, rpm))
    limit = dict(who.routes).get(route or "", settings.route_limits.get(route or "", 0))
    if route and limit:
        budgets.append((route, limit))
    tightest: tuple[int, int, int] | None = None
    for scope, most in budgets:
        used, reset_s = await take_request(store, who.key_hash, scope)
        headers = budget_headers(most, max(most - used, 0), reset_s)
        if used > most:
            what = f"{most} requests per minute to {scope}" if scope else (
                f"{most} requests per minute")
            raise RateLimitError(
                f"Rate limit reached: {what} for this key. Try again in {reset_s}s.",
                headers={"retry-after": str(reset_s), **headers})
        if tightest is None or most - used < tightest[1]:
            tightest = (most, max(most - used, 0), reset_s)
    if tightest is not None:
        request.state.ratelimit = tightest
