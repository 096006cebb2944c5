"""Aggregators of a test's own (settings from `tests.deployment.own_topics`), the Faust
worker run in the test's loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from millrace.kafka import AsyncProducer, KafkaConfig
from millrace.records import BatchCreated, BatchValidated
from millrace.settings import Settings
from millrace.storage.store import Store
from millrace.topics import Topics
from streams.app import AggregatorApp, AggregatorWorker, create_app
from tests.deployment import own_topics

__all__ = ["own_topics", "running", "starts", "until"]


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[AggregatorApp]:
    """The aggregator's Faust worker in this event loop, as `millrace aggregator` runs it."""
    app = create_app(settings)
    worker = AggregatorWorker(app, loop=asyncio.get_running_loop(), daemon=False,
                              override_logging=False, redirect_stdouts=False, quiet=True)
    await worker.start()
    try:
        yield app
    finally:
        await worker.stop()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def starts(settings: Settings, config: KafkaConfig, batch_id: str,
                 timeout: float = 120) -> None:
    """Publish a one-line batch's `created` and `validated` on batch-events, then wait
    until an aggregator (in this loop or in another process) shows it `in_progress`."""
    producer = AsyncProducer(config.producer())
    store = Store.connect(str(settings.redis_url), settings.topic_prefix)
    doc = {"id": batch_id, "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
           "completion_window": "24h", "status": "validating", "created_at": 1,
           "expires_at": int(time.time()) + 3600}
    topic = Topics.from_settings(settings).batch_events
    try:
        for event in (BatchCreated(batch_id=batch_id, project="p", batch=doc, listed_at=1.0),
                      BatchValidated(batch_id=batch_id, total=1, model="m")):
            await producer.send(topic, batch_id, event.dumps())

        async def in_progress() -> bool:
            batch = await store.get_batch(batch_id, "p")
            return batch is not None and batch.status.value == "in_progress"

        await until(in_progress, timeout)
    finally:
        producer.close()
        await store.close()
