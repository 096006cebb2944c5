"""The aggregator's Faust app built in-process from its own settings (its own topic prefix)
against the real broker and Redis: it applies a batch's events, publishes transitions and
one `finished`, keeps its state in Redis, and a second aggregator picks the batch up from
there; a stale one never undoes its successor's state."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Message

from millrace.kafka import AsyncProducer, KafkaConfig, partition_of, polled
from millrace.records import (
    BatchCreated,
    BatchFilesReady,
    BatchProgress,
    BatchValidated,
    Record,
    parse_event,
)
from millrace.storage.store import Store, Version
from millrace.topics import Topics
from streams.aggregator import Aggregator, Fetched
from tests.deployment import Deployment
from tests.streams.harness import own_topics, running, until

DOC = {"id": "batch_x", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
       "completion_window": "24h", "status": "validating", "created_at": int(time.time()),
       "expires_at": int(time.time()) + 3600}


def test_an_aggregator_built_from_settings_in_process(deployment: Deployment,
                                                       tmp_path: Path) -> None:
    settings, topics, kafka = own_topics(deployment, tmp_path)

    async def scenario() -> tuple[str, str, list[dict[str, object]]]:
        store = Store.connect(str(settings.redis_url), settings.topic_prefix)
        producer = AsyncProducer(kafka.producer())

        async def send(*events: Record) -> None:
            for event in events:
                await producer.send(topics.batch_events, "batch_x", event.dumps())

        async def status() -> str:
            batch = await store.get_batch("batch_x", "p")
            return batch.status.value if batch else ""

        async with running(settings):
            await send(BatchCreated(batch_id="batch_x", project="p", batch=DOC,
                                    listed_at=1.0),
                       BatchValidated(batch_id="batch_x", total=2, model="m"),
                       BatchProgress(batch_id="batch_x", completed=1, failed=0))
            await until(lambda: _is(status, "in_progress"))
        middle = await status()
        # a second aggregator (a restart) goes on from the state in Redis
        async with running(settings):
            await send(BatchProgress(batch_id="batch_x", completed=2, failed=0),
                       BatchFilesReady(batch_id="batch_x", output_file_id="o",
                                       error_file_id=None, lines=2, completed=2,
                                       input_tokens=3, output_tokens=4))
            await until(lambda: _is(status, "completed"))
        final = await store.get_batch("batch_x", "p")
        assert final is not None and final.usage.total_tokens == 7
        producer.close()
        await store.close()
        return middle, final.status.value, _published(kafka, topics)

    middle, final, published = asyncio.run(scenario())
    assert (middle, final) == ("in_progress", "completed")
    moves = [(e["from_status"], e["to_status"]) for e in published if e["type"] == "transition"]
    assert moves == [("validating", "in_progress"), ("in_progress", "finalizing"),
                     ("finalizing", "completed")]
    finished = [e for e in published if e["type"] == "finished"]
    assert len(finished) == 1 and json.dumps(finished[0]["batch"]["request_counts"]) == (
        '{"total": 2, "completed": 2, "failed": 0}')
    assert (tmp_path / "run" / "aggregator.ready").exists()


async def _is(status: object, wanted: str) -> bool:
    return bool(await status() == wanted)  # type: ignore[operator]


def _published(kafka: KafkaConfig, topics: Topics) -> list[dict[str, object]]:
    """The aggregator's own events on batch-events, in order."""
    consumer = Consumer(kafka.consumer(f"read-{uuid.uuid4().hex}"))
    consumer.subscribe([topics.batch_events])
    found: list[dict[str, object]] = []
    deadline = time.monotonic() + 30
    try:
        for msg in polled(consumer, lambda: time.monotonic() > deadline or any(
                e["type"] == "finished" for e in found)):
            event = parse_event(msg.value() or b"").model_dump(mode="json")
            if event["type"] in ("transition", "finished"):
                found.append(event)
    finally:
        consumer.close()
    return found


def test_an_aggregator_that_wakes_up_stale_never_undoes_its_successor(
        deployment: Deployment, tmp_path: Path) -> None:
    """The issue-25 pause, without the race: one aggregator applies the start of a batch
    and holds later events it fetched but has not applied (frozen, its partitions gone); a
    second one takes over and completes the batch; the first wakes up and applies what it
    held. The batch stays completed with its final counts, and no transition repeats."""
    settings, topics, kafka = own_topics(deployment, tmp_path)
    doc = {**DOC, "id": "batch_y"}

    async def scenario() -> tuple[str, dict[str, int], list[dict[str, object]]]:
        store = Store.connect(str(settings.redis_url), settings.topic_prefix)
        producer = AsyncProducer(kafka.producer())
        for event in (BatchCreated(batch_id="batch_y", project="p", batch=doc, listed_at=1.0),
                      BatchValidated(batch_id="batch_y", total=3000, model="m"),
                      BatchProgress(batch_id="batch_y", completed=1500, failed=0)):
            await producer.send(topics.batch_events, "batch_y", event.dumps())
        fetched = [Fetched.of(m) for m in _messages(kafka, topics, 3)]
        frozen = Aggregator(settings)
        await frozen.handle(fetched[:2])  # in progress; the 1,500-line progress held back
        successor = Aggregator(settings)
        for event in (BatchProgress(batch_id="batch_y", completed=3000, failed=0),
                      BatchFilesReady(batch_id="batch_y", output_file_id="o",
                                      error_file_id=None, lines=3000, completed=3000,
                                      input_tokens=3, output_tokens=4)):
            await producer.send(topics.batch_events, "batch_y", event.dumps())
        # from the committed start
        await successor.handle([Fetched.of(m) for m in _messages(kafka, topics, 5)])
        await frozen.handle(fetched[2:])  # wakes up
        batch = await store.get_batch("batch_y", "p")
        assert batch is not None and batch.request_counts is not None
        counts = batch.request_counts.model_dump()
        for aggregator in (frozen, successor):
            await aggregator.close()
        producer.close()
        await store.close()
        return batch.status.value, counts, _published(kafka, topics)

    status, counts, published = asyncio.run(scenario())
    assert status == "completed"
    assert counts == {"total": 3000, "completed": 3000, "failed": 0}
    moves = [(e["from_status"], e["to_status"]) for e in published if e["type"] == "transition"]
    assert moves == [("validating", "in_progress"), ("in_progress", "finalizing"),
                     ("finalizing", "completed")]


