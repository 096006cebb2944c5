"""Kafka clients configured one way everywhere: durable producers, manual-commit consumers.

All producers use the Java-compatible murmur2 partitioner so that confluent-kafka (gateway,
workers, sink) and aiokafka (the Faust aggregator) put one batch id on the same partition.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from pydantic import BaseModel, ConfigDict

from millrace.errors import DeliveryError

log = logging.getLogger(__name__)

Headers = dict[str, str | bytes | None]


class KafkaConfig(BaseModel):
    """Typed Kafka client settings that render librdkafka dicts."""

    model_config = ConfigDict(frozen=True)

    bootstrap: str
    client_id: str = "millrace"
    session_timeout_ms: int = 6000
    linger_ms: int = 1
    # How long the broker may hold an empty fetch. Measured on tansu (5 idle consumers):
    # 10 ms → 2-7 ms produce→consume, 15% of a core in the broker; 100 ms → 2-5 ms, 3%;
    # 250 ms and more → 86+ ms (it stops answering at once when a record arrives).
    fetch_wait_ms: int = 100

    def base(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "client.id": self.client_id}

    def producer(self, **extra: Any) -> dict[str, Any]:
        return {
            **self.base(),
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "linger.ms": self.linger_ms,
            **extra,
        }

    def consumer(self, group: str, **extra: Any) -> dict[str, Any]:
        return {
            **self.base(),
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": max(self.session_timeout_ms // 6, 500),
            "partition.assignment.strategy": "range",
            "fetch.wait.max.ms": self.fetch_wait_ms,
            **extra,
        }


def take(consumer: Consumer, most: int, wait_first: float, fill_wait: float = 0.0) -> list[Message]:
    """Block up to `wait_first` for one message, then take what else is already fetched,
    waiting at most `fill_wait` more for the batch to fill.

    `Consumer.consume(n, timeout)` alone waits the whole timeout unless n messages arrive,
    which puts the full wait on every idle hop's latency.
    """
    first = consumer.poll(wait_first)
    if first is None:
        return []
    return [first, *consumer.consume(most - 1, fill_wait)] if most > 1 else [first]


def usable(msg: Message) -> bool:
    """False for consumer errors (logged here) and partition-EOF markers."""
    err = msg.error()
    if err is None:
        return True
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consume error: %s", err)
    return False


def read_to_fence(
    config: KafkaConfig, topic: str, fence: Callable[[str], bytes | None],
    timeout: float = 120.0,
) -> Iterator[Message]:
    """Every record of `topic` written before this call, partition by partition.

    A fence record (key `"fence:<token>"`, JSON-quoted so Faust's changelog recovery can
    read it too; value `fence(token)`) is written to each partition first, and each
    partition is read until its fence comes back: exact without trusting high watermarks
    (wrong on tansu 0.6.0 for multi-record produce batches). Fences are not yielded.
    """
    token = uuid.uuid4().hex
    fence_key = f'"fence:{token}"'.encode()
    consumer = Consumer(config.consumer(f"millrace-reader-{token}"))
    try:
        partitions = list(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        producer = Producer(config.producer(**{"batch.num.messages": 1}))
        for p in partitions:
            producer.produce(topic, key=fence_key, value=fence(token), partition=p)
        if producer.flush(30):
            raise DeliveryError(f"fences on {topic} not acknowledged")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        waiting = set(partitions)
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise DeliveryError(f"read {topic} for {timeout}s without reaching the fence "
                                    f"on partitions {sorted(waiting)}")
            for msg in consumer.consume(500, 0.2):
                if not usable(msg):
                    continue
                if msg.key() == fence_key:
                    waiting.discard(msg.partition() or 0)
                elif (msg.key() or b"").startswith(b'"fence:'):
                    continue  # an earlier reader's fence
                elif msg.partition() in waiting:
                    yield msg
    finally:
        consumer.close()


def ensure_topics(config: KafkaConfig, layout: dict[str, int], timeout: float = 30.0,
                  configs: dict[str, dict[str, str]] | None = None) -> None:
    """Create missing topics; existing ones are left as they are."""
    admin = AdminClient(config.base())
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(name, num_partitions=n, replication_factor=1,
                 config=(configs or {}).get(name, {}))
        for name, n in layout.items()
        if name not in existing
    ]
    if not wanted:
        return
    for name, fut in admin.create_topics(wanted, request_timeout=timeout).items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        log.info("created topic %s", name)


class AsyncProducer:
    """confluent-kafka Producer whose deliveries are awaitable from asyncio."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._producer = Producer(config)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def produce(
        self, topic: str, key: str, value: bytes | None, headers: Headers | None = None,
        partition: int | None = None,
    ) -> asyncio.Future[Message]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                loop.call_soon_threadsafe(_settle, fut, KafkaException(err), None)
            else:
                loop.call_soon_threadsafe(_settle, fut, None, msg)

        self._produce_waiting(topic, key, value, delivered, headers, partition)
        return fut

    async def send(
        self, topic: str, key: str, value: bytes | None, headers: Headers | None = None
    ) -> Message:
        """Produce and wait for the broker's acknowledgement (`value` None: a tombstone)."""
        return await self.produce(topic, key, value, headers)

    def send_all(
        self, items: Iterable[tuple[str, str, int | None, bytes]], timeout: float = 120.0
    ) -> int:
        """Blocking: produce every (topic, key, partition, value) and wait until the broker
        acknowledged all (partition None: by key)."""
        cond = threading.Condition()
        pending = 0
        failed: list[KafkaError] = []

        def delivered(err: KafkaError | None, msg: Message) -> None:
            nonlocal pending
            with cond:
                pending -= 1
                if err is not None:
                    failed.append(err)
                cond.notify_all()

        sent = 0
        for topic, key, partition, value in items:
            with cond:
                pending += 1
            self._produce_waiting(topic, key, value, delivered, None, partition)
            sent += 1
        with cond:
            if not cond.wait_for(lambda: pending == 0, timeout):
                raise DeliveryError(f"{pending} of {sent} records not acknowledged in {timeout}s")
        if failed:
            raise DeliveryError(f"{len(failed)} of {sent} records failed: {failed[0]}")
        return sent

    def _produce_waiting(
        self, topic: str, key: str, value: bytes | None, callback: Any,
        headers: Headers | None = None, partition: int | None = None,
    ) -> None:
        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value=value, key=key,
                                           on_delivery=callback, headers=headers)
                else:
                    self._producer.produce(topic, value=value, key=key, partition=partition,
                                           on_delivery=callback, headers=headers)
                return
            except BufferError:
                # Local queue full: wait for deliveries instead of growing without bound.
                self._producer.poll(0.05)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._stop.set()
        self._poller.join(timeout)


def _settle(
    fut: asyncio.Future[Message], exc: BaseException | None, msg: Message | None
) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(msg)  # type: ignore[arg-type]
