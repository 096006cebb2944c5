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
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import msgspec
from confluent_kafka import Consumer, Message
from pydantic import ValidationError

from millrace import metrics
from millrace.errors import OUTAGES
from millrace.filestore import FileStore
from millrace.kafka import AsyncProducer, KafkaConfig, consume_loop
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
    parse_event,
    read_response,
)
from millrace.registry import Registry
from millrace.results import final_key
from millrace.settings import Settings
from millrace.store import Store
from millrace.topics import Topics
from millrace.up.readiness import mark_ready
from sink.assembler import Assembler
from sink.janitor import EVERY_S as JANITOR_EVERY_S
from sink.janitor import Janitor
from sink.webhooks import Dispatcher

log = logging.getLogger(__name__)


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
        self.assembler = Assembler(settings.data_dir / "sink", files)
        self.webhooks = Dispatcher(settings, self.store, files)
        self.janitor = Janitor(self.store, self.registry, files, self.assembler)
        self._stopping = asyncio.Event()
        self._janitor_at = 0.0
        self.lag = metrics.LagProbe(self.consumer, self.topics.sink_group())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        metrics.serve(self.settings)
        self.consumer.subscribe([self.topics.responses, self.topics.batch_events])
        webhooks = asyncio.create_task(self.webhooks.run(self._stopping))
        mark_ready(self.settings, "sink")
        try:
            await self.write_complete()  # batches whose lines were all in before a restart
            await consume_loop(
                self.consumer, self.handle, self._stopping, most=self.settings.sink_max_batch,
                fill_wait=self.settings.sink_max_wait_ms / 1000, every=self.between_polls)
        finally:
            self._stopping.set()
            await webhooks
            await asyncio.to_thread(self.consumer.close)
            self.producer.close()
            await self.store.close()

    async def handle(self, messages: list[Message]) -> None:
        responses: list[SpooledResponse] = []
        events: list[BatchEvent] = []
        for msg in messages:
            try:
                if msg.topic() == self.topics.responses:
                    responses.append(read_response(msg.value() or b""))
                else:
                    events.append(parse_event(msg.value() or b""))
            except (ValidationError, msgspec.DecodeError):
                log.error("skipping malformed record at %s[%d]@%d",
                          msg.topic(), msg.partition(), msg.offset())
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
        for event in finished:
            await self.webhooks.enqueue(event)
            await self.store.done_with(event.batch_id)
            self.assembler.forget(event.batch_id)
            count_finished(event)

    def learn(self, events: list[BatchEvent]) -> tuple[list[BatchFinished],
                                                        list[BatchFilesReady]]:
        """What batch-events teach the spools; returns the `finished` events to send
        webhooks for, and the `files_ready` to announce again."""
        finished: list[BatchFinished] = []
        announce: list[BatchFilesReady] = []
        for event in events:
            if isinstance(event, BatchCreated):
                self.assembler.learn(event.batch_id, project=event.project,
                                     output_expires_after_s=event.output_expires_after_s)
            elif isinstance(event, BatchValidated):
                self.assembler.learn(event.batch_id, total=event.total)
                ready = self.assembler.spool(event.batch_id).files_ready()
                if ready is not None:
                    announce.append(ready)
            elif isinstance(event, BatchFilled):
                spool = self.assembler.spool(event.batch_id)
                if spool.meta.total is None:
                    self.assembler.learn(event.batch_id, total=event.total)
            elif isinstance(event, BatchFinished):
                finished.append(event)
            elif isinstance(event, BatchFillRequested | BatchRedriveRequested):
                ready = self.assembler.spool(event.batch_id).files_ready()
                if ready is not None:
                    announce.append(ready)
        return finished, announce

    async def write_complete(self) -> None:
        for batch_id in self.assembler.complete():
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
            input_tokens=written.tokens[0],
            output_tokens=written.tokens[1],
        )
        await self.producer.send(self.topics.batch_events, batch_id, ready.dumps())
        await asyncio.to_thread(self.assembler.mark_written, batch_id, ready)
        metrics.LINES_WRITTEN.labels("output").inc(ready.completed)
        metrics.LINES_WRITTEN.labels("errors").inc(ready.failed)
        log.info("wrote the files of %s: %d lines", batch_id, written.lines)

    async def between_polls(self) -> None:
        self.lag.maybe(time.monotonic())
        for batch_id in self.assembler.publish_due(self.settings.sink_partial_every_s):
            await asyncio.to_thread(self.assembler.publish, batch_id)
        if time.monotonic() - self._janitor_at >= JANITOR_EVERY_S:
            self._janitor_at = time.monotonic()
            try:
                await self.janitor.clean_up(time.time())
            except OUTAGES as exc:
                log.warning("clean-up put off: %s", exc)


def count_finished(event: BatchFinished) -> None:
    metrics.BATCHES_FINISHED.labels(event.status.value).inc()
    created = (event.batch or {}).get("created_at")
    if isinstance(created, int | float):
        metrics.BATCH_SECONDS.observe(max(event.at - created, 0))
