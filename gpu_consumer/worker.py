"""The worker loop: requests topic → micro-batch → engine → responses topic → commit.

Offsets are committed only after every response of the micro-batch is acknowledged by the
broker (at-least-once); the sink and aggregator are idempotent on (batch_id, custom_id).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from types import FrameType

from confluent_kafka import Consumer, KafkaError, Message, Producer
from pydantic import ValidationError

from gpu_consumer.engine import Engine, EngineRequest, EngineResult
from gpu_consumer.stops import StoppedBatches
from millrace.errors import DeliveryError
from millrace.kafka import KafkaConfig, take, usable
from millrace.protocol import BATCH_LINE_ERRORS, LineError
from millrace.records import RequestRecord, ResponseRecord, Usage
from millrace.settings import Settings
from millrace.topics import Topics

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.topics = Topics.from_settings(settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        kafka = KafkaConfig(bootstrap=settings.require_kafka(), client_id="millrace-worker")
        self.consumer = Consumer(kafka.consumer(self.topics.worker_group()))
        self.producer = Producer(kafka.producer())
        self.stops = StoppedBatches(kafka, self.topics.batch_events)
        self._running = True
        self._failed_deliveries = 0

    def stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self._running = False

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.consumer.subscribe([self.topics.requests])
        if on_ready is not None:
            on_ready()
        try:
            while self._running:
                messages = take(self.consumer, self.settings.worker_max_batch, 0.5,
                                self.settings.worker_max_wait_ms / 1000)
                if messages:
                    self.process(messages)
        finally:
            # Graceful stop: the last micro-batch was finished and committed above.
            self.producer.flush(30)
            self.consumer.close()
            self.stops.close()

    def process(self, messages: list[Message]) -> None:
        records: list[RequestRecord] = []
        for msg in messages:
            if not usable(msg):
                continue
            try:
                records.append(RequestRecord.model_validate_json(msg.value() or b""))
            except ValidationError:
                # Not a millrace request record: nothing to answer, log and move on.
                log.error("skipping malformed request record at %s[%d]@%d",
                          msg.topic(), msg.partition(), msg.offset())
        self._failed_deliveries = 0
        runnable: list[RequestRecord] = []
        for record in records:
            code = self.stops.code(record.batch_id)
            if code is None:
                runnable.append(record)
            else:
                self._produce(record, error=LineError(code=code, message=BATCH_LINE_ERRORS[code]))
        if runnable:
            started = time.perf_counter()
            results = self.engine.run([EngineRequest(r.url, r.body) for r in runnable])
            elapsed = time.perf_counter() - started
            log.info("ran %d requests in %.3fs", len(runnable), elapsed)
            for record, result in zip(runnable, results, strict=True):
                self._produce(record, result, engine_ms=elapsed * 1000)
        pending = self.producer.flush(60)
        if pending or self._failed_deliveries:
            # Exit without committing: the restarted worker redoes this micro-batch.
            raise DeliveryError(
                f"{pending} responses pending, {self._failed_deliveries} failed; not committing"
            )
        self.consumer.commit(asynchronous=False)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            log.error("response delivery failed: %s", err)
            self._failed_deliveries += 1

    def _produce(
        self, record: RequestRecord, result: EngineResult | None = None,
        error: LineError | None = None, engine_ms: float | None = None,
    ) -> None:
        """One response: the engine's result, or a batch-level error for a line not run."""
        response = ResponseRecord(
            batch_id=record.batch_id,
            project=record.project,
            custom_id=record.custom_id,
            id=f"batch_req_{uuid.uuid4().hex}",
            request_id=f"req_{uuid.uuid4().hex}" if result else None,
            status_code=result.status_code if result else None,
            body=result.body if result else None,
            error=error,
            usage=result.usage if result else Usage(),
            worker=self.name,
            engine_ms=engine_ms,
        )
        self.producer.produce(
            self.topics.responses,
            key=record.batch_id,
            value=response.dumps(),
            headers={"batch_id": record.batch_id, "custom_id": record.custom_id},
            on_delivery=self._delivered,
        )
        self.producer.poll(0)
