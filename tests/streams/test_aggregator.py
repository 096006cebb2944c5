"""An aggregator built in-process from its own settings (its own topic prefix) against the
real broker and Redis: it applies a batch's events, publishes transitions and one
`finished`, keeps its state in Redis, and a second aggregator picks the batch up from there."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer

from millrace.kafka import AsyncProducer, KafkaConfig, ensure_topics, polled
from millrace.records import (
    BatchCreated,
    BatchFilesReady,
    BatchProgress,
    BatchValidated,
    Record,
    parse_event,
)
from millrace.settings import KafkaSettings, Settings
from millrace.store import Store
from millrace.topics import Topics
from streams.aggregator import Aggregator
from tests.deployment import Deployment

DOC = {"id": "batch_x", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
       "completion_window": "24h", "status": "validating", "created_at": int(time.time()),
       "expires_at": int(time.time()) + 3600}


async def until(check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_an_aggregator_built_from_settings_in_process(deployment: Deployment,
                                                       tmp_path: Path) -> None:
    settings = Settings(
        topic_prefix=f"agg{uuid.uuid4().hex[:8]}", data_dir=tmp_path,
        redis_url=str(deployment.endpoints["redis_url"]),
        kafka=KafkaSettings(bootstrap=str(deployment.endpoints["kafka_bootstrap"])))
    topics = Topics.from_settings(settings)
    kafka = KafkaConfig.of(settings, "test")
    ensure_topics(kafka, topics.layout(settings), configs=topics.configs())

    async def scenario() -> tuple[str, str, list[dict[str, object]]]:
        store = Store.connect(str(settings.redis_url), settings.topic_prefix)
        producer = AsyncProducer(kafka.producer())

        async def send(*events: Record) -> None:
            for event in events:
                await producer.send(topics.batch_events, "batch_x", event.dumps())

        async def status() -> str:
            batch = await store.get_batch("batch_x", "p")
            return batch.status.value if batch else ""

        first = Aggregator(settings)
        running = asyncio.create_task(first.run())
        await send(BatchCreated(batch_id="batch_x", project="p", batch=DOC, listed_at=1.0),
                   BatchValidated(batch_id="batch_x", total=2, model="m"),
                   BatchProgress(batch_id="batch_x", completed=1, failed=0))
        await until(lambda: _is(status, "in_progress"))
        first.stop()
        await running
        middle = await status()
        # a second aggregator (a restart) goes on from the state in Redis
        second = Aggregator(settings)
        running = asyncio.create_task(second.run())
        await send(BatchProgress(batch_id="batch_x", completed=2, failed=0),
                   BatchFilesReady(batch_id="batch_x", output_file_id="o", error_file_id=None,
                                   lines=2, completed=2, input_tokens=3, output_tokens=4))
        await until(lambda: _is(status, "completed"))
        second.stop()
        await running
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
