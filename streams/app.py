"""The Faust aggregator: `faust -A streams.app worker` or `millrace aggregator`.

One agent reads responses and batch-events (both keyed by batch id, same partition count,
so a batch's whole history lands on one partition and one table shard). It dedupes on
(batch_id, custom_id), counts, applies legal transitions, publishes each transition on
batch-events, and writes the aggregator half of the Batch object to Redis.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
from pydantic import ValidationError

from millrace.readiness import mark_ready
from millrace.records import BatchExpireDue, BatchTransition, ResponseRecord, parse_event
from millrace.settings import Settings
from millrace.status import BatchStatus
from millrace.store import Store
from millrace.topics import Topics
from streams.state import BatchState, Emitted

log = logging.getLogger(__name__)

# Faust's CLI (`faust -A streams.app`) needs a module-level app, so settings are read here.
settings = Settings()
topics = Topics.from_settings(settings)

app = faust.App(
    topics.aggregator_id(),
    broker=f"kafka://{settings.require_kafka()}",
    store="memory://",
    datadir=str(settings.data_dir / "faust"),
    topic_partitions=settings.partitions,
    topic_replication_factor=1,
    broker_session_timeout=settings.faust_session_timeout_s,
    consumer_auto_offset_reset="earliest",
    producer_acks=-1,
    # tansu 0.6.0 reports a wrong high watermark for multi-record produce batches, which
    # breaks Faust's changelog recovery; one record per batch keeps recovery exact.
    producer_max_batch_size=1,
    web_enabled=False,
)

source = app.topic(
    topics.responses, topics.batch_events, key_serializer="raw", value_serializer="raw"
)
events_out = app.topic(topics.batch_events, key_serializer="raw", value_serializer="raw")

batches = app.Table("batches", default=None, partitions=settings.partitions)
seen = app.Table("seen", default=bool, partitions=settings.partitions)

_store: Store | None = None


def store() -> Store:
    global _store
    if _store is None:
        _store = Store.connect(settings.require_redis(), settings.topic_prefix)
    return _store


@app.agent(source)
async def aggregate(stream: Any) -> None:
    async for event in stream.events():
        batch_id = (event.key or b"").decode()
        try:
            if event.message.topic == topics.responses:
                await on_response(batch_id, ResponseRecord.model_validate_json(event.value))
            else:
                await on_event(batch_id, event.value)
        except ValidationError:
            log.error("skipping malformed record on %s: %.200r", event.message.topic, event.value)


def load(batch_id: str) -> BatchState:
    raw = batches.get(batch_id)
    return BatchState.model_validate(raw) if raw else BatchState(batch_id=batch_id)


async def save(state: BatchState, emitted: list[Emitted]) -> None:
    """Write the state back (inside the stream, as Faust requires), publish what the state
    change emitted, and refresh the Redis read model."""
    batches[state.batch_id] = state.model_dump(mode="json")
    track_deadline(state)
    for event in emitted:
        await events_out.send(key=state.batch_id.encode(), value=event.dumps())
        if isinstance(event, BatchTransition):
            log.info("%s: %s → %s", state.batch_id, event.from_status, event.to_status)
    await store().set_batch_state(state.batch_id, state.batch_fields())


async def on_response(batch_id: str, response: ResponseRecord) -> None:
    key = f"{batch_id}/{response.custom_id}"
    if seen[key]:
        return  # redelivered: already counted
    seen[key] = True
    state = load(batch_id)
    await save(state, state.count(response))


async def on_event(batch_id: str, raw: bytes) -> None:
    event = parse_event(raw)
    if event.type in ("transition", "seal_requested"):
        return
    state = load(batch_id)
    await save(state, state.apply(event))


def ready(sender: Any, *args: Any, **kwargs: Any) -> None:
    """Mark the aggregator ready once it owns its partitions."""
    global _deadlines
    _deadlines = None  # partitions may have moved: rebuild from the table
    mark_ready(settings, "aggregator")


# batch id → expires_at of the running batches on our partitions; None = rebuild.
_deadlines: dict[str, int] | None = None


def track_deadline(state: BatchState) -> None:
    if _deadlines is None:
        return
    if state.status is BatchStatus.IN_PROGRESS and state.expires_at is not None:
        _deadlines[state.batch_id] = state.expires_at
    else:
        _deadlines.pop(state.batch_id, None)


@app.timer(interval=1.0)  # type: ignore[untyped-decorator]
async def expire_due() -> None:
    """Publish `expire_due` for each batch past its window; the agent applies it."""
    global _deadlines
    if _deadlines is None:
        _deadlines = {}
        for raw in list(batches.values()):
            if raw:
                track_deadline(BatchState.model_validate(raw))
    now = time.time()
    for batch_id, deadline in list(_deadlines.items()):
        if deadline <= now:
            del _deadlines[batch_id]  # re-added if the event finds it not yet due
            await events_out.send(key=batch_id.encode(),
                                  value=BatchExpireDue(batch_id=batch_id).dumps())


# faust's stub for connect() wants a positional-only sender; any callable works at runtime.
app.on_rebalance_complete.connect(ready)  # type: ignore[arg-type]
