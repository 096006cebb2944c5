"""The sink loop: responses + batch-events → spool files → sealed output/error files, partial
results while a batch runs, and webhooks when it ends.

Offsets are committed after the records of a poll are written to the spool (and the
webhook deliveries of its terminal transitions recorded), so a crash redelivers only what
the spool may not have; the spool's custom_id index drops repeats, a sealed batch ignores
its late records, and sealing and webhook deliveries are idempotent — so the commit can be
asynchronous: one that is lost only means more of that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Iterable, Iterator

from confluent_kafka import Consumer, Message
from pydantic import ValidationError

from millrace.filestore import FileStore
from millrace.kafka import AsyncProducer, KafkaConfig, take, usable
from millrace.protocol import BATCH_LINE_ERRORS
from millrace.records import (
    BatchFilesReady,
    BatchSealRequested,
    BatchTransition,
    ResponseRecord,
    parse_event,
)
from millrace.registry import Registry
from millrace.results import sealed_key
from millrace.settings import Settings
from millrace.store import Store
from millrace.topics import Topics
from millrace.up.readiness import mark_ready
from sink.assembler import Assembler
from sink.webhooks import Dispatcher

log = logging.getLogger(__name__)


def input_custom_ids(lines: Iterable[bytes]) -> Iterator[str]:
    """custom_ids of a batch input file (already validated: every line has one)."""
    for raw in lines:
        if raw.strip():
            yield str(json.loads(raw)["custom_id"])


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
        self._transitions: list[BatchTransition] = []
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self.consumer.subscribe([self.topics.responses, self.topics.batch_events])
        webhooks = asyncio.create_task(self.webhooks.run(self._stopping))
        mark_ready(self.settings, "sink")
        try:
            while not self._stopping.is_set():
                messages = await asyncio.to_thread(
                    take, self.consumer, self.settings.sink_max_batch, 0.2,
                    self.settings.sink_max_wait_ms / 1000,
                )
                if messages:
                    self.handle(messages)
                    for batch_id in self.assembler.sealable():
                        await self.seal(batch_id)
                    for transition in self._transitions:
                        await self.webhooks.enqueue(transition)
                    self._transitions.clear()
                    self.consumer.commit(asynchronous=True)
                for batch_id in self.assembler.publish_due(self.settings.sink_partial_every_s):
                    await asyncio.to_thread(self.assembler.publish, batch_id)
        finally:
            self._stopping.set()
            await webhooks
            self.consumer.close()
            self.producer.close()
            await self.store.close()

    def handle(self, messages: list[Message]) -> None:
        responses = []
        for msg in messages:
            if not usable(msg):
                continue
            try:
                if msg.topic() == self.topics.responses:
                    responses.append(ResponseRecord.model_validate_json(msg.value() or b""))
                    continue
                event = parse_event(msg.value() or b"")
            except ValidationError:
                log.error("skipping malformed record at %s[%d]@%d",
                          msg.topic(), msg.partition(), msg.offset())
                continue
            if isinstance(event, BatchSealRequested):
                self.assembler.seal_when_complete(event)
            elif isinstance(event, BatchTransition):
                self._transitions.append(event)
        # one write per spool file per poll (a seal request only marks what to wait for)
        self.assembler.add(responses)

    async def seal(self, batch_id: str) -> None:
        spool = self.assembler.spool(batch_id)
        request = spool.seal
        if request is not None and request.fill and request.input_file_id:
            source = await self.store.get_file(request.input_file_id, request.project)
            if source is not None:
                ids = input_custom_ids(self.assembler.files.iter_lines(source.path))
                await asyncio.to_thread(spool.fill, ids, request.fill,
                                        BATCH_LINE_ERRORS.get(request.fill, request.fill))
        sealed = await asyncio.to_thread(self.assembler.seal, batch_id)
        for kind, obj in sealed.files.items():
            if obj is not None:
                await self.registry.put_file(obj, sealed.project, sealed_key(batch_id, kind))
        output, errors = sealed.files["output"], sealed.files["errors"]
        ready = BatchFilesReady(
            batch_id=batch_id,
            output_file_id=output.id if output else None,
            error_file_id=errors.id if errors else None,
            lines=sealed.lines,
            completed=sealed.counts["output"],
            failed=sealed.counts["errors"],
        )
        await self.producer.send(self.topics.batch_events, batch_id, ready.dumps())
        self.assembler.mark_sealed(batch_id)
        log.info("sealed %s: %d lines", batch_id, sealed.lines)
