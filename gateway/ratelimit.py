"""Per-key request budgets: a fixed one-minute window per API key, counted in Redis."""

from __future__ import annotations

import time

from millrace.store import Principal, Store

WINDOW_S = 60


async def take_request(store: Store, principal: Principal) -> tuple[int, int]:
    """Count one request in the key's current minute: (requests so far, seconds left)."""
    now = time.time()
    key = store.keys.rate(principal.key_hash, int(now // WINDOW_S))
    async with store.r.pipeline(transaction=True) as p:
        p.incr(key)
        p.expire(key, 2 * WINDOW_S)
        used, _ = await p.execute()
    return int(used), WINDOW_S - int(now % WINDOW_S)
