"""The ingest stage: OpenAI batch lines produced straight to `<prefix>.ingest` by any Kafka
client become request lines of open (stream) batches.

Messages are keyed by the batch id (or carry it in a `batch_id` header; a key and a header
that disagree are refused) and carry the batch's ingest token (header
`millrace-ingest-token`, handed to whoever created the batch): knowing a batch id is not
enough to write into a batch or seal it. A message without the right token is refused to
ingest-rejects and counts for nothing. Each is validated
like an uploaded line: a good one goes to the requests topic; a bad one that a batch owns
becomes an error line of that batch (and is shown on ingest-rejects); one no batch can own
(unknown or sealed batch, duplicate custom_id) goes to ingest-rejects only. A control
message (header `millrace-control: seal`) closes the batch with its final total after
every line produced before it to the same partition.

Sealing: `POST /v1/batches/{id}/seal {"total": N}` seals once N messages of the batch were
processed (lines and rejected duplicates, counted once per partition:offset), so producers
may use any partitioner. A control message is exact only behind lines on its own partition.

Offsets are committed after everything a poll produced is acknowledged; a redelivered
message keeps its custom_id claim (keyed by partition:offset), so it is never counted twice.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid

from confluent_kafka import Consumer, Message, TopicPartition

from gateway.lines import StreamLine, persist_stream_lines, request, rules, ticket
from gateway.validation import Report, Rules, check_line
from gateway.worker_board import WorkerBoard
from millrace import metrics
from millrace.filestore import FileStore
from millrace.kafka import AsyncProducer, KafkaConfig, consume_loop, partition_names
from millrace.protocol import ErrorDetail, ErrorEnvelope
from millrace.readiness import note_partitions
from millrace.records import (
    CONTROL_HEADER,
    INGEST_TOKEN_HEADER,
    BatchValidated,
    IngestReject,
    Order,
    RequestRecord,
    ResponseRecord,
)
from millrace.settings import Settings
from millrace.storage.ledger import StreamLedger
from millrace.storage.store import Store
from millrace.topics import Topics

log = logging.getLogger(__name__)
MAX_REJECT_VALUE = 4096
KEYS_KEPT = 10_000  # batches' line keys and order kept in memory


def token_matches(stream: dict[str, str], given: str | None) -> bool:
    """A message's ingest token against its batch's (a batch opened before tokens has
    none, and takes any message)."""
    expected = stream.get("token")
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def header(msg: Message, name: str) -> str | None:
    headers: list[tuple[str, bytes | None]] = list(msg.headers() or [])  # type: ignore[arg-type]
    for key, value in headers:
        if key == name and value is not None:
            return value.decode(errors="replace")
    return None


async def close(ledger: StreamLedger, producer: AsyncProducer, topics: Topics,
                batch_id: str) -> asyncio.Future[Message]:
    """Close the batch (idempotent) and publish its total, as `validated` does for files."""
    total = await ledger.close(batch_id)
    closed = BatchValidated(batch_id=batch_id, total=total)
    return producer.produce(topics.batch_events, batch_id, closed.dumps())


async def close_if_complete(ledger: StreamLedger, producer: AsyncProducer, topics: Topics,
                            batch_id: str) -> list[asyncio.Future[Message]]:
    """Close once every message the producer announced (`POST /seal {"total"}`) is in."""
    stream = await ledger.get(batch_id)
    if stream is None or "expected" not in stream or "sealed_total" in stream:
        return []
    if await ledger.received(batch_id) < int(stream["expected"]):
        return []
    return [await close(ledger, producer, topics, batch_id)]


class StreamIngest:
    def __init__(self, settings: Settings, store: Store, files: FileStore,
                 board: WorkerBoard) -> None:
        self.settings = settings
        self.board = board  # the LoRA adapters workers serve are model names too
        self.ledger = StreamLedger(store)
        self.files = files
        self.topics = Topics.from_settings(settings)
        kafka = KafkaConfig.of(settings, "ingest")
        self.consumer = Consumer(kafka.consumer(self.topics.ingest_group()))
        self.producer = AsyncProducer(kafka.producer())
        self._stop = asyncio.Event()
        self._rules_by_endpoint: dict[str, Rules] = {}
        self.store = store
        # what each line of a batch carries: its tickets' key, its priority and deadline
        # (none of them ever changes)
        self._carried: dict[str, tuple[str | None, Order]] = {}
        self._epoch = ""
        # per poll: each batch's new lines (persisted before anything is enqueued)
        self._lines: dict[str, list[StreamLine]] = {}
        self._produce: list[tuple[str, str, int | None, bytes]] = []

    async def run(self) -> None:
        self.consumer.subscribe([self.topics.ingest], on_assign=self._assigned,
                                on_revoke=self._revoked, on_lost=self._revoked)
        try:
            await consume_loop(self.consumer, self.handle_all, self._stop, commit="sync")
        finally:
            await asyncio.to_thread(self.consumer.close)
            self.producer.close()

    def stop(self) -> None:
        self._stop.set()

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("ingest: assigned %s", partition_names(partitions))
        note_partitions(self.settings, self.settings.gateway_name, self.topics.ingest,
                        [tp.partition for tp in partitions])

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("ingest: revoked %s", partition_names(partitions))
        note_partitions(self.settings, self.settings.gateway_name, self.topics.ingest, [])

    async def handle_all(self, messages: list[Message]) -> None:
        """Route a poll's messages; persist its new lines, then enqueue them, and wait
        until all of it is acknowledged."""
        self._epoch = await asyncio.to_thread(self.producer.cluster_id)
        self._lines, self._produce = {}, []
        pending = [f for m in messages for f in await self.handle(m)]
        for batch_id, lines in self._lines.items():
            await asyncio.to_thread(persist_stream_lines, self.files, batch_id, lines)
        pending += [self.producer.produce(topic, key, value, partition=partition)
                    for topic, key, partition, value in self._produce]
        await asyncio.gather(*pending)
        metrics.LINES_INGESTED.labels("stream").inc(len(self._produce))

    async def handle(self, msg: Message) -> list[asyncio.Future[Message]]:
        """Route one message; returns the rejects and control deliveries to await."""
        key = msg.key()
        keyed = key.decode(errors="replace") if key else None
        named = header(msg, "batch_id")
        if keyed and named and keyed != named:
            return [self._refuse(msg, named, "batch_id_mismatch",
                                 f"the key '{keyed[:64]}' and the batch_id header name "
                                 "different batches")]
        batch_id = named or keyed
        if not batch_id:
            return [self._reject(msg, None, "missing_batch_id",
                                 "no batch id: set the message key or a batch_id header")]
        stream = await self.ledger.get(batch_id)
        if stream is None:
            return [self._reject(msg, batch_id, "unknown_batch", "no open batch with this id")]
        if not token_matches(stream, header(msg, INGEST_TOKEN_HEADER)):
            return [self._refuse(msg, batch_id, "invalid_ingest_token",
                                 f"no {INGEST_TOKEN_HEADER} header with the batch's token")]
        if header(msg, CONTROL_HEADER) == "seal":
            return [await close(self.ledger, self.producer, self.topics, batch_id)]
        deliveries = await self._line(msg, batch_id, stream)
        # re-read: `POST /seal {"total": N}` may have come meanwhile; the N-th message closes
        return deliveries + await close_if_complete(self.ledger, self.producer, self.topics,
                                                    batch_id)

    async def _line(
        self, msg: Message, batch_id: str, stream: dict[str, str]
    ) -> list[asyncio.Future[Message]]:
        raw = msg.value() or b""
        report = Report()
        line = check_line(0, raw, self._rules(stream["endpoint"]), report)
        custom_id = line.custom_id if line else _custom_id(raw) or (
            f"ingest-{msg.partition()}-{msg.offset()}")
        token = f"{self._epoch}:{msg.partition()}:{msg.offset()}"
        if "sealed_total" in stream:
            # a message that claimed its line before the batch closed (then we crashed)
            # still becomes that line; anything else is too late
            claim, number = await self.ledger.held(batch_id, custom_id, token)
            if claim is None:
                return [self._reject(msg, batch_id, "batch_sealed", "the batch is sealed")]
        else:
            claim, number = await self.ledger.claim(batch_id, custom_id, token)
        if claim == "duplicate":
            await self.ledger.note_rejected(batch_id, token)
            return [self._reject(msg, batch_id, "duplicate_custom_id",
                                 f"custom_id '{custom_id}' is already in the batch")]
        line_key, order = await self._carried_by_lines(batch_id, stream["project"])
        if line is not None:
            record = RequestRecord(batch_id=batch_id, project=stream["project"],
                                   custom_id=custom_id, line=number, url=line.url,
                                   body=line.body, ticket=ticket(line_key, number, custom_id),
                                   priority=order.priority, deadline=order.deadline)
            self._keep(batch_id, StreamLine(line=number, custom_id=custom_id, request=record),
                       request(self.settings, self.topics, record))
            return []
        error = report.errors[0]
        detail = ErrorDetail(message=error.message, type="invalid_request_error",
                             param=error.param, code=error.code)
        failed = ResponseRecord(
            batch_id=batch_id, project=stream["project"], custom_id=custom_id, line=number,
            id=f"batch_req_{uuid.uuid4().hex}", request_id=f"req_{uuid.uuid4().hex}",
            status_code=400, body=ErrorEnvelope(error=detail).model_dump(),
            ticket=ticket(line_key, number, custom_id),
        )
        self._keep(batch_id, StreamLine(line=number, custom_id=custom_id, error=failed),
                   (self.topics.responses, batch_id, None, failed.dumps()))
        return [self._reject(msg, batch_id, error.code, f"{error.message} (an error line of the "
                             "batch)")]

    def _keep(self, batch_id: str, line: StreamLine,
              produce: tuple[str, str, int | None, bytes]) -> None:
        self._lines.setdefault(batch_id, []).append(line)
        self._produce.append(produce)

    def _rules(self, endpoint: str) -> Rules:
        """Line rules per endpoint, built once (served models are parsed from settings;
        the adapters on the board are looked up as lines name them)."""
        if endpoint not in self._rules_by_endpoint:
            self._rules_by_endpoint[endpoint] = rules(self.settings, endpoint, self.board)
        return self._rules_by_endpoint[endpoint]

    async def _carried_by_lines(self, batch_id: str, project: str
                                ) -> tuple[str | None, Order]:
        """The batch's line key and its lines' order (priority, deadline)."""
        if len(self._carried) > KEYS_KEPT:
            self._carried.clear()
        if batch_id not in self._carried:
            batch = await self.store.get_batch(batch_id, project)
            order = Order.of(batch.model_dump()) if batch else Order()
            self._carried[batch_id] = (await self.store.line_key(batch_id), order)
        return self._carried[batch_id]

    def _refuse(self, msg: Message, batch_id: str, code: str,
                reason: str) -> asyncio.Future[Message]:
        """A message that is not the batch's to take (forged, or a producer's mistake): a
        reject (counted) and a warning; the batch does not see it."""
        log.warning("ingest: refused %d@%d for %s: %s", msg.partition(), msg.offset(),
                    batch_id, code)
        return self._reject(msg, batch_id, code, reason)

    def _reject(self, msg: Message, batch_id: str | None, code: str,
                reason: str) -> asyncio.Future[Message]:
        metrics.RECORDS_REFUSED.labels("ingest", code).inc()
        value = (msg.value() or b"")[:MAX_REJECT_VALUE].decode(errors="replace")
        reject = IngestReject(batch_id=batch_id, code=code, reason=reason,
                              partition=msg.partition() or 0, offset=msg.offset() or 0,
                              value=value)
        log.info("ingest reject %s at %d@%d: %s", batch_id, msg.partition(), msg.offset(),
                 reason)
        return self.producer.produce(self.topics.ingest_rejects, batch_id or "", reject.dumps())


def _custom_id(raw: bytes) -> str | None:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    custom_id = value.get("custom_id") if isinstance(value, dict) else None
    return custom_id if isinstance(custom_id, str) and custom_id else None
