"""The aggregator's work: every batch's status, from its events.

`streams/app.py` runs it as a Faust app (group `<prefix>.aggregator`, topic
`<prefix>.batch-events`; a batch's events are on one partition, so one aggregator at a time
applies them, in order). Its one agent hands each chunk of events to `Aggregator.handle`,
which applies them per batch to the batch's state (`millrace/lifecycle/state.py`),
publishes what that emits — and waits for the broker's acknowledgement — then saves the
state to Redis with the read model in one round trip. Only then does the agent take the
next chunk, and only events of finished chunks are committed. A crash therefore replays
events into a state that may already hold them; each state is versioned by the offset of
the last event in it, so a replayed event is a no-op, nothing counts twice and no batch
stalls.

The state lives in Redis (`batch:<id>` field `agg`), not in a Faust table: after any
restart, a rebalance or a broker that lost its data, a batch's state is read back from
Redis (or built from its read-model document if its `created` event never arrived). Each
saved state is also published to the compacted `<prefix>.batch-state` topic, from which
`millrace rebuild` restores a lost Redis.

Expiry: every second one aggregator (a Redis lease) publishes `expire_due` for each active
batch past its window; the batch's owner applies it like any event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from confluent_kafka import Message
from pydantic import ValidationError

from millrace import metrics
from millrace.errors import OUTAGES
from millrace.kafka import AsyncProducer, KafkaConfig, malformed, partition_of, until_handled
from millrace.lifecycle.state import BatchState, Emitted
from millrace.lifecycle.status import BatchStatus
from millrace.readiness import mark_ready, note_partitions
from millrace.records import (
    BatchCreated,
    BatchEvent,
    BatchExpireDue,
    BatchFinished,
    BatchTransition,
    parse_event,
)
from millrace.settings import Settings
from millrace.storage.enqueued import queued
from millrace.storage.store import Store, Version
from millrace.topics import Topics
from millrace.webhooks import with_endpoints

log = logging.getLogger(__name__)

# Events this service publishes itself, or that are requests to the gateway's jobs.
NOT_OURS = {"transition", "fill_requested", "redrive_requested", "finished"}
EXPIRY_EVERY_S = 1.0
COUNT_EVERY_S = 5.0  # the batches-by-status gauge reads every active batch
CACHE_MOST = 10_000  # batch states kept in memory between chunks


class Fetched(NamedTuple):
    """One record of batch-events as a consumer fetched it."""

    topic: str
    partition: int
    offset: int
    value: bytes

    @classmethod
    def of(cls, msg: Message) -> Fetched:
        return cls(msg.topic() or "", msg.partition() or 0, msg.offset() or 0,
                   msg.value() or b"")


class Aggregator:
    """One aggregator's batches: their states in memory (Redis holds the truth), the
    producer of what they emit, the expiry tick. The Faust app feeds it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.producer = AsyncProducer(KafkaConfig.of(settings, "aggregator").producer())
        self.store = Store.connect(settings.require_redis(), settings.topic_prefix)
        # states of batches on our partitions; Redis holds the truth
        self.states: dict[str, BatchState] = {}
        self._count_at = 0.0
        # the broker's cluster id, the epoch of the offsets states are versioned by; read
        # again after every assignment (a new broker means a new group, hence one)
        self._epoch: str | None = None

    async def close(self) -> None:
        self.producer.close()
        await self.store.close()

    # --- rebalances ----------------------------------------------------------------------
    def assigned(self, partitions: Sequence[int]) -> None:
        self._epoch = None
        mark_ready(self.settings, self.settings.aggregator_name)
        note_partitions(self.settings, self.settings.aggregator_name, self.topics.batch_events,
                        list(partitions))
        log.info("assigned %s[%s]", self.topics.batch_events,
                 ",".join(map(str, sorted(partitions))))

    def revoked(self, partitions: Sequence[int]) -> None:
        log.info("revoked %s[%s]", self.topics.batch_events,
                 ",".join(map(str, sorted(partitions))))
        note_partitions(self.settings, self.settings.aggregator_name, self.topics.batch_events,
                        [])
        self.states.clear()  # batches may move: read them back from Redis

    # --- applying events ---------------------------------------------------------------
    async def handle_until_done(self, records: list[Fetched]) -> None:
        """Handle a chunk, again and again through an outage (the agent takes no new chunk
        meanwhile, so nothing after it is committed)."""
        await until_handled(self.handle, records)

    async def handle(self, records: list[Fetched]) -> None:
        try:
            await self._apply(records)
        except BaseException:
            # states changed in memory may not be saved: the retry starts from Redis
            self.states.clear()
            raise

    async def _apply(self, records: Sequence[Fetched]) -> None:
        by_batch = self._by_batch(records)
        if not by_batch:
            return
        stored = await self.store.versions(list(by_batch))
        epoch = await self._current_epoch(by_batch, stored)
        snapshots = []
        for batch_id, events in by_batch.items():
            state = await self.load(batch_id, stored.get(batch_id))
            if self._unknown(state, events):
                continue
            before = state.model_dump_json()
            final = state.status.terminal and state.finished
            emitted: list[Emitted] = []
            for offset, event in events:
                if state.applied(epoch, offset):  # in the state already (a replay)
                    continue
                emitted += state.apply(event)
                state.epoch, state.offset = epoch, offset
                if final:  # a final batch never changes: the event is counted and ignored
                    metrics.RECORDS_REFUSED.labels("batch-events", "final_batch").inc()
                    log.info("%s: a %s event for the final batch ignored", batch_id,
                             event.type)
            # an `expire_due` that changes nothing still saves: the deadline index is fixed
            stale = any(isinstance(e, BatchExpireDue) for _, e in events)
            if emitted or stale or state.model_dump_json() != before:
                snapshot = await self.save(state, emitted)
                if snapshot is not None:
                    snapshots.append(snapshot)
        await asyncio.gather(*snapshots)
        if len(self.states) > CACHE_MOST:
            self.states.clear()

    async def _current_epoch(self, by_batch: dict[str, list[tuple[int, BatchEvent]]],
                             stored: dict[str, Version]) -> str:
        """The epoch to apply a chunk under. It is read after every assignment; but a broker
        that lost its data (offsets start again at 0 under a new cluster id) can hand out
        its first records before the group's rebalance reaches us, and under the old epoch
        they would look applied already and be skipped for good. So before any event is
        skipped as a replay, the cluster id is read again."""
        if self._epoch is None:
            self._epoch = await asyncio.to_thread(self.producer.cluster_id)
        for batch_id, events in by_batch.items():
            held = self.states.get(batch_id)
            seen = held if held is not None else stored.get(batch_id)
            if seen is not None and seen.epoch == self._epoch and \
                    min(offset for offset, _ in events) <= seen.offset:
                self._epoch = await asyncio.to_thread(self.producer.cluster_id)
                break
        return self._epoch

    def _by_batch(self, records: Sequence[Fetched]) -> dict[str, list[tuple[int, BatchEvent]]]:
        """The poll's events that are ours to apply, with their offsets, per batch. A batch's
        state is versioned by offsets on its own partition (murmur2 of its id, the topic
        contract): an event on another partition (a producer with another partitioner)
        is refused, counted and logged, never applied out of order."""
        by_batch: dict[str, list[tuple[int, BatchEvent]]] = {}
        for record in records:
            try:
                event = parse_event(record.value)
            except ValidationError:
                malformed(record.topic, record.partition, record.offset, len(record.value))
                continue
            if event.type in NOT_OURS:
                continue
            if record.partition != partition_of(event.batch_id, self.settings.partitions):
                metrics.RECORDS_REFUSED.labels("batch-events", "wrong_partition").inc()
                log.warning("%s: a %s event on partition %s, not the batch's: refused",
                            event.batch_id, event.type, record.partition)
                continue
            by_batch.setdefault(event.batch_id, []).append((record.offset, event))
        return by_batch

    def _unknown(self, state: BatchState, events: list[tuple[int, BatchEvent]]) -> bool:
        """Events of a batch that exists nowhere (Redis has none, and no `created` among
        them): a forged or stray record, refused."""
        if state.project or any(isinstance(e, BatchCreated) for _, e in events):
            return False
        metrics.RECORDS_REFUSED.labels("batch-events", "unknown_batch").inc()
        log.warning("%s: %d events of a batch that does not exist, skipped", state.batch_id,
                    len(events))
        self.states.pop(state.batch_id, None)
        return True

    async def load(self, batch_id: str, version: Version | None = None) -> BatchState:
        """The batch's state: ours in memory unless Redis holds a newer one (another
        aggregator applied later events while this one was frozen or cut off)."""
        state = self.states.get(batch_id)
        if state is not None and version is not None and state.newer(version):
            log.warning("%s: a newer state is stored (offset %d, ours %d): taking it",
                        batch_id, version.offset, state.offset)
            metrics.FENCED.labels("aggregator").inc()
            state = None
        if state is None:
            stored = await self.store.load_aggregate(batch_id)
            state = (BatchState.restored(batch_id, stored)
                     or BatchState(batch_id=batch_id))
            self.states[batch_id] = state
        return state

    async def save(self, state: BatchState, emitted: list[Emitted]
                   ) -> asyncio.Future[Message] | None:
        """Publish what the change emitted (acknowledged), then save the state, fenced.

        In this order a crash in between repeats an event rather than losing it: the
        saved state does not show the change, so the replayed events emit it again.
        Returns the delivery of the state's snapshot on the batch-state topic; None when
        the store holds a newer state (this view is stale: it is dropped, not saved).
        """
        for event in emitted:
            if isinstance(event, BatchFinished):
                event = await with_endpoints(self.store, event)
            await self.producer.send(self.topics.batch_events, state.batch_id, event.dumps())
            if isinstance(event, BatchTransition):
                log.info("%s: %s → %s", state.batch_id, event.from_status, event.to_status)
        state.updated_at = time.time()
        agg = state.model_dump_json()
        version = Version(state.epoch, state.offset, state.status.terminal)
        if not await self.store.save_aggregate(
                state.batch_id, agg, state.batch_fields(), version=version,
                finished=state.finished, deadline=state.deadline,
                restore=state.restorable()):
            log.warning("%s: not saved, a newer state is stored (ours: offset %d, %s)",
                        state.batch_id, state.offset, state.status.value)
            metrics.FENCED.labels("aggregator").inc()
            self.states.pop(state.batch_id, None)
            return None
        return self.producer.produce(self.topics.batch_state, state.batch_id, agg.encode())

    # --- expiry ------------------------------------------------------------------------
    async def tick(self) -> None:
        """Each second (a Faust timer): expired batches, and every few seconds the gauge
        of unfinished batches. An outage is one warning line and a try next second."""
        try:
            await self.expire_due()
            if time.monotonic() >= self._count_at:
                self._count_at = time.monotonic() + COUNT_EVERY_S
                await self.count_batches()
        except OUTAGES as exc:  # Redis or the broker away: try again next second
            log.warning("looking for expired batches: waiting for the broker or Redis: "
                        "%s: %s", type(exc).__name__, exc)
        except Exception:
            log.exception("looking for expired batches failed")

    async def count_batches(self) -> None:
        """The unfinished batches by status, and those admitted with an estimate by model
        and priority with their tokens left (every aggregator reports the same figures)."""
        counts = await self.store.active_by_status()
        for status in BatchStatus:
            if not status.terminal:
                metrics.BATCHES.labels(status.value).set(counts.get(status.value, 0))
        depth: Counter[tuple[str, str]] = Counter()
        tokens: Counter[tuple[str, str]] = Counter()
        for model in self.settings.served_models():
            for batch in await queued(self.store, model, prune=False):
                depth[model, str(batch.priority)] += 1
                tokens[model, str(batch.priority)] += batch.tokens
        metrics.QUEUED_BATCHES.clear()
        metrics.QUEUED_TOKENS.clear()
        for labels, n in depth.items():
            metrics.QUEUED_BATCHES.labels(*labels).set(n)
            metrics.QUEUED_TOKENS.labels(*labels).set(tokens[labels])

    async def expire_due(self) -> int:
        """Publish `expire_due` for each active batch past its window (one aggregator a
        second does this; the batch's owner decides)."""
        if not await self.store.take_lease(self.store.keys.expiry_tick, EXPIRY_EVERY_S * 0.9):
            return 0
        due = await self.store.due_batches(time.time())
        for batch_id in due:
            await self.producer.send(self.topics.batch_events, batch_id,
                                     BatchExpireDue(batch_id=batch_id).dumps())
        return len(due)
