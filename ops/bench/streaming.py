"""`millrace bench`: measurements against a running deployment, printed side by side.

`--streaming`: single requests produced to an open batch on an idle system; for each, the
time from produce to its response on the responses topic, next to the engine's own time
for it (`engine_ms` of the response), so the pipeline's overhead is their difference.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from millrace.client import StreamBatch
from millrace.kafka import KafkaConfig, usable
from millrace.records import ResponseRecord
from millrace.settings import BUNDLED_CHAT_MODEL, KafkaSettings
from millrace.topics import Topics


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return cls(statistics.median(ordered), p99, statistics.fmean(ordered))


@dataclass(frozen=True)
class StreamingResult:
    requests: int
    latency_ms: Percentiles
    engine_ms: Percentiles
    overhead_ms: Percentiles
    machine: str


def streaming(data_dir: Path, api_key: str, requests: int = 30,
              model: str = BUNDLED_CHAT_MODEL) -> StreamingResult:
    endpoints: dict[str, Any] = json.loads((data_dir / "endpoints.json").read_text())
    bootstrap, prefix = endpoints["kafka_bootstrap"], endpoints["topic_prefix"]
    consumer = Consumer(KafkaConfig(KafkaSettings(bootstrap=bootstrap), "bench").consumer(
        f"millrace-bench-{uuid.uuid4().hex}", **{"auto.offset.reset": "latest"}))
    consumer.subscribe([Topics(prefix).responses])
    while not consumer.assignment():  # join the group before the clock starts
        consumer.poll(0.1)
    latencies, engines = [], []
    with StreamBatch.open(endpoints["base_url"], api_key, kafka=bootstrap,
                          topic_prefix=prefix) as batch:
        for i in range(requests + 1):  # the first request warms every hop up: not counted
            custom_id = f"bench-{i}"
            started = time.perf_counter()
            batch.send({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model, "max_tokens": 8, "temperature": 0,
                                 "messages": [{"role": "user", "content": "Say hello."}]}})
            batch.flush()
            record = _wait_for(consumer, batch.id, custom_id)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if i and record.engine_ms is not None:
                latencies.append(elapsed_ms)
                engines.append(record.engine_ms)
        batch.seal()
    consumer.close()
    overheads = [lat - eng for lat, eng in zip(latencies, engines, strict=True)]
    return StreamingResult(len(latencies), Percentiles.of(latencies), Percentiles.of(engines),
                           Percentiles.of(overheads), machine())


def _wait_for(consumer: Consumer, batch_id: str, custom_id: str,
              timeout: float = 120) -> ResponseRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or not usable(msg):
            continue
        headers = dict(msg.headers() or [])
        if headers.get("batch_id") == batch_id.encode() and (
                headers.get("custom_id") == custom_id.encode()):
            return ResponseRecord.model_validate_json(msg.value() or b"")
    raise TimeoutError(f"no response for {custom_id} in {timeout}s")


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def save(result: StreamingResult, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"streaming-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return path


def table(result: StreamingResult) -> str:
    rows = [("produce → response on topic", result.latency_ms),
            ("engine (vLLM call)", result.engine_ms),
            ("pipeline overhead", result.overhead_ms)]
    lines = [f"streaming latency, {result.requests} single requests ({result.machine})",
             f"{'':32} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}"]
    lines += [f"{name:32} {p.p50:9.1f} {p.p99:9.1f} {p.mean:9.1f}" for name, p in rows]
    return "\n".join(lines)
