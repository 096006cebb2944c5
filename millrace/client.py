"""Helpers for producers and subscribers that talk to millrace's topics directly.

    batch = StreamBatch.open(base_url, api_key, kafka_bootstrap="127.0.0.1:9092")
    for i, text in enumerate(texts):
        batch.send({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "smollm2-135m-instruct",
                             "messages": [{"role": "user", "content": text}]}})
    batch.seal()
    for result in iter_results("127.0.0.1:9092", batch.id, expected=len(texts)):
        print(result.custom_id, result.status_code)

Any Kafka client works the same way (see examples/stream_with_confluent_kafka.py); this
module only saves the boilerplate.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import httpx
from confluent_kafka import Consumer, Producer

from millrace.errors import DeliveryError
from millrace.kafka import KafkaConfig, usable
from millrace.records import ResponseRecord
from millrace.topics import Topics


class StreamBatch:
    """An open batch fed through `<prefix>.ingest`."""

    def __init__(self, batch: dict[str, Any], http: httpx.Client, producer: Producer,
                 topics: Topics) -> None:
        self.batch = batch
        self._http = http
        self._producer = producer
        self._topics = topics
        self.sent = 0

    @classmethod
    def open(
        cls, base_url: str, api_key: str, *, kafka_bootstrap: str,
        endpoint: str = "/v1/chat/completions", completion_window: str = "24h",
        metadata: dict[str, str] | None = None, topic_prefix: str = "millrace",
    ) -> StreamBatch:
        http = httpx.Client(base_url=base_url.rstrip("/"), timeout=30,
                            headers={"Authorization": f"Bearer {api_key}"})
        response = http.post("/batches", json={
            "input": "stream", "endpoint": endpoint, "completion_window": completion_window,
            "metadata": metadata})
        response.raise_for_status()
        producer = Producer(KafkaConfig(bootstrap=kafka_bootstrap,
                                        client_id="millrace-stream").producer())
        return cls(response.json(), http, producer, Topics(topic_prefix))

    @property
    def id(self) -> str:
        return str(self.batch["id"])

    def send(self, line: dict[str, Any]) -> None:
        """Produce one OpenAI batch line (`{custom_id, method, url, body}`)."""
        self.send_raw(json.dumps(line).encode())

    def send_raw(self, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(self._topics.ingest, key=self.id, value=value)
                self.sent += 1
                break
            except BufferError:
                self._producer.poll(0.05)  # let deliveries drain: bounded memory
        self._producer.poll(0)

    def flush(self, timeout: float = 60.0) -> None:
        if self._producer.flush(timeout):
            raise DeliveryError("lines not acknowledged by the broker")

    def seal(self) -> dict[str, Any]:
        """Flush, then close the batch once millrace has processed every line sent so far."""
        self.flush()
        response = self._http.post(f"/batches/{self.id}/seal", json={"total": self.sent})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def close(self) -> None:
        self._producer.flush(10)
        self._http.close()

    def __enter__(self) -> StreamBatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def iter_results(
    kafka_bootstrap: str, batch_id: str, *, topic_prefix: str = "millrace",
    expected: int | None = None, timeout: float = 60.0,
) -> Iterator[ResponseRecord]:
    """Each result of `batch_id` from the responses topic, once per custom_id.

    Stops after `expected` results, or when nothing arrived for `timeout` seconds.
    Correlates by the `batch_id` header, without parsing other batches' values.
    """
    topics = Topics(topic_prefix)
    config = KafkaConfig(bootstrap=kafka_bootstrap, client_id="millrace-results")
    consumer = Consumer(config.consumer(f"millrace-results-{uuid.uuid4().hex}"))
    consumer.subscribe([topics.responses])
    seen: set[str] = set()
    idle_since = time.monotonic()
    try:
        while expected is None or len(seen) < expected:
            if time.monotonic() - idle_since > timeout:
                return
            for msg in consumer.consume(500, 0.2):
                if not usable(msg):
                    continue
                headers = dict(msg.headers() or [])
                if headers.get("batch_id") != batch_id.encode():
                    continue
                record = ResponseRecord.model_validate_json(msg.value() or b"")
                if record.custom_id not in seen:
                    seen.add(record.custom_id)
                    idle_since = time.monotonic()
                    yield record
    finally:
        consumer.close()
