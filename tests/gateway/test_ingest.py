"""Direct Kafka producers feed an open batch; plain consumers read the responses."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
from confluent_kafka import Consumer, Producer
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from millrace.client import StreamBatch, iter_results
from millrace.records import IngestReject, ResponseRecord
from tests.batch_flow import read_lines
from tests.deployment import Deployment, wait_until


def line(custom_id: str, model: str, content: str) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "max_tokens": 4,
                                "messages": [{"role": "user", "content": content}]}}).encode()


def plain_consumer(deployment: Deployment, topic: str) -> Consumer:
    consumer = Consumer({"bootstrap.servers": deployment.endpoints["kafka_bootstrap"],
                         "group.id": f"test-{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
                         "session.timeout.ms": 6000})
    consumer.subscribe([topic])
    return consumer


def read_topic(consumer: Consumer, batch_id: str, want: int, timeout: float) -> list[bytes]:
    """Values of messages keyed by `batch_id` until `want` arrived."""
    values: list[bytes] = []

    def enough() -> bool:
        for msg in consumer.consume(500, 0.2):
            if msg.error() is None and msg.key() == batch_id.encode():
                values.append(msg.value() or b"")
        return len(values) >= want

    wait_until(enough, timeout, f"{want} messages of {batch_id}", every=0)
    return values


def test_plain_kafka_producer_streams_into_an_open_batch(
    deployment: Deployment, client: OpenAI, http: httpx.Client, model: str
) -> None:
    prefix = deployment.endpoints["topic_prefix"]
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    opened = http.post("/v1/batches", headers=headers, json={
        "input": "stream", "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert opened.status_code == 200, opened.text
    batch_id = opened.json()["id"]
    assert opened.json()["status"] == "in_progress"
    token = opened.json()["ingest_token"]  # given once, to the creator
    assert "ingest_token" not in http.get(f"/v1/batches/{batch_id}", headers=headers).json()
    refused_before = refused(deployment)

    producer = Producer({"bootstrap.servers": deployment.endpoints["kafka_bootstrap"],
                         "acks": "all", "enable.idempotence": True})
    ids = [f"s{i}" for i in range(199)]
    own = {"millrace-ingest-token": token}
    for number, burst in enumerate((ids[:70], ids[70:140], ids[140:])):  # three bursts
        for custom_id in burst:
            producer.produce(f"{prefix}.ingest", key=batch_id, headers=own,
                             value=line(custom_id, model, "Say ok."))
        if number == 1:  # one bad message among them
            producer.produce(f"{prefix}.ingest", key=batch_id, value=b"{not json", headers=own)
            # someone who knows only the batch id: lines and a seal, without the token or
            # with a wrong one, and a line whose key and header name different batches
            for forged in ({}, {"millrace-ingest-token": "mrit_guess"}):
                producer.produce(f"{prefix}.ingest", key=batch_id, headers=forged,
                                 value=line("forged", model, "Say forged."))
            producer.produce(f"{prefix}.ingest", key=batch_id, value=b"",
                             headers={"millrace-control": "seal"})
            producer.produce(f"{prefix}.ingest", key="batch_elsewhere", value=line(
                "misrouted", model, "Say x."), headers={**own, "batch_id": batch_id})
        producer.flush(30)
    # a plain librdkafka producer partitions by CRC32, not murmur2: lines are spread over
    # partitions, so the seal names how many messages were produced
    sealed = http.post(f"/v1/batches/{batch_id}/seal", headers=headers, json={"total": 200})
    assert sealed.status_code == 200

    responses = plain_consumer(deployment, f"{prefix}.responses")
    try:
        records = [ResponseRecord.model_validate_json(v)
                   for v in read_topic(responses, batch_id, 200, 300)]
    finally:
        responses.close()
    ok = [r for r in records if r.status_code == 200]
    assert sorted(r.custom_id for r in ok) == sorted(ids)
    done = wait_until(lambda: (b := client.batches.retrieve(batch_id)).status == "completed"
                      and b, 120, "the stream batch to complete")
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (200, 199, 1)
    assert sorted(x.custom_id for x in read_lines(client, done.output_file_id)) == sorted(ids)
    [bad] = read_lines(client, done.error_file_id)
    assert bad.response is not None and bad.response.body["error"]["code"] == (
        "invalid_json_line")

    rejects = plain_consumer(deployment, f"{prefix}.ingest-rejects")
    try:
        found = [IngestReject.model_validate_json(v)
                 for v in read_topic(rejects, batch_id, 5, 60)]
    finally:
        rejects.close()
    assert sorted((r.code, r.value) for r in found) == sorted([
        ("invalid_json_line", "{not json"),
        ("invalid_ingest_token", line("forged", model, "Say forged.").decode()),
        ("invalid_ingest_token", line("forged", model, "Say forged.").decode()),
        ("invalid_ingest_token", ""),
        ("batch_id_mismatch", line("misrouted", model, "Say x.").decode())])
    counted = refused(deployment)
    assert counted["invalid_ingest_token"] - refused_before.get("invalid_ingest_token", 0) == 3
    assert counted["batch_id_mismatch"] - refused_before.get("batch_id_mismatch", 0) == 1


def refused(deployment: Deployment) -> dict[str, float]:
    """The gateway's count of refused ingest records, per reason."""
    text = httpx.get(str(deployment.base_url).removesuffix("/v1") + "/metrics").text
    return {sample.labels["reason"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "millrace_records_refused_total"
            and sample.labels.get("topic") == "ingest"}


def test_helper_and_rejections(deployment: Deployment, client: OpenAI, model: str) -> None:
    bootstrap = str(deployment.endpoints["kafka_bootstrap"])
    prefix = str(deployment.endpoints["topic_prefix"])
    with StreamBatch.open(deployment.base_url, deployment.api_key, kafka=bootstrap,
                          topic_prefix=prefix) as batch:
        batch.send_raw(line("a", model, "Say a."))
        batch.send_raw(line("a", model, "Say a again."))  # duplicate custom_id: rejected
        batch.send_raw(line("b", model, "Say b."))
        batch.seal()
        batch.send_raw(line("late", model, "too late"))  # after the seal: rejected
        batch.flush()
        results = list(iter_results(bootstrap, batch.id, topic_prefix=prefix, expected=2,
                                    timeout=120))
    assert sorted(r.custom_id for r in results) == ["a", "b"]
    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status == "completed"
                      and b, 120, "the stream batch to complete")
    assert done.request_counts is not None and done.request_counts.total == 2
    rejects = plain_consumer(deployment, f"{prefix}.ingest-rejects")
    try:
        codes = sorted(IngestReject.model_validate_json(v).code
                       for v in read_topic(rejects, batch.id, 2, 60))
    finally:
        rejects.close()
    assert codes == ["batch_sealed", "duplicate_custom_id"]


