"""`millrace.kafka.partition_of` names the partition the producers' partitioner picks: the
chaos tools find a batch's owners by it before any record of the batch is read."""

from __future__ import annotations

import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from millrace.kafka import partition_of
from tests.deployment import Deployment


def test_partition_of_is_where_the_broker_put_each_key(deployment: Deployment) -> None:
    bootstrap = str(deployment.endpoints["kafka_bootstrap"])
    topic = f"test.partition-of.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=7)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    delivered: dict[str, int] = {}
    # keys of every length mod 4 (the hash's tail), batch ids and request shard keys
    keys = [f"batch_{uuid.uuid4().hex[:24]}" for _ in range(40)]
    keys += [f"{k}:{i}" for i, k in enumerate(keys[:20])] + ["a", "ab", "abc", "é"]
    for key in keys:
        producer.produce(topic, b"x", key=key, on_delivery=lambda err, msg, key=key:
                         delivered.__setitem__(key, msg.partition()))
    assert producer.flush(30) == 0
    assert len(set(delivered.values())) > 1
    assert {key: partition_of(key, 7) for key in keys} == delivered
