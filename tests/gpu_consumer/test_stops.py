"""A worker's view of stopped batches, from a real broker: it reads every partition of
batch-events from the beginning (no group, so every worker sees every stop), learns which
batches were cancelled or expired, and skips what it cannot parse."""

from __future__ import annotations

import uuid
from pathlib import Path

from confluent_kafka import Producer

from gpu_consumer.stops import StoppedBatches
from millrace.kafka import KafkaConfig, ensure_topics, produce
from millrace.lifecycle.status import BatchStatus
from millrace.records import BatchTransition
from millrace.settings import KafkaSettings, Settings
from tests.deployment import Deployment, wait_until


def transition(batch_id: str, to: BatchStatus) -> bytes:
    return BatchTransition(batch_id=batch_id, project="p", from_status=BatchStatus.IN_PROGRESS,
                           to_status=to, total=1, completed=0, failed=0).dumps()


def test_every_worker_learns_every_stop(deployment: Deployment, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, kafka=KafkaSettings(
        bootstrap=str(deployment.endpoints["kafka_bootstrap"])))
    kafka = KafkaConfig.of(settings, "test")
    topic = f"stops{uuid.uuid4().hex[:8]}.batch-events"
    ensure_topics(kafka, {topic: 2})
    producer = Producer(kafka.producer())

    def publish(partition: int, *values: bytes) -> None:
        for value in values:
            produce(producer, topic, value, key="k", partition=partition)
        assert producer.flush(30) == 0

    # before the worker starts: a cancel on each partition, a batch that only ran, and a
    # record that is no event
    publish(0, transition("a", BatchStatus.CANCELLING), b"{not an event",
            transition("c", BatchStatus.FINALIZING))
    publish(1, transition("d", BatchStatus.CANCELLING))
    first = StoppedBatches(kafka, topic)
    try:
        wait_until(lambda: first.code("a") and first.code("d"), 60, "the earlier cancels")
        publish(0, transition("b", BatchStatus.EXPIRED))  # while it runs
        wait_until(lambda: first.code("b"), 60, "the expiry")
        assert [first.code(b) for b in "abcd"] == [
            "batch_cancelled", "batch_expired", None, "batch_cancelled"]
        assert first.version == 3  # one bump per stopped batch: the worker looks again
        later = StoppedBatches(kafka, topic)  # a worker that starts after all of it
        try:
            wait_until(lambda: later.version == 3, 60, "every stop, read again")
            assert [later.code(b) for b in "abcd"] == [first.code(b) for b in "abcd"]
        finally:
            later.close()
    finally:
        first.close()
