"""Recovery: carrying batches on after Kafka or Redis lost their data, and moving stuck ones.

- `resume` (`millrace resume`, and `millrace up` after its broker restarted): every
  unfinished batch is carried on after the broker lost its data.
- `sweep` (`POST /admin/batches/sweep`): every active batch, and the events that move the
  stuck ones.
- `rebuild` (`millrace rebuild`): the Redis read model restored from Kafka.

What each publishes is decided in `millrace/lifecycle/decisions.py` (pure); this module reads
the states and publishes.

## resume
The embedded broker keeps its topics in memory: after it restarts — or after a Kafka
disaster in production — every request, response and event it held is gone. What a batch
needs to finish is not: its Batch document and the aggregator's state are in Redis, its
input in the file store (stream batches: the lines the ingest stage persisted), and every
result line the sink has in its spool (`done:<batch>` marks them). Resuming publishes, for
every active batch, the events that make the services carry on from there:

- `created` again: the sink learns the project and output expiry, and a file batch is
  exploded again on the new broker — every line without a result is enqueued (an explode
  that was interrupted by the broker's death included);
- `validated` with the batch's number of lines, when known: the sink writes the files once
  it holds them all, or announces them again if it had written them;
- a cancelled or expired batch: `fill_requested` (its lines without a result get error
  lines); a running stream batch: `redrive_requested` (its persisted lines without a result
  are enqueued again);
- a batch already final whose `finished` the sink had not taken: `finished` again (its
  webhooks; a batch stays active until the sink has recorded them).

Every event is idempotent for its consumers, so resuming twice, or while the services run,
changes nothing that was right. With `reseed` (after a Kafka disaster in production), the
registry (files, API keys, webhook endpoints) and every batch's state are published again
too, so that a later loss of Redis can still be rebuilt from Kafka; the embedded broker,
restarted to bound its memory, is not filled up again with what is finished.

## rebuild
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

from millrace.kafka import AsyncProducer, KafkaConfig, read_to_fence
from millrace.lifecycle.decisions import resume_events, sweep_events
from millrace.lifecycle.state import BatchState
from millrace.lifecycle.status import BatchStatus
from millrace.records import BatchFillRequested, BatchFinished, BatchRedriveRequested, Record
from millrace.registry import read_registry, restore_registry
from millrace.settings import Settings
from millrace.storage import scans
from millrace.storage.store import Store
from millrace.topics import Topics
from millrace.webhooks import with_endpoints

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    batches: int = 0
    redriven: int = 0
    filled: int = 0
    exploded: int = 0
    registry: int = 0


@dataclass(frozen=True)
class Swept:
    """An active batch as the sweep found it, and what it did."""

    batch_id: str
    project: str
    status: str
    age_s: int
    idle_s: int | None  # since the batch last changed
    done: int
    total: int | None
    action: str | None  # expire, fill, redrive, explode, or None: left alone


async def sweep(store: Store, producer: AsyncProducer, topics: Topics, *, now: float,
                stuck_after_s: float, dry_run: bool) -> list[Swept]:
    """Every active batch, and the events that move the stuck ones (`POST /admin/...`)."""
    found = []
    for batch_id in await store.active_batches():
        state = await _state(store, batch_id)
        if state is None:
            continue
        action, events = sweep_events(state, now, stuck_after_s)
        if not dry_run:
            await _publish(store, producer, topics, batch_id, events)
        created = int((state.doc or {}).get("created_at") or now)
        found.append(Swept(batch_id, state.project, state.status.value, int(now - created),
                           int(now - state.updated_at) if state.updated_at else None,
                           state.done, state.total, action))
    return found


async def resume(settings: Settings, *, reseed: bool = False) -> Resumed:
    topics = Topics.from_settings(settings)
    store = Store.connect(settings.require_redis(), settings.topic_prefix)
    producer = AsyncProducer(KafkaConfig.of(settings, "resume").producer())
    resumed = Resumed()
    try:
        if reseed:
            entries = await scans.registry_entries(store)
            for entry in entries:
                await producer.send(topics.registry, entry.key, entry.dumps())
            resumed.registry = len(entries)
        batches = await scans.all_batch_ids(store) if reseed else await store.active_batches()
        for batch_id in batches:
            state = await _state(store, batch_id)
            if state is None:
                continue
            if reseed:
                await producer.send(topics.batch_state, batch_id,
                                    state.model_dump_json().encode())
            events = resume_events(state)
            await _publish(store, producer, topics, batch_id, events)
            if events:
                resumed.batches += 1
                kinds = {type(e) for e in events}
                resumed.filled += BatchFillRequested in kinds
                resumed.redriven += BatchRedriveRequested in kinds
                resumed.exploded += state.status is BatchStatus.VALIDATING
    finally:
        producer.close()
        await store.close()
    log.info("resumed: %s", resumed)
    return resumed


async def _publish(store: Store, producer: AsyncProducer, topics: Topics, batch_id: str,
                   events: list[Record]) -> None:
    for event in events:
        if isinstance(event, BatchFinished):
            event = await with_endpoints(store, event)
        await producer.send(topics.batch_events, batch_id, event.dumps())


async def _state(store: Store, batch_id: str) -> BatchState | None:
    return BatchState.restored(batch_id, await store.load_aggregate(batch_id))


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
