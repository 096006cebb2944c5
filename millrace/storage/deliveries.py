"""Webhook deliveries in Redis: durable across sink restarts, every attempt recorded.

- `whd:<id>`           the delivery (JSON), created once per (event, target)
- `whd-body:<id>`      the event body it sends, the same on every attempt
- `whd-attempts:<id>`  its attempts, in order
- `whd-due`            id → when it is next due (removed when delivered or given up)
- `whd-batch:<batch>`  the batch's deliveries, for `GET …/webhook_deliveries`

A sink claims due deliveries by pushing their due time one lease ahead in one script, so
several sinks never send the same attempt, and a sink that dies mid-attempt leaves the
delivery due again once the lease runs out.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Literal

from pydantic import BaseModel, Field

from millrace.storage.store import Store

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


class DeliveryAttempt(BaseModel):
    attempt: int
    at: float
    status_code: int | None = None
    error: str | None = None
    duration_ms: float = 0.0


class Delivery(BaseModel):
    """One event to one target, with its delivery state."""

    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    batch_id: str
    project: str
    event_id: str
    event_type: str
    # the event's time (a transition's `at`): the retry horizon counts from it
    event_created_at: int
    url: str
    # "batch": the batch's own webhook_url; "endpoint": a project's configured endpoint
    source: Literal["batch", "endpoint"]
    endpoint_id: str | None = None
    status: Literal["pending", "delivered", "failed"] = "pending"
    next_attempt_at: float | None = None
    delivered_at: float | None = None
    attempts: list[DeliveryAttempt] = Field(default_factory=list)


def delivery_id(event_id: str, url: str) -> str:
    return "whd_" + hashlib.sha256(f"{event_id}:{url}".encode()).hexdigest()[:24]


class Deliveries:
    def __init__(self, store: Store) -> None:
        self.r = store.r
        self.keys = store.keys
        self._claim = self.r.register_script(_CLAIM)

    async def add(self, delivery: Delivery, body: str) -> bool:
        """Record a new delivery of `body`, due now; False if it already exists (a repeated
        event)."""
        created = await self.r.hsetnx(self.keys.delivery(delivery.id), "doc",
                                      delivery.model_dump_json(exclude={"attempts"}))
        if not created:
            return False
        async with self.r.pipeline(transaction=True) as p:
            p.set(self.keys.delivery_body(delivery.id), body)
            p.zadd(self.keys.deliveries_due, {delivery.id: time.time()})
            p.zadd(self.keys.batch_deliveries(delivery.batch_id), {delivery.id: time.time()})
            await p.execute()
        return True

    async def claim(self, lease_s: float, most: int) -> list[str]:
        """Ids of deliveries due now, each leased to the caller for `lease_s`."""
        now = time.time()
        ids = await self._claim(keys=[self.keys.deliveries_due],
                                args=[now, now + lease_s, most])
        return [str(i) for i in ids]

    async def get(self, delivery_id: str) -> Delivery | None:
        doc = await self.r.hget(self.keys.delivery(delivery_id), "doc")
        if doc is None:
            return None
        attempts = await self.r.lrange(self.keys.delivery_attempts(delivery_id), 0, -1)
        return Delivery.model_validate({**json.loads(doc),
                                        "attempts": [json.loads(a) for a in attempts]})

    async def body(self, delivery_id: str) -> str | None:
        body = await self.r.get(self.keys.delivery_body(delivery_id))
        return str(body) if body is not None else None

    async def forget_due(self, delivery_id: str) -> None:
        await self.r.zrem(self.keys.deliveries_due, delivery_id)

    async def record(self, delivery: Delivery, attempt: DeliveryAttempt,
                     next_at: float | None, delivered: bool) -> Delivery:
        """Store an attempt's outcome: delivered, due again at `next_at`, or given up."""
        status: Literal["pending", "delivered", "failed"] = (
            "delivered" if delivered else "pending" if next_at is not None else "failed")
        updated = delivery.model_copy(update={
            "status": status, "next_attempt_at": next_at,
            "delivered_at": attempt.at if delivered else None,
            "attempts": [*delivery.attempts, attempt]})
        async with self.r.pipeline(transaction=True) as p:
            p.rpush(self.keys.delivery_attempts(delivery.id), attempt.model_dump_json())
            p.hset(self.keys.delivery(delivery.id), "doc",
                   updated.model_dump_json(exclude={"attempts"}))
            if next_at is None:
                p.zrem(self.keys.deliveries_due, delivery.id)
            else:
                p.zadd(self.keys.deliveries_due, {delivery.id: next_at})
            await p.execute()
        return updated

    async def for_batch(self, batch_id: str) -> list[Delivery]:
        ids = await self.r.zrange(self.keys.batch_deliveries(batch_id), 0, -1)
        found = [await self.get(str(i)) for i in ids]
        return [d for d in found if d is not None]
