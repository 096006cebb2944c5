"""Kafka clients configured one way everywhere: durable producers, manual-commit consumers.

All producers use the Java-compatible murmur2 partitioner (Java's and aiokafka's default), so
every service's producer, and a subscriber's own, put one batch id on the same partition.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

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

from millrace import metrics
from millrace.errors import OUTAGES, ComponentError, DeliveryError, disk_full
from millrace.settings import KafkaSettings, Settings

R = TypeVar("R")  # a record as a consumer hands it over

log = logging.getLogger(__name__)

Headers = dict[str, str | bytes | None]
OUTAGE_RETRY_S = 1.0
FOLLOWER_FETCH_WAIT_MS = 1000


class TopicLayoutError(ComponentError):
    """A topic exists with another partition count than the settings say."""


class KafkaConfig:
    """The librdkafka configurations of one service's clients, all rendered from
    `KafkaSettings.librdkafka` (bootstrap, security, client id, extra options)."""

    def __init__(self, kafka: KafkaSettings, service: str) -> None:
        self.kafka = kafka
        self.service = service

    @classmethod
    def of(cls, settings: Settings, service: str) -> KafkaConfig:
        return cls(settings.kafka, service)

    def base(self) -> dict[str, Any]:
        return self.kafka.librdkafka(self.service)

    def producer(self, **extra: Any) -> dict[str, Any]:
        """acks=all and retries, without idempotence. Measured: an idempotent producer
        that has records in flight when the embedded broker restarts empty goes into a
        fatal state for good (librdkafka `_FATAL`), while this one delivers every record to
        the new broker. A retry may duplicate a record: every consumer drops duplicates
        (by batch and custom_id), and where order matters the producer waits for each
        acknowledgement before the next record."""
        return self.kafka.librdkafka(self.service, **{
            "acks": "all",
            "enable.idempotence": False,
            "partitioner": "murmur2_random",
            "linger.ms": 1,
            "compression.type": self.kafka.compression,
            **extra,
        })

    def consumer(self, group: str, **extra: Any) -> dict[str, Any]:
        timeout = self.kafka.session_timeout_ms
        return self.kafka.librdkafka(self.service, **{
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": timeout,
            "heartbeat.interval.ms": max(timeout // 6, 500),
            "partition.assignment.strategy": "range",
            "fetch.wait.max.ms": self.kafka.fetch_wait_ms,
            **extra,
        })

    def follower(self, group: str, **extra: Any) -> dict[str, Any]:
        """A consumer that follows a topic where a second's delay does no harm (a worker's
        cancel/expiry follower, the gateways' worker board): the broker may hold its empty
        fetches 1 s. Every idle fetch costs the embedded broker CPU, which on a CPU host is
        taken from the engine (idle deployment: broker 6.3 % of a core at 100 ms)."""
        return self.consumer(group, **{"fetch.wait.max.ms": FOLLOWER_FETCH_WAIT_MS, **extra})


@functools.lru_cache(maxsize=4096)
def partition_of(key: str, partitions: int) -> int:
    """The partition the producers' partitioner (Java's murmur2, `murmur2_random` in
    librdkafka) puts `key` on."""
    data, m = key.encode(), 0x5BD1E995
    h = (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    whole = len(data) & ~3
    for i in range(0, whole, 4):
        k = (int.from_bytes(data[i:i + 4], "little") * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = data[whole:]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h = ((h ^ tail[0]) * m) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * m) & 0xFFFFFFFF
    return ((h ^ (h >> 15)) & 0x7FFFFFFF) % partitions


def produce(
    producer: Producer, topic: str, value: bytes | None, *, key: str | bytes | None = None,
    partition: int | None = None, headers: Headers | None = None,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
) -> None:
    """Queue one record; when the local queue is full, serve deliveries until it has room
    (bounded memory: a producer faster than the broker waits instead of growing)."""
    args: dict[str, Any] = {"value": value, "key": key, "headers": headers,
                            "on_delivery": on_delivery}
    if partition is not None:
        args["partition"] = partition
    while True:
        try:
            producer.produce(topic, **args)
            return
        except BufferError:
            producer.poll(0.05)


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


def partition_names(partitions: list[TopicPartition]) -> str:
    """`topic[0], topic[1]` for a log line."""
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


def usable(msg: Message) -> bool:
    """False for consumer errors (logged here) and partition-EOF markers."""
    err = msg.error()
    if err is None:
        return True
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consume error: %s", err)
    return False


def polled(consumer: Consumer, until: Callable[[], bool], most: int = 500,
           wait: float = 0.2) -> Iterator[Message]:
    """Every usable message as it arrives, until `until()` (checked at least every `wait`
    seconds) — for readers that follow a topic without committing."""
    while not until():
        for msg in consumer.consume(most, wait):
            if usable(msg):
                yield msg


async def consume_loop(
    consumer: Consumer, handle: Callable[[list[Message]], Awaitable[None]],
    stopping: asyncio.Event, *, most: int = 500, wait_first: float = 0.2,
    fill_wait: float = 0.0, commit: Literal["sync", "async", "none"] = "async",
    every: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """A service's consume loop: take what Kafka has (blocking for the first message),
    hand the usable messages to `handle`, then commit the consumer's positions.

    `handle` returns only once everything the messages must cause is durable, so a
    commit never covers work that a crash could lose; a commit that is lost (async) only
    means those messages come again, which every handler tolerates. `every` runs after
    each round, busy or idle (at least every `wait_first` seconds). With `commit="none"`
    the service commits itself (its `every`, say), for handlers that finish out of order.

    If the broker or Redis is away (`OUTAGES`), or a disk is full, the same messages are
    handled again once it is back, so an outage stalls the service and never ends it.
    """
    while not stopping.is_set():
        messages = await asyncio.to_thread(take, consumer, most, wait_first, fill_wait)
        if messages:
            await until_handled(handle, [m for m in messages if usable(m)], stopping)
            if commit == "sync":
                await asyncio.to_thread(_commit_sync, consumer)
            elif commit == "async":
                consumer.commit(asynchronous=True)
        if every is not None:
            await every()


async def until_handled(handle: Callable[[list[R]], Awaitable[None]], records: list[R],
                        stopping: asyncio.Event | None = None) -> None:
    """`handle(records)`; while the broker or Redis is away, or a disk is full, the same
    records again once it is back (unless `stopping`), so nothing after them is committed
    meanwhile."""
    while True:
        try:
            await handle(records)
            return
        except Exception as exc:
            if not isinstance(exc, OUTAGES) and not disk_full(exc):
                raise
            log.warning("waiting for the broker, Redis or disk space: %s: %s",
                        type(exc).__name__, exc)
            if stopping is not None and stopping.is_set():
                raise
            await asyncio.sleep(OUTAGE_RETRY_S)


def _commit_sync(consumer: Consumer) -> None:
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:  # e.g. mid-rebalance: the messages come again
        log.warning("commit failed: %s", exc)


def skip_malformed(msg: Message) -> None:
    """A record that is not what its topic carries: logged and counted; the caller moves on
    (a direct producer or a broken client wrote it, and nothing can be done with it)."""
    malformed(msg.topic() or "", msg.partition() or 0, msg.offset() or 0,
              len(msg.value() or b""))


def malformed(topic: str, partition: int, offset: int, size: int) -> None:
    """`skip_malformed` for a record any client fetched (the aggregator's is Faust's)."""
    metrics.MALFORMED.labels(_base_topic(topic)).inc()
    log.warning("skipping a malformed record at %s[%s]@%s (%d bytes)", topic, partition,
                offset, size)


def _base_topic(topic: str) -> str:
    """The topic without its prefix; every model's requests topic as `requests`."""
    name = topic.split(".", 1)[-1]
    return "requests" if name.startswith("requests.") else name


