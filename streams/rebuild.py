"""Restoring the Redis read model from Kafka (`millrace rebuild`).

Batches come from the compacted `<prefix>.batch-state` topic: each record is a batch's
whole aggregator state, including the Batch object as the gateway created it, so the latest
record per batch is the batch. Files, API keys (hashed) and webhook endpoints come from
`<prefix>.registry`. Values already in Redis are kept (the services may have written newer
ones since it was wiped), so rebuilding is safe while everything runs, and idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError

from millrace.kafka import KafkaConfig, read_to_fence
from millrace.registry import read_registry, restore_registry
from millrace.settings import Settings
from millrace.store import Store
from millrace.topics import Topics
from streams.state import BatchState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rebuilt:
    batches: int
    batches_kept: int  # already in Redis with a state written since: left as they are
    files: int
    api_keys: int
    webhook_endpoints: int


def read_batches(kafka: KafkaConfig, topics: Topics) -> dict[str, BatchState]:
    """The latest state of every batch on the batch-state topic."""
    latest: dict[str, BatchState | None] = {}
    # the fence is a tombstone under its own key: compaction drops it
    for msg in read_to_fence(kafka, topics.batch_state, lambda token: None):
        key = (msg.key() or b"").decode()
        value = msg.value()
        try:
            latest[key] = BatchState.model_validate_json(value) if value else None
        except ValidationError:
            log.error("skipping an unreadable state of %s", key)
    return {k: v for k, v in latest.items() if v is not None}


async def rebuild(settings: Settings) -> Rebuilt:
    kafka = KafkaConfig.of(settings, "rebuild")
    topics = Topics.from_settings(settings)
    entries = list(read_registry(kafka, topics).values())
    states = read_batches(kafka, topics)
    store = Store.connect(settings.require_redis(), settings.topic_prefix)
    try:
        registered = await restore_registry(store, entries)
        restored = kept = 0
        for state in states.values():
            original = state.restorable()
            if original is None:
                continue  # created before batches kept their document
            if await store.restore_batch(state.batch_id, original, state.model_dump_json(),
                                         state.batch_fields(), active=not state.finished):
                restored += 1
            else:
                kept += 1
    finally:
        await store.close()
    return Rebuilt(restored, kept, registered.files, registered.api_keys,
                   registered.webhook_endpoints)
