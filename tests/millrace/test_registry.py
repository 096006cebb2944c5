"""The registry on a real broker: each registration is on the compacted topic before it is
in Redis, and a rebuild that reads the topic back (latest entry per key, deletions and
malformed records left out) gives the read model the same files, keys and endpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path

from millrace.kafka import AsyncProducer
from millrace.protocol import FileObject, StoredEndpoint
from millrace.registry import Registry, read_registry, register_key, restore_registry
from millrace.storage.principals import Principal, hash_key
from millrace.storage.store import Store
from tests.deployment import Deployment, own_topics


def file(file_id: str) -> FileObject:
    return FileObject(id=file_id, bytes=3, created_at=1, filename="a.jsonl", purpose="batch")


def test_a_rebuild_from_the_registry_restores_what_was_registered(
        deployment: Deployment, tmp_path: Path) -> None:
    settings, topics, kafka = own_topics(deployment, tmp_path, "reg")
    key, other = "sk-mr-registry-a", "sk-mr-registry-b"
    budgets = Principal("p", rpm=10, routes=(("GET /v0/tasks", 5),), max_priority=2,
                        default_priority=-3, enqueued_token_limit=0)
    hook = StoredEndpoint(id="we_1", url="https://hooks.example", created_at=3)

    async def register() -> None:
        store = Store.connect(settings.require_redis(), topics.prefix)
        producer = AsyncProducer(kafka.producer())
        registry = Registry(store, producer, topics)
        try:
            await registry.put_file(file("kept"), "p", "files/kept")
            await registry.put_file(file("deleted"), "p", "files/deleted")
            await registry.delete_file("deleted", "p")
            await registry.put_api_key(key, Principal("p"))
            await registry.put_key_hash(hash_key(key), budgets)  # raised after minting
            await registry.put_endpoint("p", hook)
            await registry.put_endpoint("p", StoredEndpoint(id="we_2", url="https://x.example",
                                                             created_at=4))
            assert await registry.delete_endpoint("p", "we_2")
            await producer.send(topics.registry, "file:bad", b"{not a registry record")
        finally:
            producer.close()
            await store.close()

    asyncio.run(register())
    asyncio.run(register_key(settings, other, Principal("q", admin=True)))
    latest = read_registry(kafka, topics)
    assert sorted(latest) == sorted([
        "file:kept", f"api_key:{hash_key(key)}", f"api_key:{hash_key(other)}",
        "webhook_endpoint:p:we_1"])

    async def rebuild() -> None:
        fresh = Store.connect(settings.require_redis(), f"{topics.prefix}-rebuilt")
        try:
            restored = await restore_registry(fresh, list(latest.values()))
            assert (restored.files, restored.api_keys, restored.webhook_endpoints) == (1, 2, 1)
            assert await fresh.principal(key) == Principal(
                "p", rpm=10, key_hash=hash_key(key), routes=(("GET /v0/tasks", 5),),
                max_priority=2, default_priority=-3, enqueued_token_limit=0)
            assert (await fresh.principal(other) or budgets).admin
            assert [f.id for f in await fresh.list_files("p")] == ["kept"]
            assert await fresh.endpoints("p") == [hook]
        finally:
            await fresh.close()

    asyncio.run(rebuild())
