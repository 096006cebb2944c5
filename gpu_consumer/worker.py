"""The worker loop: requests topics → backlog → engine (continuous batching) → responses.

One thread runs a loop of: fetch what Kafka has (never blocking while the engine has
work), admit lines by priority and deadline (batches that tie take turns) while the engine
has room, step the engine once, produce the finished results, commit. Nothing waits for
the slowest line of a group.

Offsets: a line's offset counts as finished when the broker acknowledged its response;
each partition commits up to its first unfinished line. A crash redelivers unfinished
lines only (plus finished ones behind an unfinished one); the sink and the aggregator
drop duplicates by (batch_id, custom_id).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import FrameType

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from gpu_consumer.admission import (
    Backlog,
    Budget,
    PartitionOffsets,
    Pending,
    prefix_key,
    token_cost,
)
from gpu_consumer.engine import Engine, EngineRequest, EngineResult
from gpu_consumer.load import Load
from gpu_consumer.stops import StoppedBatches
from millrace import ids, metrics, readiness
from millrace.errors import DeliveryError
from millrace.kafka import (
    KafkaConfig,
    ensure_topics,
    partition_names,
    produce,
    skip_malformed,
    take,
    usable,
)
from millrace.protocol import BATCH_LINE_ERRORS, LineError
from millrace.records import Tokens, read_request, response_value
from millrace.settings import Settings
from millrace.topics import Topics

log = logging.getLogger(__name__)

FETCH_CHUNK = 500
COMMIT_EVERY_S = 0.2
IDLE_WAIT_S = 0.2


@dataclass(frozen=True)
class Running:
    item: Pending
    model: str
    admitted_at: float


class Worker:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.topics = Topics.from_settings(settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        kafka = KafkaConfig.of(settings, "worker")
        self.consumer = Consumer(kafka.consumer(self.topics.worker_group()))
        self.producer = Producer(kafka.producer())
        self.stops = StoppedBatches(kafka, self.topics.batch_events)
        # one requests topic per name a line may give (served models and their LoRA
        # adapters): a worker reads those it serves; an adapter's lines share its base
        # model's in-flight budget (they run on the same engine)
        names = engine.catalog
        self.model_of_topic = {self.topics.requests_for(m): m for m in names}
        adapters = {self.topics.requests_for(m): settings.request_partitions
                    for m, served in names.items() if served.base != m}
        if adapters:
            ensure_topics(kafka, adapters)
        self.backlogs = {m: self._backlog() for m in names}
        engines = {
            m: Budget(settings.worker_max_in_flight or engine.capacity(m),
                      settings.worker_token_budget)
            for m in engine.models
        }
        self.budgets = {m: engines[served.base] for m, served in names.items()}
        self.offsets: dict[tuple[str, int], PartitionOffsets] = {}
        self.running: dict[int, Running] = {}
        self.lag = metrics.LagProbe(self.consumer, self.topics.worker_group())
        self.load = Load(f"{settings.worker_name}@{self.name}", list(engine.models),
                         engine.catalog)
        self._tickets = itertools.count()
        self._paused = False
        self._alive = True
        self._failed_deliveries = 0
        self._stops_seen = 0
        self._last_commit = 0.0
        self._submitting = 0.0  # seconds in engine.submit since the last step
        self._on_ready: Callable[[], None] | None = None

    def stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self._alive = False

    # --- the loop ----------------------------------------------------------------------
    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.consumer.subscribe(list(self.model_of_topic), on_assign=self._assigned,
                                on_revoke=self._revoked, on_lost=self._lost)
        log.info("serving %s; in flight per model %s", ", ".join(self.model_of_topic),
                 {m: b.max_requests for m, b in self.budgets.items()})
        self._on_ready = on_ready  # called once the group has given us our partitions
        try:
            while self._alive and not self._failed_deliveries:
                self._cycle()
            self._drain()
        finally:
            self._publish_load(stopped=True)
            self.producer.flush(30)
            self._commit(sync=True)
            self.consumer.close()  # leaves the group: partitions move on at once
            self.stops.close()
        if self._failed_deliveries:
            # What was acknowledged is committed; the rest is redone after the restart.
            raise DeliveryError(f"{self._failed_deliveries} responses failed to deliver")

    def _cycle(self) -> None:
        self._fetch()
        self._admit()
        started = time.perf_counter()
        finished = self.engine.step()
        spent = time.perf_counter() - started
        if self.engine.busy or finished:
            metrics.STEP_SECONDS.observe(spent)
        metrics.ENGINE_SECONDS.inc(spent + self._submitting)
        self._submitting = 0.0
        self._finish(finished)
        self.producer.poll(0)
        now = time.monotonic()
        if now - self._last_commit >= COMMIT_EVERY_S:
            self._commit(sync=False)
            self._gauges()
        self.lag.maybe(now)
        if self.load.due(now):
            self._publish_load()

    def _running(self) -> dict[str, int]:
        running = dict.fromkeys(self.backlogs, 0)
        for run in self.running.values():
            running[run.model] += 1
        return running

    def _gauges(self) -> None:
        running = self._running()
        for model, backlog in self.backlogs.items():
            metrics.IN_FLIGHT.labels(model).set(running[model])
            metrics.WAITING.labels(model).set(len(backlog))

    def _publish_load(self, stopped: bool = False) -> None:
        lag = {self.model_of_topic[t]: n for t, n in self.lag.by_topic().items()
               if t in self.model_of_topic}
        status = self.load.status(self._running(), {m: len(b) for m, b in self.backlogs.items()},
                                  lag, stopped=stopped)
        produce(self.producer, self.topics.workers, status.dumps(), key=self.load.worker)

    def _backlog(self) -> Backlog:
        return Backlog(self.settings.worker_min_share, self.settings.worker_deadline_step_s,
                       self.settings.worker_prefix_order)

    def _waiting(self) -> int:
        return sum(len(b) for b in self.backlogs.values())

    def _fetch(self) -> None:
        waiting = self._waiting()
        read_ahead = self.settings.worker_read_ahead
        if not self._paused and waiting >= read_ahead:
            self.consumer.pause(self.consumer.assignment())
            self._paused = True
        elif self._paused and waiting <= read_ahead // 2:
            self.consumer.resume(self.consumer.assignment())
            self._paused = False
        if waiting or self.engine.busy:
            messages = self.consumer.consume(FETCH_CHUNK, 0)
        else:
            # idle: block for the first line, then let the first micro-batch fill briefly
            messages = take(self.consumer, FETCH_CHUNK, IDLE_WAIT_S,
                            self.settings.worker_max_wait_ms / 1000)
        for msg in messages:
            if usable(msg):
                self._receive(msg)

    def _receive(self, msg: Message) -> None:
        topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        offsets = self.offsets.setdefault((topic, partition), PartitionOffsets())
        offsets.received(offset)
        try:
            record = read_request(msg.value() or b"")
        except msgspec.DecodeError:
            # Not a millrace request record: nothing to answer, log and move on.
            skip_malformed(msg)
            offsets.finished(offset)
            return
        cost = token_cost(record.body, self.settings.default_max_tokens)
        self.backlogs[self.model_of_topic[topic]].push(
            Pending(record, topic, partition, offset, offsets, cost, prefix_key(record.body)))

    def _admit(self) -> None:
        self._stop_running()
        for model, backlog in self.backlogs.items():
            self._stop_lines(backlog)
            budget = self.budgets[model]
            while backlog and budget.fits(backlog.peek().cost):
                item = backlog.pop()
                ticket = next(self._tickets)
                budget.take(ticket, item.cost)
                self.running[ticket] = Running(item, model, time.time())
                started = time.perf_counter()
                self.engine.submit(ticket, EngineRequest(item.record.url, item.record.body))
                self._submitting += time.perf_counter() - started
                metrics.child(metrics.ADMITTED, model).inc()

    def _stop_lines(self, backlog: Backlog) -> None:
        """Lines of cancelled or expired batches that have not started never run."""
        for batch_id in backlog.batches():
            code = self.stops.code(batch_id)
            if code is None:
                continue
            error = LineError(code=code, message=BATCH_LINE_ERRORS[code])
            for item in backlog.take_batch(batch_id):
                self._produce(item, error=error)

    def _stop_running(self) -> None:
        """Requests of a batch that was cancelled (or expired) stop in the engine at once:
        each becomes the batch's error line; what had finished was already sent."""
        if self.stops.version == self._stops_seen:
            return
        self._stops_seen = self.stops.version
        stopped = {ticket: code for ticket, run in self.running.items()
                   if (code := self.stops.code(run.item.record.batch_id)) is not None}
        if not stopped:
            return
        self.engine.abort(stopped)
        for ticket, code in stopped.items():
            run = self.running.pop(ticket)
            self.budgets[run.model].release(ticket)
            self._produce(run.item, error=LineError(code=code, message=BATCH_LINE_ERRORS[code]))
        log.info("aborted %d running requests of stopped batches", len(stopped))

    def _finish(self, finished: list[tuple[int, EngineResult]]) -> None:
        now = time.time()
        for ticket, result in finished:
            run = self.running.pop(ticket)
            self.budgets[run.model].release(ticket)
            self._produce(run.item, result, engine_ms=(now - run.admitted_at) * 1000,
                          queue_ms=(run.admitted_at - run.item.record.enqueued_at) * 1000)

    def _drain(self) -> None:
        """Graceful stop: fetch nothing more, hand back what has not started, finish what
        runs (up to `worker_drain_s`)."""
        self.consumer.pause(self.consumer.assignment())
        handed_back = self._waiting()
        self.backlogs = {m: self._backlog() for m in self.backlogs}
        deadline = time.monotonic() + self.settings.worker_drain_s
        while self.running and time.monotonic() < deadline and not self._failed_deliveries:
            self._finish(self.engine.step())
            self.producer.poll(0)
        log.info("stopping: %d lines handed back unstarted, %d unfinished after the drain",
                 handed_back, len(self.running))

    # --- responses and offsets ---------------------------------------------------------
    def _produce(
        self, item: Pending, result: EngineResult | None = None,
        error: LineError | None = None, engine_ms: float | None = None,
        queue_ms: float | None = None,
    ) -> None:
        """One response: the engine's result, or a batch-level error for a line not run."""
        record = item.record
        value = response_value(
            record,
            id=f"batch_req_{ids.token()}",
            request_id=f"req_{ids.token()}" if result else None,
            status_code=result.status_code if result else None,
            body=result.body if result else None,
            tokens=result.tokens if result else Tokens(),
            error=error,
            worker=self.name,
            engine_ms=engine_ms,
            queue_ms=queue_ms,
        )
        produce(self.producer, self.topics.responses, value, key=record.batch_id,
                headers={"batch_id": record.batch_id, "custom_id": record.custom_id},
                on_delivery=partial(self._delivered, item))
        self._count(self.model_of_topic.get(item.topic, ""), result, error)

    def _count(self, model: str, result: EngineResult | None, error: LineError | None) -> None:
        served = self.engine.catalog.get(model)
        base = served.base if served is not None else model  # an adapter's: its model's
        ours = base in self.load.totals
        if result is not None and result.status_code == 200:
            if ours:
                self.load.answered(base, result.tokens)
            metrics.child(metrics.FINISHED, model).inc()
            metrics.child(metrics.PROMPT_TOKENS, model).inc(result.tokens.prompt)
            metrics.child(metrics.GENERATION_TOKENS, model).inc(result.tokens.completion)
        else:
            code = error.code if error is not None else str(result.status_code if result
                                                              else "error")
            metrics.child(metrics.FAILED, model, code).inc()
            if ours:
                self.load.failed(base)

    def _delivered(self, item: Pending, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            item.finish()
        else:
            log.error("response delivery failed: %s", err)
            self._failed_deliveries += 1

    def _commit(self, sync: bool, only: set[tuple[str, int]] | None = None) -> None:
        self._last_commit = time.monotonic()
        due = []
        for (topic, partition), offsets in self.offsets.items():
            if only is not None and (topic, partition) not in only:
                continue
            offset = offsets.committable()
            if offset is not None and offset != offsets.committed:
                due.append(TopicPartition(topic, partition, offset))
                offsets.committed = offset
        if not due:
            return
        try:
            if sync:
                self.consumer.commit(offsets=due, asynchronous=False)
            else:
                self.consumer.commit(offsets=due, asynchronous=True)
        except KafkaException as exc:  # e.g. mid-rebalance: those lines are redelivered
            log.warning("commit failed: %s", exc)

    # --- rebalances ------------------------------------------------------------------------
    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.offsets[(tp.topic, tp.partition)] = PartitionOffsets()
        self._paused = False
        log.info("assigned %s", partition_names(partitions))
        if self._on_ready is not None:
            self._on_ready()
            self._on_ready = None
        self._note_partitions()

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._commit(sync=True, only=keys)  # still ours until this returns
        self._forget(keys)
        log.info("revoked %s", partition_names(partitions))
        self._note_partitions()

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget({(tp.topic, tp.partition) for tp in partitions})
        log.warning("lost %s", partition_names(partitions))
        self._note_partitions()

    def _note_partitions(self) -> None:
        """Which partitions of each requests topic this worker holds, in its readiness
        marker (what an operator, `millrace chaos` and the tests read)."""
        for topic in self.model_of_topic:
            held = [p for t, p in self.offsets if t == topic]
            readiness.note_partitions(self.settings, self.settings.worker_name, topic, held)

    def _forget(self, keys: set[tuple[str, int]]) -> None:
        """Unstarted lines of partitions we no longer own are dropped (the new owner reads
        them again); running ones finish, their offsets no longer ours to commit."""
        for backlog in self.backlogs.values():
            backlog.drop(keys)
        for key in keys:
            self.offsets.pop(key, None)


