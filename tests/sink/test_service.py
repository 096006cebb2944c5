"""A sink that takes a partition over from another host (its own data dir) finishes the
batches the other sink had begun: it reads the partition again from the first record of its
oldest unfinished batch, handles only the batches that were unfinished, and writes every
line once, in the order the first sink published them."""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from millrace.filestore import FileStore
from millrace.kafka import KafkaConfig, ensure_topics
from millrace.lifecycle.status import BatchStatus
from millrace.records import (
    BatchCreated,
    BatchFilesReady,
    BatchFinished,
    BatchValidated,
    ResponseRecord,
    line_ticket,
    parse_event,
)
from millrace.result_files import final_key, partial_dir, segments
from millrace.settings import KafkaSettings, Settings
from millrace.storage.store import Store
from millrace.topics import Topics
from sink.service import Sink
from tests.deployment import Deployment

LINES, FIRST_HOST = 100, 60


LINE_KEY = "00" * 16  # the batches' key for their lines' tickets (Redis, as the gateway makes)


def response(batch_id: str, line: int) -> bytes:
    return ResponseRecord(
        batch_id=batch_id, project="p", custom_id=f"c{line}", line=line, id=f"batch_req_{line}",
        request_id=f"req_{line}", status_code=200,
        body={"n": line, "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        ticket=line_ticket(LINE_KEY, line, f"c{line}")).dumps()


def test_a_sink_on_another_host_finishes_what_the_first_one_began(
        echo: Deployment, tmp_path: Path) -> None:
    prefix = f"takeover{uuid.uuid4().hex[:8]}"
    shared_files = str(tmp_path / "shared-store")  # what s3:// is between hosts

    def settings(host: str) -> Settings:
        return Settings(data_dir=tmp_path / host, topic_prefix=prefix, partitions=1,
                        kafka=KafkaSettings(bootstrap=str(echo.endpoints["kafka_bootstrap"])),
                        redis_url=str(echo.endpoints["redis_url"]), file_store_url=shared_files,
                        sink_partial_every_s=0.05)

    base = settings("host-a")
    topics = Topics(prefix)
    kafka = KafkaConfig(base.kafka, "test")
    ensure_topics(kafka, topics.layout(base), configs=topics.configs())
    producer = Producer(kafka.producer())
    files = FileStore(shared_files)
    running, done = f"batch_{uuid.uuid4().hex[:12]}", f"batch_{uuid.uuid4().hex[:12]}"

    def send(topic: str, key: str, value: bytes) -> None:
        producer.produce(topic, value, key=key)
        assert producer.flush(30) == 0

    def event(record: Any) -> None:
        send(topics.batch_events, record.batch_id, record.dumps())

    async def scenario() -> dict[str, Any]:
        store = Store.connect(base.require_redis(), prefix)
        await store.r.sadd(store.keys.active, running, done)
        await asyncio.gather(*(store.r.hset(store.keys.batch(b), mapping={
            "project": "p", "line_key": LINE_KEY}) for b in (running, done)))

        async def until(what: Callable[[], Any], why: str, timeout: float = 60) -> None:
            deadline = time.monotonic() + timeout
            while not ((await seen) if inspect.isawaitable(seen := what()) else seen):
                assert time.monotonic() < deadline, why
                await asyncio.sleep(0.05)

        async def exists(key: str) -> bool:
            return await asyncio.to_thread(files.exists, key)

        # host A: a running batch gets 60 of its 100 lines; another batch starts after it
        # and finishes entirely
        for batch_id, total in ((running, LINES), (done, 3)):
            event(BatchCreated(batch_id=batch_id, project="p", batch={"id": batch_id}))
            event(BatchValidated(batch_id=batch_id, total=total))
        for line in range(1, FIRST_HOST + 1):
            send(topics.responses, running, response(running, line))
        for line in (1, 2, 3):
            send(topics.responses, done, response(done, line))
        first = Sink(settings("host-a"))
        task = asyncio.create_task(first.run())
        await until(lambda: exists(final_key(done, "output")), "host A writes the files")
        event(BatchFinished(batch_id=done, project="p", status=BatchStatus.COMPLETED,
                            batch={"id": done}))
        await until(lambda: _not_active(store, done), "host A takes the finished event")
        await until(lambda: _published(files, running) == FIRST_HOST,
                    "host A publishes the running batch's lines as partial results")
        published = b"".join(files.read_bytes(key) for _, _, key in
                             segments(files, running, "output"))
        first._stopping.set()
        await task
        shutil.rmtree(tmp_path / "host-a")  # that host is gone, and its disk with it
        committed = _committed(kafka, topics.sink_group(), topics.responses)
        done_file = files.read_bytes(final_key(done, "output"))

        # the rest of the lines, and a worker's repeat of some of the first ones
        for line in [*range(FIRST_HOST + 1, LINES + 1), 1, 2, 3]:
            send(topics.responses, running, response(running, line))
        second = Sink(settings("host-b"))
        task = asyncio.create_task(second.run())
        await until(lambda: exists(final_key(running, "output")),
                    "host B writes the running batch's files")
        second._stopping.set()
        await task
        sink_from = await store.r.zrange(store.keys.sink_from(topics.responses, 0), 0, -1)
        await store.close()
        return {"published": published, "committed": committed, "done_file": done_file,
                "sink_from": sink_from}

    seen = asyncio.run(scenario())
    producer.flush(10)

    assert seen["committed"] == FIRST_HOST + 3  # host A had committed past every line
    output = files.read_bytes(final_key(running, "output")).splitlines(keepends=True)
    ids = [json.loads(line)["custom_id"] for line in output]
    assert sorted(ids) == sorted(f"c{n}" for n in range(1, LINES + 1))  # each line once
    # in the order host A published them, so a reader's cursor stays right
    assert b"".join(output[:FIRST_HOST]) == seen["published"]
    # the batch that had finished was left alone: one announcement, its file untouched
    ready = [e for e in _events(kafka, topics.batch_events)
             if isinstance(e, BatchFilesReady) and e.batch_id == done]
    assert len(ready) == 1
    assert files.read_bytes(final_key(done, "output")) == seen["done_file"]
    ready_running = [e for e in _events(kafka, topics.batch_events)
                     if isinstance(e, BatchFilesReady) and e.batch_id == running]
    assert [(e.completed, e.failed, e.output_tokens) for e in ready_running] == [
        (LINES, 0, 2 * LINES)]
    assert seen["sink_from"] == [running]  # the finished batch is no longer read back to
    assert not files.names(partial_dir(running))


async def _not_active(store: Store, batch_id: str) -> bool:
    return not await store.r.sismember(store.keys.active, batch_id)


def _published(files: FileStore, batch_id: str) -> int:
    return max((end for _, end, _ in segments(files, batch_id, "output")), default=0)


def _committed(kafka: KafkaConfig, group: str, topic: str) -> int:
    consumer = Consumer(kafka.consumer(group))
    [tp] = consumer.committed([TopicPartition(topic, 0)], timeout=30)
    consumer.close()
    return int(tp.offset)


def _events(kafka: KafkaConfig, topic: str) -> list[Any]:
    consumer = Consumer(kafka.consumer(f"read-{uuid.uuid4().hex}",
                                       **{"enable.partition.eof": True}))
    consumer.assign([TopicPartition(topic, 0, 0)])
    found = []
    while True:
        msg = consumer.poll(10)
        assert msg is not None, "the topic's end was not reached"
        if msg.error():
            break
        found.append(parse_event(msg.value() or b""))
    consumer.close()
    return found


def test_a_sink_that_wakes_up_stale_writes_nothing_of_its_successor(
        echo: Deployment, tmp_path: Path) -> None:
    """The issue-25 pause, for the sink: it holds a poll's records of a batch (every line
    and the `finished` event) when another sink takes its partition over (each took the
    partition's owner epoch as the group gave it to them). Handling what it held, the stale
    sink writes no file, publishes no progress, marks no line, enqueues no webhook; the
    same records make the owner do all of that."""
    prefix = f"fence{uuid.uuid4().hex[:8]}"
    settings = {host: Settings(
        data_dir=tmp_path / host, topic_prefix=prefix, partitions=1,
        kafka=KafkaSettings(bootstrap=str(echo.endpoints["kafka_bootstrap"])),
        redis_url=str(echo.endpoints["redis_url"]), file_store_url=str(tmp_path / "store"),
        webhook_allow="loopback", webhook_signing_key="test-key")
        for host in ("stale", "owner")}
    topics = Topics(prefix)
    kafka = KafkaConfig(settings["stale"].kafka, "test")
    ensure_topics(kafka, topics.layout(settings["stale"]), configs=topics.configs())
    producer = Producer(kafka.producer())
    files = FileStore(str(tmp_path / "store"))
    batch_id = f"batch_{uuid.uuid4().hex[:12]}"
    hook = [{"url": "http://127.0.0.1:9/hook", "source": "batch"}]
    for record in (BatchCreated(batch_id=batch_id, project="p", batch={"id": batch_id}),
                   BatchValidated(batch_id=batch_id, total=3)):
        producer.produce(topics.batch_events, record.dumps(), key=batch_id)
    for line in (1, 2, 3):
        producer.produce(topics.responses, response(batch_id, line), key=batch_id)
    producer.produce(topics.batch_events, BatchFinished(
        batch_id=batch_id, project="p", status=BatchStatus.COMPLETED, batch={"id": batch_id},
        webhooks=hook).dumps(), key=batch_id)
    assert producer.flush(30) == 0
    held = _held(kafka, topics, 6)

    async def scenario() -> dict[str, Any]:
        store = Store.connect(settings["stale"].require_redis(), prefix)
        await store.r.sadd(store.keys.active, batch_id)
        await store.r.hset(store.keys.batch(batch_id), mapping={"project": "p",
                                                                 "line_key": LINE_KEY})
        stale, owner = Sink(settings["stale"]), Sink(settings["owner"])
        stale.owners.take([0])  # as the group gave it the partition
        owner.owners.take([0])  # the stale one froze: its session expired, the owner took it
        await stale.handle(held)  # wakes up with what it held
        seen: dict[str, Any] = {
            "file": await asyncio.to_thread(files.exists, final_key(batch_id, "output")),
            "done": await store.done_lines(batch_id),
            "deliveries": await store.r.zcard(f"{prefix}:whd-batch:{batch_id}"),
            "events": [e.type for e in _events(kafka, topics.batch_events)]}
        await owner.handle(held)  # the same records, by the partition's owner
        seen["owner_file"] = await asyncio.to_thread(files.exists,
                                                     final_key(batch_id, "output"))
        seen["owner_deliveries"] = await store.r.zcard(f"{prefix}:whd-batch:{batch_id}")
        seen["owner_events"] = [e.type for e in _events(kafka, topics.batch_events)]
        for sink in (stale, owner):  # never ran: only their clients to close
            sink.producer.close()
            sink.consumer.close()
            sink.owners.close()
            await sink.store.close()
        await store.close()
        return seen

    seen = asyncio.run(scenario())
    assert not seen["file"] and not seen["done"] and seen["deliveries"] == 0
    assert seen["events"] == ["created", "validated", "finished"]  # nothing published
    assert seen["owner_file"] and seen["owner_deliveries"] == 1
    assert seen["owner_events"][3:] == ["progress", "files_ready"]


def _held(kafka: KafkaConfig, topics: Topics, want: int) -> list[Any]:
    """The first `want` records of both topics, as a sink's poll returns them."""
    consumer = Consumer(kafka.consumer(f"held-{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(topics.batch_events, 0, 0),
                     TopicPartition(topics.responses, 0, 0)])
    found: list[Any] = []
    deadline = time.monotonic() + 60
    while len(found) < want and time.monotonic() < deadline:
        msg = consumer.poll(1)
        if msg is not None and not msg.error():
            found.append(msg)
    consumer.close()
    assert len(found) == want
    return sorted(found, key=lambda m: m.topic() == topics.responses)  # events first