def test_sealing_a_file_batch_is_a_conflict(client: OpenAI, model: str, http: httpx.Client,
                                            deployment: Deployment) -> None:
    uploaded = client.files.create(file=("x.jsonl", b"\n"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    response = http.post(f"/v1/batches/{batch.id}/seal",
                         headers={"Authorization": f"Bearer {deployment.api_key}"})
    assert response.status_code == 409
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    neither = http.post("/v1/batches", headers=headers, json={
        "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert neither.status_code == 400 and neither.json()["error"]["param"] == "input_file_id"
    both = http.post("/v1/batches", headers=headers, json={
        "input": "stream", "input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "input_file_id"


def test_the_plain_confluent_example_runs(deployment: Deployment) -> None:
    example = Path(__file__).parents[2] / "examples" / "stream_with_confluent_kafka.py"
    out = subprocess.run(
        [sys.executable, str(example), str(deployment.data_dir / "endpoints.json"),
         deployment.api_key], capture_output=True, text=True, timeout=300, check=True).stdout
    assert sorted(x.split(" → ")[0] for x in out.splitlines()) == ["q0", "q1", "q2"]
    assert "Paris" in out


def test_streaming_bench_runs_and_records_its_numbers(deployment: Deployment,
                                                      tmp_path: Path) -> None:
    """Not a timing assertion: the bench must keep working and write what it measured."""
    out = subprocess.run(
        [sys.executable, "-m", "ops", "bench", "--streaming", "--requests", "3",
         "--data-dir", str(deployment.data_dir), "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True).stdout
    assert "produce → response on topic" in out and "pipeline overhead" in out
    [saved] = tmp_path.glob("streaming-*.json")
    result = json.loads(saved.read_text())
    assert result["requests"] == 3
    assert result["latency_ms"]["p50"] >= result["engine_ms"]["p50"] > 0


def test_cancelling_an_open_stream_batch_seals_it(deployment: Deployment, client: OpenAI,
                                                  model: str) -> None:
    bootstrap = str(deployment.endpoints["kafka_bootstrap"])
    prefix = str(deployment.endpoints["topic_prefix"])
    with StreamBatch.open(deployment.base_url, deployment.api_key, kafka=bootstrap,
                          topic_prefix=prefix) as batch:
        batch.send_raw(line("only", model, "Say ok."))
        batch.flush()
        assert list(iter_results(bootstrap, batch.id, topic_prefix=prefix, expected=1,
                                 timeout=120))
        client.batches.cancel(batch.id)  # never sealed by its producer
    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status == "cancelled"
                      and b, 120, "the open batch to be cancelled")
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (1, 1)
