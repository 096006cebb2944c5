"""A gateway jobs stage's world on the session's real broker and Redis: settings of a topic
prefix of its own, its topics, a local file store, and a reader of what a topic holds."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, Message, TopicPartition

from gateway.jobs.consumer import Jobs
from millrace.filestore import FileStore
from millrace.kafka import KafkaConfig
from millrace.settings import Settings
from millrace.topics import Topics


@dataclass
class JobsWorld:
    settings: Settings
    topics: Topics
    kafka: KafkaConfig
    files: FileStore

    def read(self, topic: str, partitions: int) -> list[Message]:
        """Every record of `topic`, read to the end of each partition."""
        consumer = Consumer(self.kafka.consumer(f"read-{uuid.uuid4().hex}",
                                                **{"enable.partition.eof": True}))
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        found: list[Message] = []
        ends, deadline = 0, time.monotonic() + 60
        while ends < partitions and time.monotonic() < deadline:
            msg = consumer.poll(1)
            if msg is None:
                continue
            if msg.error():
                ends += 1
            else:
                found.append(msg)
        consumer.close()
        return found


async def close(*stages: Jobs) -> None:
    """Stages that never ran: only their clients to close."""
    for jobs in stages:
        jobs.producer.close()
        jobs.bulk.close()
        jobs.consumer.close()
        jobs.owners.close()
        await jobs.fetcher.aclose()
