"""Batches whose unstarted lines must not run, learnt from the batch-events topic.

Every worker reads all of batch-events itself (assigned partitions, no consumer group), so
a cancel or expiry reaches every worker whichever partitions of requests it owns.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from pydantic import ValidationError

from millrace.kafka import KafkaConfig, polled, skip_malformed
from millrace.lifecycle.status import BatchStatus
from millrace.records import BatchTransition, parse_event

log = logging.getLogger(__name__)

# Status a batch entered → the error code its unstarted lines get.
STOP_CODES = {
    BatchStatus.CANCELLING: "batch_cancelled",
    BatchStatus.EXPIRED: "batch_expired",
}


class StoppedBatches:
    def __init__(self, kafka: KafkaConfig, topic: str) -> None:
        self._codes: dict[str, str] = {}
        # bumped for every batch that stops: the worker looks at its running lines again
        self.version = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._consumer = Consumer(kafka.follower(f"millrace-stops-{uuid.uuid4().hex}"))
        partitions = self._consumer.list_topics(topic, timeout=30).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self._thread = threading.Thread(target=self._follow, name="stops", daemon=True)
        self._thread.start()

    def code(self, batch_id: str) -> str | None:
        with self._lock:
            return self._codes.get(batch_id)

    def _follow(self) -> None:
        for msg in polled(self._consumer, self._closing.is_set, wait=0.1):
            try:
                event = parse_event(msg.value() or b"")
            except ValidationError:
                skip_malformed(msg)
                continue
            handler = self.HANDLERS.get(event.type)
            if handler is not None:
                handler(self, event)

    def _on_transition(self, event: BatchTransition) -> None:
        if event.to_status in STOP_CODES:
            with self._lock:
                self._codes[event.batch_id] = STOP_CODES[event.to_status]
                self.version += 1
            log.info("%s: unstarted lines become %s", event.batch_id,
                     STOP_CODES[event.to_status])

    # event type → what the worker does (its readers in `millrace.records.EVENT_FLOW`)
    HANDLERS: ClassVar[dict[str, Callable[[StoppedBatches, Any], None]]] = {
        "transition": _on_transition,
    }

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self._consumer.close()