def test_a_broker_that_lost_its_data_is_noticed_before_an_event_is_skipped(
        deployment: Deployment, tmp_path: Path) -> None:
    """Found by the chaos suite's `kill-broker`: the embedded broker restarts empty under a
    new cluster id, and its first records (offsets from 0 again) can reach the aggregator
    before the group's rebalance does. Under the epoch it still held they looked applied
    already (their offsets below the batch's stored one) and were skipped for good: the
    batch stayed `in_progress`. The cluster id is now read again before any skip."""
    settings, topics, _ = own_topics(deployment, tmp_path)
    doc = {**DOC, "id": "batch_z"}
    partition = partition_of("batch_z", settings.partitions)

    def at(offset: int, event: Record) -> Fetched:
        return Fetched(topics.batch_events, partition, offset, event.dumps())

    created = BatchCreated(batch_id="batch_z", project="p", batch=doc, listed_at=1.0)
    validated = BatchValidated(batch_id="batch_z", total=2, model="m")

    async def scenario() -> tuple[str, dict[str, int]]:
        store = Store.connect(str(settings.redis_url), settings.topic_prefix)
        aggregator = Aggregator(settings)
        aggregator._epoch = "the-broker-before"  # its cluster id, read at the assignment
        await aggregator.handle([
            at(0, created), at(1, validated),
            at(2, BatchProgress(batch_id="batch_z", completed=1, failed=0)),
            at(3, BatchProgress(batch_id="batch_z", completed=1, failed=0))])
        # the broker restarts empty; `resume` publishes the batch's events again and the
        # sink its files; the aggregator fetches them before any rebalance
        await aggregator.handle([
            at(0, created), at(1, validated),
            at(2, BatchProgress(batch_id="batch_z", completed=2, failed=0)),
            at(3, BatchFilesReady(batch_id="batch_z", output_file_id="o", error_file_id=None,
                                  lines=2, completed=2))])
        batch = await store.get_batch("batch_z", "p")
        assert batch is not None and batch.request_counts is not None
        await aggregator.close()
        await store.close()
        return batch.status.value, batch.request_counts.model_dump()

    status, counts = asyncio.run(scenario())
    assert status == "completed"
    assert counts == {"total": 2, "completed": 2, "failed": 0}


def _messages(kafka: KafkaConfig, topics: Topics, want: int) -> list[Message]:
    """The first `want` events of batch-events as an aggregator's poll returns them (the
    aggregator's own transitions among them, as a poll would have them)."""
    consumer = Consumer(kafka.consumer(f"read-{uuid.uuid4().hex}"))
    consumer.subscribe([topics.batch_events])
    found: list[Message] = []
    deadline = time.monotonic() + 30
    try:
        for msg in polled(consumer, lambda: len(found) >= want or time.monotonic() > deadline):
            if parse_event(msg.value() or b"").type not in ("transition", "finished"):
                found.append(msg)
    finally:
        consumer.close()
    assert len(found) >= want, found
    return found[:want]


def test_a_stale_or_unfinishing_state_is_not_saved(deployment: Deployment) -> None:
    """The fence itself, on the real Redis: by version on one broker, and a final status
    is never left whatever the version (a new broker starts its offsets again)."""

    async def saves() -> tuple[list[bool], str]:
        store = Store.connect(str(deployment.endpoints["redis_url"]), f"fence{uuid.uuid4().hex}")

        async def save(epoch: str, offset: int, final: bool = False) -> bool:
            return await store.save_aggregate(
                "b", f"{epoch}{offset}", {}, version=Version(epoch, offset, final),
                finished=final, deadline=None if final else 1)

        results = [await save("one", 5), await save("one", 3), await save("one", 5),
                   await save("one", 9, final=True), await save("two", 1),
                   await save("two", 2, final=True)]
        agg = str(await store.r.hget(store.keys.batch("b"), "agg"))
        await store.close()
        return results, agg

    results, agg = asyncio.run(saves())
    assert results == [True, False, True, True, False, True]
    assert agg == "two2"
