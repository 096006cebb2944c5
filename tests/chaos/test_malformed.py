"""Records a direct producer or a broken client could write, on every topic a service reads:
each is logged and counted, every partition moves on, no service stops, and batches —
a finished one and one created afterwards — are what they would have been."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
from confluent_kafka import Producer
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from millrace.kafka import partition_of
from millrace.records import (
    BatchCancelRequested,
    BatchExpireDue,
    BatchProgress,
    ResponseRecord,
)
from millrace.settings import Settings
from millrace.topics import Topics
from tests.batch_flow import create_batch, wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until

GARBAGE = [b"\x00\xff\xfe random bytes \x80", b'{"batch_id": "batch_x", "type": "progr',
           b'{"batch_id": 5, "type": "progress", "completed": "many"}', b"[]", b"null", b"",
           os.urandom(2 << 20)]  # 2 MiB


def counted(deployment: Deployment, service: str, name: str, **labels: str) -> float:
    urls = deployment.endpoints["metrics"]
    assert isinstance(urls, dict)
    text = httpx.get(str(urls[service]), timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def pids(deployment: Deployment) -> dict[str, object]:
    return {name: (deployment.ready_info(name) or {}).get("pid")
            for name in ("gateway", "worker", "aggregator", "sink")}


def test_malformed_records_on_every_topic_are_skipped_and_counted(
        deployment: Deployment, client: OpenAI, model: str, tmp_path: Path) -> None:
    topics = Topics(str(deployment.endpoints["topic_prefix"]))
    first = write_jsonl(tmp_path / "a.jsonl", [chat_line("a", model, "Say a.", max_tokens=2)])
    finished = wait_done(client, create_batch(client, first).id, 300)
    before_pids = pids(deployment)
    malformed = "millrace_records_malformed_total"
    refused = "millrace_records_refused_total"
    before = {service: counted(deployment, service, malformed)
              for service in ("gateway", "worker", "aggregator", "sink")}
    refused_before = (counted(deployment, "aggregator", refused, reason="unknown_batch"),
                      counted(deployment, "sink", refused, reason="unknown_batch"),
                      counted(deployment, "aggregator", refused, reason="final_batch"),
                      counted(deployment, "sink", refused, reason="not_issued"),
                      counted(deployment, "aggregator", refused, reason="wrong_partition"))

    # the topic contract's partitioner: a batch id's records on the batch's partition
    producer = Producer({"bootstrap.servers": deployment.endpoints["kafka_bootstrap"],
                         "message.max.bytes": 4 << 20, "partitioner": "murmur2_random"})
    read = [topics.requests_for(model), topics.responses, topics.batch_events, topics.workers]
    for topic in read:
        for value in GARBAGE:
            producer.produce(topic, value, key=f"batch_{uuid.uuid4().hex[:24]}")
    # well formed, for a batch that does not exist, and for one that is finished
    ghost = f"batch_{uuid.uuid4().hex[:24]}"
    producer.produce(topics.batch_events, BatchProgress(batch_id=ghost, completed=7,
                                                        failed=0).dumps(), key=ghost)
    # and one on a partition not the batch's (a producer with another partitioner)
    partitions = Settings.model_fields["partitions"].default  # the session deployment's
    elsewhere = (partition_of(finished.id, partitions) + 1) % partitions
    producer.produce(topics.batch_events, BatchCancelRequested(batch_id=finished.id).dumps(),
                     key=finished.id, partition=elsewhere)
    producer.produce(topics.responses, ResponseRecord(
        batch_id=ghost, project="p", custom_id="x", line=1, id="batch_req_x", request_id="r",
        status_code=200, body={}).dumps(), key=ghost)
    # for the finished batch: progress, a cancel, an expiry, a late second result for its line
    for event in (BatchProgress(batch_id=finished.id, completed=1000, failed=0),
                  BatchCancelRequested(batch_id=finished.id),
                  BatchExpireDue(batch_id=finished.id)):
        producer.produce(topics.batch_events, event.dumps(), key=finished.id)
    producer.produce(topics.responses, ResponseRecord(
        batch_id=finished.id, project="default", custom_id="a", line=1, id="batch_req_late",
        request_id="late", status_code=500, body={"late": True}).dumps(), key=finished.id)
    assert producer.flush(30) == 0

    # every reader counted what it read of it: the gateway (batch-events: its jobs;
    # workers: its board), a worker (its requests topic; batch-events: cancels), the
    # aggregator (batch-events) and the sink (responses, batch-events)
    def all_counted() -> bool:
        grown = {s: counted(deployment, s, malformed) - n for s, n in before.items()}
        return all(n >= len(GARBAGE) for n in grown.values())

    wait_until(all_counted, 60, "every service to count the malformed records", every=0.5)
    wait_until(lambda: counted(deployment, "aggregator", refused, reason="unknown_batch")
               > refused_before[0] and counted(deployment, "sink", refused,
                                                reason="unknown_batch") > refused_before[1],
               60, "the records of a batch that does not exist to be refused", every=0.5)
    # the finished batch's three events and its forged late result (no ticket of its line)
    wait_until(lambda: counted(deployment, "aggregator", refused, reason="final_batch")
               >= refused_before[2] + 3 and counted(deployment, "sink", refused,
                                                    reason="not_issued") > refused_before[3]
               and counted(deployment, "aggregator", refused, reason="wrong_partition")
               > refused_before[4],
               60, "the records for the finished batch to be refused", every=0.5)
    assert pids(deployment) == before_pids  # nobody crashed and was restarted

    # the finished batch is as it was; the ghost batch exists nowhere; a new batch runs
    again = client.batches.retrieve(finished.id)
    assert again.status == "completed" and again.request_counts == finished.request_counts
    assert again.output_file_id == finished.output_file_id and not again.error_file_id
    assert "late" not in client.files.content(str(finished.output_file_id)).text
    assert httpx.get(f"{deployment.base_url}/batches/{ghost}", headers={
        "Authorization": f"Bearer {deployment.api_key}"}).status_code == 404
    second = write_jsonl(tmp_path / "b.jsonl", [chat_line("b", model, "Say b.", max_tokens=2)])
    after = wait_done(client, create_batch(client, second).id, 300)
    assert after.status == "completed" and after.request_counts is not None
    assert after.request_counts.completed == 1
    output = client.files.content(str(after.output_file_id)).text
    assert [json.loads(x)["custom_id"] for x in output.splitlines()] == ["b"]
