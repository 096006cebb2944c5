"""Registrations that must outlive Redis: files, API keys, webhook endpoints.

Each one is published (and acknowledged) on the compacted `<prefix>.registry` topic before
it is written to Redis, so Kafka holds everything the read model knows besides batch
state (which the aggregator's changelog holds). `millrace rebuild` replays both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pydantic import ValidationError

from millrace.kafka import AsyncProducer, KafkaConfig, read_to_fence
from millrace.protocol import FileObject, StoredEndpoint
from millrace.records import (
    ApiKeyEntry,
    EndpointEntry,
    Fence,
    FileEntry,
    endpoint_key,
    parse_registry,
)
from millrace.settings import Settings
from millrace.storage.principals import Principal, hash_key
from millrace.storage.store import Store
from millrace.topics import Topics

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, store: Store, producer: AsyncProducer, topics: Topics) -> None:
        self.store = store
        self.producer = producer
        self.topic = topics.registry

    async def put_file(self, obj: FileObject, project: str, path: str) -> None:
        entry = FileEntry(file=obj, project=project, path=path, listed_at=time.time())
        await self.producer.send(self.topic, entry.key, entry.dumps())
        await self.store.put_file(obj, project, path, entry.listed_at)

    async def delete_file(self, file_id: str, project: str) -> None:
        await self.producer.send(self.topic, f"file:{file_id}", None)
        await self.store.delete_file(file_id, project)

    async def put_api_key(self, api_key: str, principal: Principal) -> None:
        await self.put_key_hash(hash_key(api_key), principal)

    async def put_key_hash(self, key_hash: str, principal: Principal) -> None:
        """A key's principal, new or changed (its budgets raised after minting)."""
        entry = ApiKeyEntry(key_hash=key_hash, project=principal.project,
                            admin=principal.admin, rpm=principal.rpm,
                            routes=dict(principal.routes), max_priority=principal.max_priority,
                            default_priority=principal.default_priority,
                            enqueued_token_limit=principal.enqueued_token_limit)
        await self.producer.send(self.topic, entry.key, entry.dumps())
        await self.store.put_key_hash(entry.key_hash, principal, entry.created_at)

    async def put_endpoint(self, project: str, endpoint: StoredEndpoint) -> None:
        entry = EndpointEntry(project=project, endpoint=endpoint)
        await self.producer.send(self.topic, entry.key, entry.dumps())
        await self.store.put_endpoint(project, endpoint)

    async def delete_endpoint(self, project: str, endpoint_id: str) -> bool:
        await self.producer.send(self.topic, endpoint_key(project, endpoint_id), None)
        return await self.store.delete_endpoint(project, endpoint_id)


async def register_key(settings: Settings, api_key: str, principal: Principal) -> None:
    """One key, from a process that has no registry of its own (launcher, CLI)."""
    topics = Topics.from_settings(settings)
    store = Store.connect(settings.require_redis(), topics.prefix)
    producer = AsyncProducer(KafkaConfig.of(settings, "keys").producer())
    try:
        await Registry(store, producer, topics).put_api_key(api_key, principal)
    finally:
        producer.close()
        await store.close()


@dataclass
class Restored:
    files: int = 0
    api_keys: int = 0
    webhook_endpoints: int = 0


def read_registry(kafka: KafkaConfig, topics: Topics) -> dict[str, FileEntry | ApiKeyEntry
                                                               | EndpointEntry]:
    """The registry's latest entry per key (deleted keys left out)."""
    latest: dict[str, FileEntry | ApiKeyEntry | EndpointEntry | None] = {}
    for msg in read_to_fence(kafka, topics.registry,
                             lambda token: Fence(token=token).dumps()):
        key = (msg.key() or b"").decode()
        if msg.value() is None:
            latest[key] = None
            continue
        try:
            entry = parse_registry(msg.value() or b"")
        except ValidationError:
            log.error("skipping malformed registry record %s", key)
            continue
        if not isinstance(entry, Fence):
            latest[key] = entry
    return {k: v for k, v in latest.items() if v is not None}


async def restore_registry(store: Store, entries: list[FileEntry | ApiKeyEntry | EndpointEntry]
                           ) -> Restored:
    """Write the registry back into Redis (idempotent: the same values again)."""
    restored = Restored()
    for entry in entries:
        if isinstance(entry, FileEntry):
            await store.put_file(entry.file, entry.project, entry.path, entry.listed_at)
            restored.files += 1
        elif isinstance(entry, ApiKeyEntry):
            await store.put_key_hash(entry.key_hash, Principal(
                entry.project, entry.admin, entry.rpm, routes=tuple(entry.routes.items()),
                max_priority=entry.max_priority, default_priority=entry.default_priority,
                enqueued_token_limit=entry.enqueued_token_limit), entry.created_at)
            restored.api_keys += 1
        else:
            await store.put_endpoint(entry.project, entry.endpoint)
            restored.webhook_endpoints += 1
    return restored
