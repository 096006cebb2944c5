"""Whole-keyspace scans: every batch, finished or not, and the registrations a reseed
publishes again, each exactly as it is stored (an API key's route budgets and priority cap
included)."""

from __future__ import annotations

from typing import Any

from millrace.protocol import FileObject, StoredEndpoint
from millrace.registry import restore_registry
from millrace.storage import scans
from millrace.storage.principals import Principal
from millrace.storage.store import Store
from tests.deployment import OnStore
from tests.millrace.storage.test_store import batch


def test_every_batch_is_found_finished_or_not(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        for batch_id in ("b2", "b1", "b3"):
            await store.create_batch(batch(batch_id), "p", listed_at=1.0)
        await store.done_with("b2")
        assert await scans.all_batch_ids(store) == ["b1", "b2", "b3"]

    on_store(scenario)


def test_registrations_scanned_restore_the_same_read_model(on_store: OnStore[Any]) -> None:
    obj = FileObject(id="f1", bytes=3, created_at=1, filename="a.jsonl", purpose="batch")
    who = Principal("p", admin=True, rpm=30, key_hash="h" * 64,
                    routes=(("GET /v0/tasks", 5),), max_priority=3, default_priority=1,
                    enqueued_token_limit=5_000)
    hook = StoredEndpoint(id="we_1", url="https://hooks.example", created_at=3)

    async def scenario(store: Store) -> None:
        await store.put_file(obj, "p", "files/f1", listed_at=5.0)
        await store.put_key_hash(who.key_hash, who, created_at=7)
        await store.put_endpoint("p", hook)
        entries = await scans.registry_entries(store)
        assert sorted(e.type for e in entries) == ["api_key", "file", "webhook_endpoint"]
        # the read model lost, then reseeded from what the scan gave
        for key in [k async for k in store.r.scan_iter(match=f"{store.ns}:*")]:
            await store.r.delete(key)
        restored = await restore_registry(store, entries)
        assert (restored.files, restored.api_keys, restored.webhook_endpoints) == (1, 1, 1)
        assert await store.principal_of_hash(who.key_hash) == who
        assert await store.r.hget(store.keys.api_key(who.key_hash), "created_at") == "7"
        assert (await store.get_file("f1", "p") or obj).path == "files/f1"
        assert await store.r.zscore(store.keys.files("p"), "f1") == 5.0
        assert await store.endpoints("p") == [hook]

    on_store(scenario)