def read_to_fence(
    config: KafkaConfig, topic: str, fence: Callable[[str], bytes | None],
    timeout: float = 120.0,
) -> Iterator[Message]:
    """Every record of `topic` written before this call, partition by partition.

    A fence record (key `"fence:<token>"`, value `fence(token)`) is written to each
    partition first, and each partition is read until its fence comes back: exact without
    trusting high watermarks (wrong on tansu 0.6.0 for multi-record produce batches).
    Fences are not yielded.
    """
    token = uuid.uuid4().hex
    fence_key = f'"fence:{token}"'.encode()
    consumer = Consumer(config.consumer(f"millrace-reader-{token}"))
    try:
        partitions = list(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        producer = Producer(config.producer(**{"batch.num.messages": 1}))
        for p in partitions:
            produce(producer, topic, fence(token), key=fence_key, partition=p)
        if producer.flush(30):
            raise DeliveryError(f"fences on {topic} not acknowledged")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        waiting = set(partitions)
        deadline = time.monotonic() + timeout

        def done() -> bool:
            if waiting and time.monotonic() > deadline:
                raise DeliveryError(f"read {topic} for {timeout}s without reaching the fence "
                                    f"on partitions {sorted(waiting)}")
            return not waiting

        for msg in polled(consumer, done):
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
    """Create missing topics. An existing topic must have the layout's partition count:
    batch ids are routed to partitions by that count."""
    admin = AdminClient(config.base())
    found = admin.list_topics(timeout=timeout).topics
    wrong = {name: len(found[name].partitions) for name, n in layout.items()
             if name in found and len(found[name].partitions) != n}
    if wrong:
        raise TopicLayoutError(", ".join(
            f"{name} has {n} partitions, millrace is set up for {layout[name]}"
            for name, n in sorted(wrong.items())))
    existing = set(found)
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


class BulkProducer:
    """Produces many records at once and waits until the broker acknowledged them all.

    Delivery reports come only for failures: a Python callback per record (as
    `AsyncProducer` has) was three quarters of the time to produce 50,000 request lines
    (0.38 s against 0.07 s with lz4, measured on the embedded broker).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._failed: list[KafkaError] = []
        # records wait up to 20 ms to fill bigger batches (fewer, larger produce requests:
        # broker 0.76-0.93 -> 0.61-0.82 CPU-s on 50,000 lines); `flush` sends at once
        self._producer = Producer({**config, "linger.ms": 20, "delivery.report.only.error": True,
                                   "on_delivery": self._failure})

    def _failure(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failed.append(err)

    def send_all(
        self, items: Iterable[tuple[str, str, int | None, bytes]], timeout: float = 120.0
    ) -> int:
        """Blocking: produce every (topic, key, partition, value) — partition None: by
        key — and wait until the broker acknowledged all. A failure of any record sent
        meanwhile (by another thread) fails this call too: callers send again, and every
        consumer drops duplicates."""
        failed = len(self._failed)
        sent = 0
        for topic, key, partition, value in items:
            produce(self._producer, topic, value, key=key, partition=partition)
            sent += 1
        left = self._producer.flush(timeout)
        if left:
            raise DeliveryError(f"{left} of {sent} records not acknowledged in {timeout}s")
        if len(self._failed) > failed:
            raise DeliveryError(f"{len(self._failed) - failed} records failed: "
                                f"{self._failed[-1]}")
        return sent

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)


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

        produce(self._producer, topic, value, key=key, partition=partition, headers=headers,
                on_delivery=delivered)
        return fut

    def cluster_id(self, timeout: float = 10.0) -> str:
        """The broker cluster's id: it changes when the embedded broker starts afresh, so
        anything recorded against it (an explode checkpoint) is void after a data loss."""
        return str(self._producer.list_topics(timeout=timeout).cluster_id)

    async def send(
        self, topic: str, key: str, value: bytes | None, headers: Headers | None = None
    ) -> Message:
        """Produce and wait for the broker's acknowledgement (`value` None: a tombstone)."""
        return await self.produce(topic, key, value, headers)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._stop.set()
        self._poller.join(timeout)
        # librdkafka lets the client go (connections, reconnects) only when the Producer
        # is freed, and whoever holds this object (a Faust app lives on in Faust's
        # registries) would keep it: drop it now
        del self._producer


def _settle(
    fut: asyncio.Future[Message], exc: BaseException | None, msg: Message | None
) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(msg)  # type: ignore[arg-type]
