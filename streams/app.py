"""The Faust aggregator: `faust -A streams.app worker` or `millrace aggregator`.

One agent reads responses and batch-events (both keyed by batch id, same partition count,
so a batch's whole history lands on one partition and one table shard), in chunks of up to
CHUNK records. Per batch per chunk it counts the responses not counted yet (the counted
lines are part of the batch's table record, so counts and dedupe survive a crash
together), applies legal transitions, publishes what they emit on batch-events, saves the
state once, and writes the aggregator half of the Batch object to Redis.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from faust.streams import _current_event
from pydantic import ValidationError

from millrace.records import BatchExpireDue, BatchTransition, ResponseOutcome, parse_event
from millrace.settings import Settings
from millrace.status import BatchStatus
from millrace.store import Store
from millrace.topics import Topics
from millrace.up.readiness import mark_ready
from streams.state import BatchState, Emitted
from streams.transport import App

log = logging.getLogger(__name__)

# Faust's CLI (`faust -A streams.app`) needs a module-level app, so settings are read here.
settings = Settings()
topics = Topics.from_settings(settings)

app = App(
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

app.fetch_wait_ms = settings.kafka.fetch_wait_ms

source = app.topic(
    topics.responses, topics.batch_events, key_serializer="raw", value_serializer="raw"
)
events_out = app.topic(topics.batch_events, key_serializer="raw", value_serializer="raw")

batches = app.Table("batches", default=None, partitions=settings.partitions)

_store: Store | None = None


def store() -> Store:
    global _store
    if _store is None:
        _store = Store.connect(settings.require_redis(), settings.topic_prefix)
    return _store


# Records handled per step: one table write, one Redis write per batch per chunk.
CHUNK = 1000
CHUNK_WAIT_S = 0.005


@app.agent(source)
async def aggregate(stream: Any) -> None:
    async for events in stream.take_events(CHUNK, within=CHUNK_WAIT_S):
        by_batch: dict[str, list[tuple[str, bytes]]] = {}
        last: dict[str, Any] = {}
        for event in events:
            batch_id = (event.key or b"").decode()
            by_batch.setdefault(batch_id, []).append((event.message.topic, event.value))
            last[batch_id] = event
        for batch_id, records in by_batch.items():
            # A table write goes to the changelog partition of the "current event"; a
            # chunk has none of its own, so it is the batch's last record (same partition).
            _current_event.set(weakref.ref(last[batch_id]))
            await apply(batch_id, records)


async def apply(batch_id: str, records: list[tuple[str, bytes]]) -> None:
    """Apply one batch's records of a chunk, in order, then save once."""
    state = load(batch_id)
    emitted: list[Emitted] = []
    responses: list[ResponseOutcome] = []
    changed = False
    for topic, value in records:
        try:
            if topic == topics.responses:
                responses.append(ResponseOutcome.model_validate_json(value))
                continue
            event = parse_event(value)
        except ValidationError:
            log.error("skipping malformed record on %s: %.200r", topic, value)
            continue
        if event.type in ("transition", "seal_requested"):
            continue  # our own output
        if responses:  # responses before this event are applied before it
            emitted += state.count_new(responses)
            responses = []
        emitted += state.apply(event)
        changed = True
    if responses:
        emitted += state.count_new(responses)
        changed = True
    if changed:
        await save(state, emitted)


def load(batch_id: str) -> BatchState:
    raw = batches.get(batch_id)
    return BatchState.model_validate(raw) if raw else BatchState(batch_id=batch_id)


async def save(state: BatchState, emitted: list[Emitted]) -> None:
    """Publish what the change emitted (acknowledged), then write the state back and
    refresh the Redis read model.

    Publishing first means a crash in between repeats an event rather than losing it: the
    state still shows the change undone, so the replayed records emit it again (the sink
    seals idempotently; subscribers may see a transition twice). A state that was written
    always had its events published, so a batch cannot stall on a lost seal request.
    """
    for event in emitted:
        delivery = await events_out.send(key=state.batch_id.encode(), value=event.dumps())
        await delivery
        if isinstance(event, BatchTransition):
            log.info("%s: %s → %s", state.batch_id, event.from_status, event.to_status)
    batches[state.batch_id] = state.model_dump(mode="json")
    track_deadline(state)
    # writes the gateway's half back too where Redis lost it (automatic recovery)
    await store().set_batch_state(state.batch_id, state.batch_fields(), state.restorable())


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
