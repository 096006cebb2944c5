"""The sink: responses + batch-events → spool files → final output/error files, counts,
partial results while a batch runs, and webhooks when it is finished.

Per poll, in this order: batch-events teach each batch's spool its project, number of
lines and output expiry; responses are appended to the spools (a custom_id already there
is skipped); the lines that got a result are marked in Redis (`done:<batch>`, so a
re-drive or fill skips them); each batch with new lines publishes its `progress` (the
counts and usage its files will hold); each batch whose every line is in gets its files
written, registered and announced (`files_ready`); `finished` events become webhook
deliveries. Only then are the offsets committed, so a crash redelivers only what the spool
may not have, and everything above is idempotent.

A batch's total stated again (`validated`), or a fill or re-drive request, for a batch
whose files are already written means its `files_ready` may have been lost (a broker that
lost its data): it is announced again.

A sink handles a partition's records only while it owns the partition (its owner epoch,
`millrace/storage/ownership.py`): one that froze or was cut off while another sink took the
partition over drops what it still held, so it neither writes files nor publishes progress
or deliveries for batches it no longer owns.

A response counts only for a line its batch was issued: the batch must exist, be the
record's project's, and the record must carry the line's ticket (`records.line_ticket`,
made by the gateway with the batch's own key and copied by the worker). Anything else —
forged, or a bug's — is logged, counted (`millrace_records_refused_total`) and dropped:
it reaches no file and no count.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, NamedTuple

import msgspec
from confluent_kafka import Consumer, Message, TopicPartition
from pydantic import ValidationError
from redis.exceptions import RedisError

from millrace import metrics
from millrace.errors import OUTAGES, disk_full
from millrace.filestore import FileStore
from millrace.kafka import (
    AsyncProducer,
    KafkaConfig,
    consume_loop,
    partition_names,
    skip_malformed,
)
from millrace.readiness import mark_ready, note_partitions
from millrace.records import (
    BatchCreated,
    BatchEvent,
    BatchFilesReady,
    BatchFilled,
    BatchFillRequested,
    BatchFinished,
    BatchRedriveRequested,
    BatchValidated,
    SpooledResponse,
    line_ticket,
    parse_event,
    read_response,
)
from millrace.registry import Registry
from millrace.result_files import final_key
from millrace.settings import Settings
from millrace.storage.ownership import Ownership
from millrace.storage.store import Store
from millrace.topics import Topics
from sink.assembler import Assembler
from sink.delivery import Dispatcher
from sink.janitor import Janitor

log = logging.getLogger(__name__)
BATCHES_KEPT = 10_000  # batches' projects and line keys kept in memory (`issued`)


class Learned(NamedTuple):
    """What a chunk of batch-events asks of the sink besides its spools."""

    finished: list[BatchFinished]  # webhooks to send
    announce: list[BatchFilesReady]  # written files to announce again


class Sink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        kafka = KafkaConfig.of(settings, "sink")
        self.consumer = Consumer(kafka.consumer(self.topics.sink_group()))
        self.producer = AsyncProducer(kafka.producer())
        self.store = Store.connect(settings.require_redis(), settings.topic_prefix)
        self.registry = Registry(self.store, self.producer, self.topics)
        files = FileStore(settings.files_url)
        self.assembler = Assembler(settings.data_dir / "sink", files,
                                   settings.output_retention_s)
        self.webhooks = Dispatcher(settings, self.store, files)
        self.janitor = Janitor(self.store, self.registry, files, self.assembler,
                              settings.janitor_every_s)
        self._stopping = asyncio.Event()
        self._janitor_at = 0.0
        self.lag = metrics.LagProbe(self.consumer, self.topics.sink_group())
        self._replay = Replay()
        self._noted: dict[tuple[str, int], dict[str, int]] = {}  # first offsets recorded
        # batch → (project, line key) from Redis, None for no such batch (`issued`)
        self._batches: dict[str, tuple[str, str | None] | None] = {}
        # a batch's records are on the same partition of both topics (keyed by batch)
        self.owners = Ownership(settings.require_redis(), self.store.keys,
                                self.topics.sink_group(), "sink")
        self._partition: dict[str, int] = {}  # batch → its partition (seen in a record)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        metrics.serve(self.settings)
        self.consumer.subscribe([self.topics.responses, self.topics.batch_events],
                                on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._revoked)
        webhooks = asyncio.create_task(self.webhooks.run(self._stopping))
        mark_ready(self.settings, self.settings.sink_name)
        try:
            try:
                await self.write_complete()  # batches whose lines were all in before a restart
            except OSError as exc:
                if not disk_full(exc):
                    raise
                log.warning("files of finished batches wait for disk space: %s", exc)
            await consume_loop(
                self.consumer, self.handle, self._stopping, most=self.settings.sink_max_batch,
                fill_wait=self.settings.sink_max_wait_ms / 1000, every=self.between_polls)
        finally:
            self._stopping.set()
            await webhooks
            await asyncio.to_thread(self.consumer.close)
            self.producer.close()
            await self.store.close()
            self.owners.close()

    async def handle(self, messages: list[Message]) -> None:
        lost = await asyncio.to_thread(self.owners.lost, {m.partition() or 0 for m in messages})
        responses, events, firsts = self._read(m for m in messages
                                               if (m.partition() or 0) not in lost)
        await self._note_first_offsets(firsts)
        partition_of = {batch: p for (_, p), seen in firsts.items() for batch in seen}
        self._partition.update(partition_of)
        if len(self._partition) > BATCHES_KEPT:  # the oldest (finished elsewhere, say)
            for batch_id in list(self._partition)[:BATCHES_KEPT // 2]:
                del self._partition[batch_id]
        responses = await self.issued(responses)
        finished, announce = self.learn(events)
        added = await asyncio.to_thread(self.assembler.add, responses)
        replies = [(r.batch_id, r.output_line().decode()) for r in responses if r.reply]
        if replies:  # spooled: whoever waits on these lines may have them now
            await self.store.put_replies(replies)
        if added:
            await self.store.mark_done(added)
            progress = [self.producer.produce(self.topics.batch_events, batch_id,
                                              self.assembler.spool(batch_id).progress().dumps())
                        for batch_id in added]
            await asyncio.gather(*progress)
        await self.write_complete()
        for ready in announce:
            await self.producer.send(self.topics.batch_events, ready.batch_id, ready.dumps())
        if finished:  # still ours? (a freeze may have come since the poll began)
            lost = await asyncio.to_thread(
                self.owners.lost, {partition_of[e.batch_id] for e in finished})
            finished = [e for e in finished if partition_of[e.batch_id] not in lost]
        for event in finished:
            await self.webhooks.enqueue(event)
            await self.store.done_with(event.batch_id)
            self.assembler.forget(event.batch_id)
            self._batches.pop(event.batch_id, None)
            self._partition.pop(event.batch_id, None)
            # nothing of the batch is needed again: a new owner of its partitions need not
            # read back to it (the two topics have the same partitions, keyed by batch)
            partition = partition_of[event.batch_id]
            await self.store.forget_first_offsets(event.batch_id, [
                (self.topics.responses, partition), (self.topics.batch_events, partition)])
            count_finished(event)

    def _read(self, messages: Iterable[Message]) -> tuple[
            list[SpooledResponse], list[BatchEvent], dict[tuple[str, int], dict[str, int]]]:
        """A poll's records of partitions we own: responses, events, and where each batch's
        records begin on each partition (a poll's records of a partition come in order)."""
        responses: list[SpooledResponse] = []
        events: list[BatchEvent] = []
        firsts: dict[tuple[str, int], dict[str, int]] = {}
        replaying = self._replay.active
        for msg in messages:
            topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
            batch_id = (msg.key() or b"").decode(errors="replace")
            if replaying and not self._replay.wanted(topic, partition, offset, batch_id):
                continue
            firsts.setdefault((topic, partition), {}).setdefault(batch_id, offset)
            try:
                if topic == self.topics.responses:
                    responses.append(read_response(msg.value() or b""))
                else:
                    events.append(parse_event(msg.value() or b""))
            except (ValidationError, msgspec.DecodeError):
                skip_malformed(msg)
        return responses, events, firsts

    async def issued(self, responses: list[SpooledResponse]) -> list[SpooledResponse]:
        """The responses for lines their batches were issued with (module docstring)."""
        if len(self._batches) > BATCHES_KEPT:
            self._batches.clear()
        wanted = sorted({r.batch_id for r in responses} - set(self._batches))
        if wanted:
            self._batches.update(await self.store.line_owners(wanted))
        kept = []
        for record in responses:
            why = self._refusal(record, self._batches[record.batch_id])
            if why is None:
                kept.append(record)
                continue
            metrics.RECORDS_REFUSED.labels("responses", why).inc()
            log.warning("refused a response for %s line %s (%s): %s", record.batch_id,
                        record.line, record.custom_id[:64], why)
        return kept

    @staticmethod
    def _refusal(record: SpooledResponse, batch: tuple[str, str | None] | None) -> str | None:
        if batch is None:
            return "unknown_batch"
        project, key = batch
        if record.project != project:
            return "wrong_project"
        if key is None:  # a batch from before tickets: its lines carry none
            return None
        if record.line is None or record.ticket is None or not hmac.compare_digest(
                record.ticket, line_ticket(key, record.line, record.custom_id)):
            return "not_issued"
        return None

    # --- partitions that move ------------------------------------------------------------
    async def _note_first_offsets(self, firsts: dict[tuple[str, int], dict[str, int]]) -> None:
        """Record where each batch begins on each partition, once per batch while we own the
        partition (later records of it only come at higher offsets)."""
        new = {tp: {b: o for b, o in seen.items() if o < self._noted.get(tp, {}).get(b, o + 1)}
               for tp, seen in firsts.items()}
        new = {tp: seen for tp, seen in new.items() if seen}
        if new:
            await self.store.note_first_offsets(new)
            for tp, seen in new.items():
                self._noted.setdefault(tp, {}).update(seen)

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """A partition we take over is read again from the first record of its oldest
        unfinished batch (`sink-from` in Redis), not from the committed offset: the lines the
        previous owner spooled are on its disk, not ours. Up to the committed offset only
        those batches' records are handled (`Replay`); the spool drops repeats."""
        self.owners.take(tp.partition for tp in partitions)
        starts = self._replay.plan(consumer, partitions, self._first_offsets)
        self._noted.clear()
        for tp in partitions:
            start = starts.get((tp.topic, tp.partition))
            if start is not None:
                tp.offset = start
        consumer.assign(partitions)
        note_partitions(self.settings, self.settings.sink_name, self.topics.responses,
                        [tp.partition for tp in partitions if tp.topic == self.topics.responses])
        log.info("assigned %s", partition_names(partitions))
        if starts:
            log.info("reading back from the oldest unfinished batch: %s",
                     ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(starts.items())))

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Before the partitions go to another sink: every spooled line into the shared
        store, where that sink finds it even if Kafka lost the records (a broker that lost
        its data; our disk is ours alone)."""
        log.info("revoked %s", partition_names(partitions))
        note_partitions(self.settings, self.settings.sink_name, self.topics.responses, [])
        try:
            self.assembler.publish_all()
        except OSError:
            log.exception("could not publish the spooled lines before the rebalance; "
                          "another sink reads them from Kafka")
        self._replay.drop((tp.topic, tp.partition) for tp in partitions)
        self.owners.drop(tp.partition for tp in partitions)
        for tp in partitions:
            self._noted.pop((tp.topic, tp.partition), None)

    def _first_offsets(self, topic: str, partition: int) -> dict[str, int]:
        """Blocking (the consumer's thread, in a rebalance): batch → first offset; waits
        for Redis, since reading from the committed offset could lose lines."""
        while True:
            try:
                return self.owners.first_offsets(topic, partition)
            except RedisError as exc:
                log.warning("waiting for Redis to know where to read %s[%d]: %s", topic,
                            partition, exc)
                time.sleep(1)

    def learn(self, events: list[BatchEvent]) -> tuple[list[BatchFinished],
                                                        list[BatchFilesReady]]:
        """What batch-events teach the spools; returns the `finished` events to send
        webhooks for, and the `files_ready` to announce again."""
        learned = Learned([], [])
        for event in events:
            handler = self.HANDLERS.get(event.type)
            if handler is not None:
                handler(self, event, learned)
        return learned.finished, learned.announce

    def _on_created(self, event: BatchCreated, learned: Learned) -> None:
        self.assembler.learn(event.batch_id, project=event.project,
                             output_expires_after_s=event.output_expires_after_s)

    def _on_validated(self, event: BatchValidated, learned: Learned) -> None:
        self.assembler.learn(event.batch_id, total=event.total)
        self._announce_if_written(event.batch_id, learned)

    def _on_filled(self, event: BatchFilled, learned: Learned) -> None:
        if self.assembler.spool(event.batch_id).meta.total is None:
            self.assembler.learn(event.batch_id, total=event.total)

    def _on_finished(self, event: BatchFinished, learned: Learned) -> None:
        learned.finished.append(event)

    def _announce_if_written(self, batch_id: str, learned: Learned) -> None:
        """Files written already: announced again (a fill or re-drive of a batch whose
        files exist, a `validated` replayed after they were written)."""
        ready = self.assembler.spool(batch_id).files_ready()
        if ready is not None:
            learned.announce.append(ready)

    def _on_fill_or_redrive(self, event: BatchFillRequested | BatchRedriveRequested,
                            learned: Learned) -> None:
        self._announce_if_written(event.batch_id, learned)

    # event type → what the sink learns (its readers in `millrace.records.EVENT_FLOW`)
    HANDLERS: ClassVar[dict[str, Callable[[Sink, Any, Learned], None]]] = {
        "created": _on_created,
        "validated": _on_validated,
        "filled": _on_filled,
        "finished": _on_finished,
        "fill_requested": _on_fill_or_redrive,
        "redrive_requested": _on_fill_or_redrive,
    }

    async def write_complete(self) -> None:
        """Write the files of every batch whose lines are all in, unless another sink owns
        its partition now (at start-up nothing is owned yet: what the spool holds from
        before a restart is written, the same files any owner would write)."""
        complete = self.assembler.complete()
        known = {self._partition[b] for b in complete if b in self._partition}
        lost = await asyncio.to_thread(self.owners.lost, known) if known else set()
        for batch_id in complete:
            if self._partition.get(batch_id) in lost:
                continue
            await self.write_files(batch_id)

    async def write_files(self, batch_id: str) -> None:
        """Write, register and announce a batch's final files (again after a crash: the
        file ids derive from the batch id, so the result is the same)."""
        written = await asyncio.to_thread(self.assembler.write_files, batch_id)
        for kind, obj in written.files.items():
            if obj is not None:
                await self.registry.put_file(obj, written.project, final_key(batch_id, kind))
        output, errors = written.files["output"], written.files["errors"]
        ready = BatchFilesReady(
            batch_id=batch_id,
            output_file_id=output.id if output else None,
            error_file_id=errors.id if errors else None,
            lines=written.lines,
            completed=written.counts["output"],
            failed=written.counts["errors"],
            **written.tokens.usage(),
        )
        await self.producer.send(self.topics.batch_events, batch_id, ready.dumps())
        await asyncio.to_thread(self.assembler.mark_written, batch_id, ready)
        metrics.LINES_WRITTEN.labels("output").inc(ready.completed)
        metrics.LINES_WRITTEN.labels("errors").inc(ready.failed)
        log.info("wrote the files of %s: %d lines", batch_id, written.lines)

    async def between_polls(self) -> None:
        self.lag.maybe(time.monotonic())
        for batch_id in self.assembler.publish_due(self.settings.sink_partial_every_s):
            try:
                await asyncio.to_thread(self.assembler.publish, batch_id)
            except OSError as exc:  # partial results wait; the batch goes on
                if not disk_full(exc):
                    raise
                log.warning("partial results of %s wait for disk space: %s", batch_id, exc)
                break
        if time.monotonic() - self._janitor_at >= self.janitor.every_s:
            self._janitor_at = time.monotonic()
            try:
                await self.janitor.clean_up(time.time())
            except OUTAGES as exc:
                log.warning("clean-up put off: %s", exc)


class Replay:
    """Partitions read again from an older offset after we took them over: below the offset
    committed when we got them, only the records of the batches unfinished then are ours
    to handle (the others finished, their files are written)."""

    def __init__(self) -> None:
        self._until: dict[tuple[str, int], tuple[int, set[str]]] = {}

    def plan(self, consumer: Consumer, partitions: list[TopicPartition],
             first_offsets: Callable[[str, int], dict[str, int]]) -> dict[tuple[str, int], int]:
        """Where to start each partition that has unfinished batches behind its committed
        offset (none: from the committed offset, as usual)."""
        starts: dict[tuple[str, int], int] = {}
        if not partitions:
            return starts
        committed = consumer.committed(partitions, timeout=30)
        for tp in committed:
            if tp.offset < 0:  # nothing committed: read from the start anyway
                continue
            firsts = first_offsets(tp.topic, tp.partition)
            start = min(firsts.values(), default=tp.offset)
            if start < tp.offset:
                starts[(tp.topic, tp.partition)] = start
                self._until[(tp.topic, tp.partition)] = (tp.offset, set(firsts))
        return starts

    @property
    def active(self) -> bool:
        return bool(self._until)

    def wanted(self, topic: str, partition: int, offset: int, batch_id: str) -> bool:
        replaying = self._until.get((topic, partition))
        if replaying is None:
            return True
        until, batches = replaying
        if offset >= until:
            del self._until[(topic, partition)]
            return True
        return batch_id in batches

    def drop(self, keys: Iterable[tuple[str, int]]) -> None:
        for key in keys:
            self._until.pop(key, None)


def count_finished(event: BatchFinished) -> None:
    metrics.BATCHES_FINISHED.labels(event.status.value).inc()
    created = (event.batch or {}).get("created_at")
    if isinstance(created, int | float):
        metrics.BATCH_SECONDS.observe(max(event.at - created, 0))
