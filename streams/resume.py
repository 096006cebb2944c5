"""Resuming every unfinished batch on a broker that lost its data (`millrace resume`).

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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from millrace.kafka import AsyncProducer, KafkaConfig
from millrace.protocol import FileObject, WebhookEndpoint
from millrace.records import (
    ApiKeyEntry,
    BatchCreated,
    BatchExpireDue,
    BatchFillRequested,
    BatchFinished,
    BatchRedriveRequested,
    BatchValidated,
    EndpointEntry,
    FileEntry,
    Record,
)
from millrace.settings import Settings
from millrace.status import BatchStatus
from millrace.store import Store
from millrace.topics import Topics
from streams.state import FILL_CODES, STREAM_INPUT, BatchState
from streams.targets import with_endpoints

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    batches: int = 0
    redriven: int = 0
    filled: int = 0
    exploded: int = 0
    registry: int = 0


def resume_events(state: BatchState) -> list[Record]:
    """What to publish so that an active batch carries on (pure: tested directly); a batch
    already final whose `finished` the sink never took gets it again (its webhooks)."""
    if state.doc is None:
        return []
    if state.finished:
        return [state.finished_event()]
    events: list[Record] = [BatchCreated(
        batch_id=state.batch_id, project=state.project, batch=state.doc,
        output_expires_after_s=state.output_expires_after_s, webhook=state.webhook,
        listed_at=state.listed_at, input_url=state.input_url)]
    if state.total is not None:
        events.append(BatchValidated(batch_id=state.batch_id, total=state.total,
                                     model=state.model))
    code = state.fill or FILL_CODES.get(state.status)
    stream = state.input_file_id == STREAM_INPUT
    if code is not None and (state.total is not None or stream):
        events.append(BatchFillRequested(batch_id=state.batch_id, project=state.project,
                                         code=code, input_file_id=state.input_file_id))
    elif stream and state.status in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING):
        events.append(BatchRedriveRequested(batch_id=state.batch_id, project=state.project,
                                            input_file_id=state.input_file_id))
    return events


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


def sweep_events(state: BatchState, now: float, stuck_after_s: float
                 ) -> tuple[str | None, list[Record]]:
    """What gets an active batch moving again (pure): past its window, it expires; idle
    for `stuck_after_s`, a final batch gets `finished` again, a cancelled or expired one a
    fill, a running or finalizing one a re-drive (the sink also announces written files
    again), a validating one its explode again."""
    if state.due(now):
        return "expire", [BatchExpireDue(batch_id=state.batch_id, at=int(now))]
    changed = state.updated_at or float((state.doc or {}).get("created_at") or now)
    if now - changed < stuck_after_s or state.doc is None:
        return None, []
    if state.finished:
        return "finish", [state.finished_event()]
    code = state.fill or FILL_CODES.get(state.status)
    if code is not None and (state.total is not None or state.input_file_id == STREAM_INPUT):
        return "fill", [BatchFillRequested(batch_id=state.batch_id, project=state.project,
                                           code=code, input_file_id=state.input_file_id)]
    if state.status in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING):
        return "redrive", [BatchRedriveRequested(batch_id=state.batch_id,
                                                 project=state.project,
                                                 input_file_id=state.input_file_id)]
    if state.status is BatchStatus.VALIDATING and state.input_file_id != STREAM_INPUT:
        return "explode", resume_events(state)[:1]  # its `created`
    return None, []


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
            resumed.registry = await _registry(store, producer, topics)
        batches = await _all_batches(store) if reseed else await store.active_batches()
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


async def _all_batches(store: Store) -> list[str]:
    """Every batch in the read model (finished ones only have their state re-published)."""
    prefix = store.keys.batch("")
    found = [str(k)[len(prefix):] async for k in store.r.scan_iter(match=f"{prefix}*",
                                                                   count=1000)]
    return sorted(found)


async def _registry(store: Store, producer: AsyncProducer, topics: Topics) -> int:
    """Publish files, API keys and webhook endpoints from Redis to the registry again."""
    entries: list[FileEntry | ApiKeyEntry | EndpointEntry] = []
    async for key in store.r.scan_iter(match=store.keys.file("*"), count=1000):
        row = await store.r.hgetall(key)
        if row:
            listed = await store.r.zscore(store.keys.files(str(row["project"])),
                                          str(key).rsplit(":", 1)[1])
            entries.append(FileEntry(file=FileObject.model_validate_json(row["obj"]),
                                     project=row["project"], path=row["path"],
                                     listed_at=float(listed or 0)))
    async for key in store.r.scan_iter(match=store.keys.api_key("*"), count=1000):
        row = await store.r.hgetall(key)
        if row:
            entries.append(ApiKeyEntry(key_hash=str(key).rsplit(":", 1)[1],
                                       project=row["project"], admin=row.get("admin") == "1",
                                       rpm=int(row.get("rpm") or 0),
                                       created_at=int(row.get("created_at") or 0)))
    async for key in store.r.scan_iter(match=store.keys.webhook_endpoints("*"), count=100):
        project = str(key).split(":", 2)[2]
        for raw in (await store.r.hgetall(key)).values():
            entries.append(EndpointEntry(project=project,
                                         endpoint=WebhookEndpoint.model_validate(
                                             json.loads(raw))))
    for entry in entries:
        await producer.send(topics.registry, entry.key, entry.dumps())
    return len(entries)
