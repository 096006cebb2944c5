"""The workers' latest load, followed from `<prefix>.workers` by each gateway process (from
the end: a worker reports every `STATUS_EVERY_S`, so the board fills within seconds of a
start), for the dashboard's workers page. Nothing here is durable or needs to be."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from confluent_kafka import OFFSET_END, Consumer, TopicPartition
from pydantic import ValidationError

from millrace.kafka import KafkaConfig, polled
from millrace.records import WorkerStatus
from millrace.settings import Settings
from millrace.topics import Topics

GONE_AFTER_S = 15.0  # a worker not heard from for this long is no longer shown


class WorkerBoard:
    def __init__(self) -> None:
        self._latest: dict[str, WorkerStatus] = {}
        self._lock = threading.Lock()

    def put(self, status: WorkerStatus) -> None:
        with self._lock:
            if status.stopped:
                self._latest.pop(status.worker, None)
            else:
                self._latest[status.worker] = status

    def live(self, now: float | None = None) -> list[WorkerStatus]:
        now = time.time() if now is None else now
        with self._lock:
            return sorted((s for s in self._latest.values() if now - s.at < GONE_AFTER_S),
                          key=lambda s: s.worker)


class WorkerFollower:
    """A gateway stage: the board kept up to date (a fresh consumer after an outage)."""

    def __init__(self, settings: Settings, board: WorkerBoard) -> None:
        self.topic = Topics.from_settings(settings).workers
        # no offsets are ever committed: the group only names this reader
        kafka = KafkaConfig.of(settings, "gateway-board")
        self.consumer = Consumer(kafka.follower(f"millrace-board-{uuid.uuid4().hex}"))
        self.board = board
        self._closing = threading.Event()

    async def run(self) -> None:
        try:
            await asyncio.to_thread(self._follow)
        finally:
            await asyncio.to_thread(self.consumer.close)

    def stop(self) -> None:
        self._closing.set()

    def _follow(self) -> None:
        self.consumer.assign([TopicPartition(self.topic, 0, OFFSET_END)])
        for msg in polled(self.consumer, self._closing.is_set):
            try:
                self.board.put(WorkerStatus.model_validate_json(msg.value() or b""))
            except ValidationError:
                continue
