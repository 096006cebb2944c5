"""Prometheus metrics of every service, defined once (prometheus-client).

Each service records into the process's default registry; the gateway answers `/metrics`
on its own port, the other services serve it on `MILLRACE_METRICS_PORT` (`up` gives each
its own port and lists them in `endpoints.json`). Gateway processes that share one port
also share one view: with `MILLRACE_GATEWAY_METRICS_DIR` set they write their samples
there (prometheus-client's multiprocess mode) and any of them answers with the sum.

Names follow Prometheus' conventions: `_total` counters, `_seconds` histograms, base units.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector

from millrace.settings import Settings

log = logging.getLogger(__name__)

@functools.cache
def child(metric: Counter | Gauge | Histogram, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: per-line paths (a worker counts every
    response) would otherwise pay prometheus-client's label lookup and lock every time."""
    return metric.labels(*labels)


# --- gateway ------------------------------------------------------------------------------
HTTP_REQUESTS = Counter("millrace_http_requests", "HTTP requests answered by the gateway",
                        ["method", "route", "status"])
HTTP_SECONDS = Histogram("millrace_http_request_duration_seconds",
                         "Time from request to the end of the response", ["method", "route"],
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
LINES_INGESTED = Counter("millrace_lines_ingested", "Request lines the gateway enqueued",
                         ["source"])  # file (explode, re-drive) or stream (ingest topic)

# --- worker -------------------------------------------------------------------------------
ADMITTED = Counter("millrace_requests_admitted", "Requests given to the engine", ["model"])
FINISHED = Counter("millrace_requests_finished", "Requests the engine answered with 200",
                   ["model"])
FAILED = Counter("millrace_requests_failed",
                 "Requests that ended in an error line (engine refusals, cancels, expiry)",
                 ["model", "code"])
PROMPT_TOKENS = Counter("millrace_prompt_tokens", "Prompt tokens of answered requests",
                        ["model"])
GENERATION_TOKENS = Counter("millrace_generation_tokens",
                            "Tokens generated for answered requests", ["model"])
IN_FLIGHT = Gauge("millrace_engine_requests_running", "Requests in the engine now", ["model"])
WAITING = Gauge("millrace_worker_requests_waiting",
                "Lines read from Kafka waiting for room in the engine", ["model"])
STEP_SECONDS = Histogram("millrace_engine_step_seconds", "Time of one engine step",
                         buckets=(.0005, .001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
# what the worker's loop spends outside the pipeline: `millrace bench` takes it from the
# worker's CPU time to report the pipeline's own cost per request
ENGINE_SECONDS = Counter("millrace_engine_call_seconds",
                         "Time the worker's loop spent in engine calls (submit, step)")

# --- every consumer -----------------------------------------------------------------------
LAG = Gauge("millrace_consumer_lag_messages",
            "Messages of a partition not yet consumed (end offset from fetch responses)",
            ["group", "topic", "partition"])

# --- sink ---------------------------------------------------------------------------------
LINES_WRITTEN = Counter("millrace_lines_written", "Result lines the sink wrote", ["file"])
MALFORMED = Counter(
    "millrace_records_malformed",
    "Records that are not what their topic carries (random bytes, truncated JSON, wrong "
    "types): logged and skipped, the partition moves on", ["topic"])
FENCED = Counter(
    "millrace_fenced_writes",
    "Writes refused or records dropped because a newer state was stored or another instance "
    "took the partition over (a frozen or cut-off instance's view)",
    ["service"])
RECORDS_REFUSED = Counter(
    "millrace_records_refused",
    "Records refused: ingest messages by reject code (no token, key and batch_id header "
    "disagreeing, unknown or sealed batch, duplicate; an invalid line, which is also its "
    "batch's error line), responses for a line the batch was not issued, events of a batch "
    "that does not exist, events for a final batch or on a partition not their batch's",
    ["topic", "reason"])
BATCHES_FINISHED = Counter("millrace_batches_finished", "Batches that reached a final status",
                           ["status"])
BATCH_SECONDS = Histogram("millrace_batch_duration_seconds",
                          "Time from a batch's creation to its final status",
                          buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))
WEBHOOK_ATTEMPTS = Counter("millrace_webhook_attempts", "Webhook deliveries tried",
                           ["outcome"])  # delivered, failed (retried later), given_up

# --- aggregator ---------------------------------------------------------------------------
BATCHES = Gauge("millrace_batches", "Unfinished batches the aggregator follows, by status",
                ["status"])
QUEUED_BATCHES = Gauge("millrace_queued_batches",
                       "Unfinished batches admitted with an estimate, by model and priority",
                       ["model", "priority"])
QUEUED_TOKENS = Gauge("millrace_queued_tokens",
                      "Estimated prompt and output tokens left in unfinished batches, by model "
                      "and priority", ["model", "priority"])


def serve(settings: Settings) -> None:
    """`/metrics` on `MILLRACE_METRICS_PORT` in a thread of its own, if the port is set."""
    if settings.metrics_port is None:
        return
    start_http_server(settings.metrics_port, addr=settings.host)
    log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)


def gateway_registry(settings: Settings) -> CollectorRegistry | None:
    """The registry the gateway's `/metrics` answers from: every gateway process's samples
    when they share a metrics dir, else None (this process's own default registry)."""
    if settings.gateway_metrics_dir is None:
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(settings.gateway_metrics_dir))  # type: ignore[no-untyped-call]
    return registry


def prepare_gateway_dir(path: Path) -> None:
    """An empty dir for the gateways' samples (old processes' files would add up)."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()


class LagProbe:
    """A consumer's lag per assigned partition, measured every `every_s` from what it
    already knows: its position and the end offset carried in fetch responses (tansu's
    ListOffsets answer is wrong, the one in Fetch is right)."""

    def __init__(self, consumer: Consumer, group: str, every_s: float = 1.0) -> None:
        self.consumer = consumer
        self.group = group
        self.every_s = every_s
        self._next = 0.0
        self.last: dict[tuple[str, int], int] = {}  # (topic, partition) → lag

    def maybe(self, now: float) -> None:
        if now < self._next:
            return
        self._next = now + self.every_s
        try:
            assigned = self.consumer.assignment()
            positions = self.consumer.position(assigned) if assigned else []
        except KafkaException:
            return
        self._record(positions)

    def _record(self, positions: Iterable[TopicPartition]) -> None:
        for tp in positions:
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high < 0 or tp.offset < 0:
                continue  # nothing fetched yet
            lag = max(high - tp.offset, 0)
            self.last[(tp.topic, tp.partition)] = lag
            LAG.labels(self.group, tp.topic, str(tp.partition)).set(lag)

    def by_topic(self) -> dict[str, int]:
        """The lag last measured, summed per topic."""
        summed: dict[str, int] = {}
        for (topic, _), lag in self.last.items():
            summed[topic] = summed.get(topic, 0) + lag
        return summed
