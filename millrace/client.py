"""Helpers for producers and subscribers that talk to millrace's topics directly.

    batch = StreamBatch.open(base_url, api_key, kafka="127.0.0.1:9092")
    for i, text in enumerate(texts):
        batch.send({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "smollm2-135m-instruct",
                             "messages": [{"role": "user", "content": text}]}})
    batch.seal()
    for result in iter_results("127.0.0.1:9092", batch.id, expected=len(texts)):
        print(result.custom_id, result.status_code)

Any Kafka client works the same way (see examples/stream_with_confluent_kafka.py); this
module only saves the boilerplate. `kafka` is a bootstrap address, or a `KafkaSettings` with
credentials for a cluster that needs them (SASL, TLS).
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
from millrace.kafka import KafkaConfig, polled, produce
from millrace.records import INGEST_TOKEN_HEADER, ResponseRecord
from millrace.settings import KafkaSettings
from millrace.topics import Topics


class StreamBatch:
    """An open batch fed through `<prefix>.ingest`."""

    def __init__(self, batch: dict[str, Any], http: httpx.Client, producer: Producer,
                 topics: Topics, ingest_token: str) -> None:
        self.batch = batch
        self.ingest_token = ingest_token
        self._http = http
        self._producer = producer
        self._topics = topics
        self.sent = 0

    @classmethod
    def open(
        cls, base_url: str, api_key: str, *, kafka: KafkaSettings | str,
        endpoint: str = "/v1/chat/completions", completion_window: str = "24h",
        metadata: dict[str, str] | None = None, topic_prefix: str = "millrace",
        webhook_url: str | None = None,
    ) -> StreamBatch:
        http = httpx.Client(base_url=base_url.rstrip("/"), timeout=30,
                            headers={"Authorization": f"Bearer {api_key}"})
        create: dict[str, Any] = {"input": "stream", "endpoint": endpoint,
                                  "completion_window": completion_window, "metadata": metadata}
        if webhook_url is not None:
            create["webhook_url"] = webhook_url
        response = http.post("/batches", json=create)
        response.raise_for_status()
        producer = Producer(_config(kafka, "stream").producer())
        batch = response.json()
        return cls(batch, http, producer, Topics(topic_prefix), batch.pop("ingest_token"))

    @classmethod
    def attach(
        cls, base_url: str, api_key: str, batch_id: str, *, ingest_token: str,
        kafka: KafkaSettings | str, topic_prefix: str = "millrace",
    ) -> StreamBatch:
        """An open batch created elsewhere (another process, before a restart), with the
        ingest token its creation gave."""
        http = httpx.Client(base_url=base_url.rstrip("/"), timeout=30,
                            headers={"Authorization": f"Bearer {api_key}"})
        response = http.get(f"/batches/{batch_id}")
        response.raise_for_status()
        producer = Producer(_config(kafka, "stream").producer())
        return cls(response.json(), http, producer, Topics(topic_prefix), ingest_token)

    @property
    def id(self) -> str:
        return str(self.batch["id"])

    def send(self, line: dict[str, Any]) -> None:
        """Produce one OpenAI batch line (`{custom_id, method, url, body}`)."""
        self.send_raw(json.dumps(line).encode())

    def send_raw(self, value: bytes) -> None:
        produce(self._producer, self._topics.ingest, value, key=self.id,
                headers={INGEST_TOKEN_HEADER: self.ingest_token})
        self.sent += 1
        self._producer.poll(0)

    def flush(self, timeout: float = 60.0) -> None:
        if self._producer.flush(timeout):
            raise DeliveryError("lines not acknowledged by the broker")

    def seal(self, total: int | None = None) -> dict[str, Any]:
        """Flush, then close the batch once millrace has processed `total` messages (default:
        the ones this object sent)."""
        self.flush()
        response = self._http.post(f"/batches/{self.id}/seal",
                                   json={"total": self.sent if total is None else total})
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
    kafka: KafkaSettings | str, batch_id: str, *, topic_prefix: str = "millrace",
    expected: int | None = None, timeout: float = 60.0,
) -> Iterator[ResponseRecord]:
    """Each result of `batch_id` from the responses topic, once per custom_id.

    Stops after `expected` results, or when nothing arrived for `timeout` seconds.
    Correlates by the `batch_id` header, without parsing other batches' values.
    """
    topics = Topics(topic_prefix)
    config = _config(kafka, "results")
    consumer = Consumer(config.consumer(f"millrace-results-{uuid.uuid4().hex}"))
    consumer.subscribe([topics.responses])
    seen: set[str] = set()
    idle_since = time.monotonic()

    def done() -> bool:
        finished = expected is not None and len(seen) >= expected
        return finished or time.monotonic() - idle_since > timeout

    try:
        for msg in polled(consumer, done):
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


def _config(kafka: KafkaSettings | str, service: str) -> KafkaConfig:
    settings = KafkaSettings(bootstrap=kafka) if isinstance(kafka, str) else kafka
    return KafkaConfig(settings, service)
