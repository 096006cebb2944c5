"""Webhook deliveries on a real Redis: one per (event, target) however often the event is
read, each due attempt claimed by one sink for its lease, and every attempt kept in order."""

from __future__ import annotations

import time
from typing import Any

from millrace.storage.deliveries import Deliveries, Delivery, DeliveryAttempt, delivery_id
from millrace.storage.store import Store
from tests.deployment import OnStore


def delivery(event_id: str, url: str = "https://hooks.example/a") -> Delivery:
    return Delivery(id=delivery_id(event_id, url), batch_id="b", project="p",
                    event_id=event_id, event_type="batch.completed", event_created_at=1,
                    url=url, source="batch")


def test_one_delivery_per_event_and_target(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        deliveries = Deliveries(store)
        first = delivery("evt_1")
        assert first.id == delivery_id("evt_1", first.url)
        assert first.id != delivery("evt_1", "https://hooks.example/b").id
        assert await deliveries.add(first, '{"n": 1}')
        assert not await deliveries.add(first, '{"n": 2}')  # the event read again
        assert await deliveries.body(first.id) == '{"n": 1}'
        assert await deliveries.get(first.id) == first
        assert await deliveries.get("whd_none") is None
        assert [d.id for d in await deliveries.for_batch("b")] == [first.id]

    on_store(scenario)


def test_a_due_delivery_is_leased_to_one_claimant(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        deliveries = Deliveries(store)
        one, two = delivery("evt_1"), delivery("evt_2")
        await deliveries.add(one, "{}")
        await deliveries.add(two, "{}")
        assert sorted(await deliveries.claim(lease_s=60, most=10)) == sorted([one.id, two.id])
        assert await deliveries.claim(lease_s=60, most=10) == []  # another sink: nothing
        # a claimant that died: its lease ran out (a lease that ended a second ago)
        await store.r.zadd(store.keys.deliveries_due, {one.id: time.time() - 1})
        assert await deliveries.claim(lease_s=60, most=10) == [one.id]
        await deliveries.forget_due(two.id)
        await store.r.zadd(store.keys.deliveries_due, {one.id: time.time() - 1})
        assert await deliveries.claim(lease_s=60, most=10) == [one.id]

    on_store(scenario)


def test_attempts_are_kept_in_order_with_the_outcome(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        deliveries = Deliveries(store)
        sent, failed = delivery("evt_1"), delivery("evt_2")
        for d in (sent, failed):
            await deliveries.add(d, "{}")
        first = DeliveryAttempt(attempt=1, at=10.0, status_code=500)
        retry_at = time.time() - 1
        sent = await deliveries.record(sent, first, next_at=retry_at, delivered=False)
        assert sent.status == "pending" and sent.next_attempt_at == retry_at
        assert await store.r.zscore(store.keys.deliveries_due, sent.id) == retry_at
        second = DeliveryAttempt(attempt=2, at=20.0, status_code=200)
        sent = await deliveries.record(sent, second, next_at=None, delivered=True)
        assert (sent.status, sent.delivered_at) == ("delivered", 20.0)
        gave_up = DeliveryAttempt(attempt=1, at=11.0, error="connection refused")
        await deliveries.record(failed, gave_up, next_at=None, delivered=False)
        stored = {d.id: d for d in await deliveries.for_batch("b")}
        assert stored[sent.id] == sent and stored[sent.id].attempts == [first, second]
        assert stored[failed.id].status == "failed"
        assert stored[failed.id].attempts == [gave_up]
        assert await deliveries.claim(lease_s=60, most=10) == []  # neither is due again

    on_store(scenario)
