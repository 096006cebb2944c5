"""Batch jobs that gateways take from `<prefix>.batch-events` (group `<prefix>.gateway-jobs`):

- `created` (a file batch): **explode** — fetch the input file first if the batch named it
  by URL (`input_url`), validate every line, then enqueue each line not yet enqueued or
  finished (a line with link inputs once their pages are fetched — each URL once per
  batch, kept in `links/<batch>.json` for a re-drive — or as its `fetch_failed` error
  line), recording how far it got (`explode:<batch>`: lines acknowledged, with the
  broker's cluster id) every `CHECKPOINT_LINES`; publish `validated` (or
  `validation_failed`). An explode that completed on this broker is not done again; on a
  new broker (its data lost: `created` comes again from `resume`) it enqueues every line
  that has no result yet.
- `fill_requested`: **fill** — an error line (`batch_cancelled` / `batch_expired`) for every
  line that has no result yet, then `filled`; a stream batch is closed first.
- `redrive_requested`: **re-drive** — enqueue again every line that has no result yet.
- `finished`: what a batch needed while it ran is removed (a stream batch's persisted lines
  and ledger, the explode checkpoint).

Jobs run beside the consume loop, each batch's in the order of its events and different
batches' side by side (`JOBS_AT_ONCE` at a time). A fetch (an input file by URL, link
inputs) gives up its job slot while it waits and takes one of its project's
`FETCHES_PER_PROJECT` instead, so a slow or hostile server delays only the batches of the
project that named it; every fetch ends at its deadline (`millrace/fetch.py`).

A job's offset is committed only once it and every job before it on its partition are done,
so a gateway that dies mid-job leaves it to the next owner of the partition (another
gateway, or itself restarted), which does it again: lines already acknowledged in the same
broker are skipped, lines that have a result are skipped, and a line enqueued twice is
still written once (the sink keeps one result per custom_id). A job that meets an outage
(broker, Redis) waits and tries again; one that cannot be done (a missing input file, a
fetch that failed) fails the batch. An input file fetched by URL becomes a file of the
project only once it validated: a page that is not a batch is never stored.

A gateway does a partition's jobs only while it owns the partition (its owner epoch,
`millrace/ownership.py`): a job checks before each chunk it enqueues and before each event
it publishes, and the explode checkpoint is written only by the owner (checked and written
in one step). A gateway that froze or was cut off while another took the partition over
drops the job where it is; the new owner does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from itertools import islice

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from pydantic import ValidationError

from gateway.lines import (
    Fetched,
    FileLine,
    Produce,
    enqueue,
    file_lines,
    link_urls,
    not_run,
    request,
    rules,
    stream_dir,
    stream_lines,
    with_links,
)
from gateway.stream_ledger import StreamLedger
from gateway.validation import validate
from gateway.worker_board import WorkerBoard
from millrace import metrics
from millrace.errors import OUTAGES, disk_full
from millrace.fetch import Fetcher, FetchFailed
from millrace.filestore import FileStore
from millrace.kafka import (
    AsyncProducer,
    BulkProducer,
    KafkaConfig,
    consume_loop,
    skip_malformed,
)
from millrace.ownership import Ownership
from millrace.protocol import BatchError, FileObject
from millrace.records import (
    BatchCreated,
    BatchEvent,
    BatchFilled,
    BatchFillRequested,
    BatchFinished,
    BatchRedriveRequested,
    BatchValidated,
    BatchValidationFailed,
    RequestRecord,
    ResponseRecord,
    parse_event,
)
from millrace.registry import Registry
from millrace.settings import Settings
from millrace.store import DoneLines, Store
from millrace.topics import Topics

log = logging.getLogger(__name__)

CHECKPOINT_LINES = 5000
RETRY_S = 1.0
JOBS_AT_ONCE = 4  # jobs of different batches one gateway runs at once (fetches aside)
FETCHES_PER_PROJECT = 2  # fetches (input files, link pages' batches) of one project at once
PAGES_AT_ONCE = 8  # link pages of one batch fetched at once
TAKEN_MOST = 1000  # jobs taken and not done before the loop stops taking more
STREAM_INPUT = "stream"

Partition = tuple[str, int]


class Fenced(Exception):
    """Another gateway owns the job's partition now: the job is left to it."""


class Missing:
    """A walk over a batch's lines (`Jobs._missing`): iterating yields what to enqueue;
    `lines` counts the lines walked so far (all of them once it is exhausted)."""

    def __init__(self) -> None:
        self.lines = 0
        self.items: Iterator[Produce | RequestRecord] = iter(())

    def __iter__(self) -> Iterator[Produce | RequestRecord]:
        return self.items


class Jobs:
    def __init__(self, settings: Settings, store: Store, files: FileStore,
                 board: WorkerBoard) -> None:
        self.settings = settings
        self.board = board  # the LoRA adapters workers serve are model names too
        self.store = store
        self.files = files
        self.topics = Topics.from_settings(settings)
        kafka = KafkaConfig.of(settings, "jobs")
        self.consumer = Consumer(kafka.consumer(self.topics.jobs_group()))
        self.producer = AsyncProducer(kafka.producer())
        self.bulk = BulkProducer(kafka.producer())  # the lines of explode, fill, re-drive
        self.ledger = StreamLedger(store)
        self.registry = Registry(store, self.producer, self.topics)
        self.fetcher = Fetcher(settings)
        self._stop = asyncio.Event()
        self.lanes: dict[str, asyncio.Task[None]] = {}  # batch id → its last job
        # per partition, the offsets of jobs taken (in order) → done; the highest seen;
        # the offset last committed
        self.undone: defaultdict[Partition, dict[int, bool]] = defaultdict(dict)
        self.seen: dict[Partition, int] = {}
        self.committed: dict[Partition, int] = {}
        self.work = asyncio.Semaphore(JOBS_AT_ONCE)
        self.fetches: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(FETCHES_PER_PROJECT))
        self.failure: Exception | None = None
        self.owners = Ownership(settings.require_redis(), store.keys, self.topics.jobs_group(),
                                "gateway")

    async def run(self) -> None:
        self.consumer.subscribe(
            [self.topics.batch_events],
            on_assign=lambda _, parts: self.owners.take(tp.partition for tp in parts),
            on_revoke=lambda _, parts: self.owners.drop(tp.partition for tp in parts),
            on_lost=lambda _, parts: self.owners.drop(tp.partition for tp in parts))
        try:
            await consume_loop(self.consumer, self.handle, self._stop, most=100,
                               commit="none", every=self.commit)
        finally:
            running = list(self.lanes.values())
            for task in running:  # not done: not committed, taken up again after us
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.commit()
            await asyncio.to_thread(self.consumer.close)
            await self.fetcher.aclose()
            self.producer.close()
            self.bulk.close()
            self.owners.close()

    def stop(self) -> None:
        self._stop.set()

    async def handle(self, messages: list[Message]) -> None:
        """Start each message's job in its batch's lane; wait only while too many are
        taken and not done."""
        lost = await asyncio.to_thread(self.owners.lost, {m.partition() or 0 for m in messages})
        for msg in messages:
            where: Partition = (msg.topic() or "", msg.partition() or 0)
            if where[1] in lost:  # taken over while we held it: its jobs are the new owner's
                continue
            offset = msg.offset() or 0
            self.seen[where] = max(self.seen.get(where, -1), offset)
            try:
                event = parse_event(msg.value() or b"")
            except ValidationError:
                skip_malformed(msg)
                continue
            self.undone[where][offset] = False
            task = asyncio.create_task(self._job(event, self.lanes.get(event.batch_id),
                                                 where, offset))
            self.lanes[event.batch_id] = task
            task.add_done_callback(functools.partial(self._lane_done, event.batch_id))
        while sum(len(o) for o in self.undone.values()) > TAKEN_MOST and self.lanes:
            await asyncio.wait(list(self.lanes.values()), return_when=asyncio.FIRST_COMPLETED)
            self._raise_failure()

    async def _job(self, event: BatchEvent, before: asyncio.Task[None] | None,
                   where: Partition, offset: int) -> None:
        if before is not None:  # the batch's earlier job first
            await asyncio.wait([before])
        while not self._stop.is_set():
            try:
                async with self.work:
                    await self.do(event, where[1])
                break
            except Fenced:
                log.warning("%s job of %s left to the new owner of its partition", event.type,
                            event.batch_id)
                return
            except OUTAGES as exc:  # broker or Redis away: the job waits for them
                log.warning("%s job of %s waits: %s", event.type, event.batch_id, exc)
                await asyncio.sleep(RETRY_S)
            except Exception as exc:
                if disk_full(exc):  # the file store is full: the job waits for space
                    log.warning("%s job of %s waits: %s", event.type, event.batch_id, exc)
                    await asyncio.sleep(RETRY_S)
                    continue
                # a bug: the service stops, the job comes again
                log.exception("%s job of %s failed", event.type, event.batch_id)
                self.failure = exc
                return
        else:
            return
        if offset in self.undone.get(where, {}):
            self.undone[where][offset] = True

    def _lane_done(self, batch_id: str, task: asyncio.Task[None]) -> None:
        if self.lanes.get(batch_id) is task:
            del self.lanes[batch_id]

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def commit(self) -> None:
        """Commit, per partition, the offset of its first job not done yet (or past the
        last message taken): a job is never committed before the jobs ahead of it."""
        self._raise_failure()
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        for gone in set(self.seen) - owned:  # moved to another gateway: its to commit now
            self.seen.pop(gone)
            self.undone.pop(gone, None)
            self.committed.pop(gone, None)
        offsets = []
        for where, last in self.seen.items():
            jobs = self.undone[where]
            while jobs and jobs[next(iter(jobs))]:  # done jobs at the front
                del jobs[next(iter(jobs))]
            upto = next(iter(jobs)) if jobs else last + 1
            if self.committed.get(where) != upto:
                offsets.append(TopicPartition(where[0], where[1], upto))
        if not offsets:
            return
        try:
            await asyncio.to_thread(self.consumer.commit, offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # e.g. a partition moved: its jobs come again there
            log.warning("commit failed: %s", exc)
            return
        self.committed.update({(o.topic, o.partition): o.offset for o in offsets})

    @contextlib.asynccontextmanager
    async def fetching(self, project: str) -> AsyncIterator[None]:
        """A fetch: off the gateway's job slots, within its project's own few."""
        self.work.release()
        try:
            async with self.fetches[project]:
                yield
        finally:
            await self.work.acquire()

    async def do(self, event: BatchEvent, partition: int) -> None:
        await self.owned(partition)
        if isinstance(event, BatchCreated) and event.batch.get("input_file_id") != STREAM_INPUT:
            await self.explode(event, partition)
        elif isinstance(event, BatchFillRequested):
            await self.fill(event, partition)
        elif isinstance(event, BatchRedriveRequested):
            await self.redrive(event, partition)
        elif isinstance(event, BatchFinished):
            await self.forget(event)

    async def owned(self, partition: int) -> None:
        """Raises `Fenced` once another gateway owns the partition."""
        if await asyncio.to_thread(self.owners.lost, [partition]):
            raise Fenced(partition)

    async def checkpoint(self, batch_id: str, partition: int, **fields: str | int) -> None:
        """How far the explode got, written only while we own the partition."""
        if not await asyncio.to_thread(self.owners.hset_if_owner, partition,
                                       self.store.keys.explode(batch_id), fields):
            raise Fenced(partition)

    # --- explode ---------------------------------------------------------------------------
    async def explode(self, event: BatchCreated, partition: int) -> None:
        batch_id, project = event.batch_id, event.project
        epoch = await asyncio.to_thread(self.producer.cluster_id)
        checkpoint = await self.store.r.hgetall(self.store.keys.explode(batch_id))
        if checkpoint.get("epoch") == epoch and checkpoint.get("complete") == "1":
            return  # done on this broker: a replayed `created`
        input_file_id = str(event.batch.get("input_file_id"))
        source = await self.store.get_file(input_file_id, project)
        ext = await self.store.get_ext(batch_id)
        # (a `created` rebuilt from the Batch document alone has no URL: Redis keeps it too)
        url = event.input_url or ext.get("input_file_url")
        fetched_file: FileObject | None = None
        path = source.path if source is not None else None
        if source is None and url is not None:
            path = f"files/{input_file_id}"
            try:
                async with self.fetching(project):
                    fetched_file = await self.fetch_input(input_file_id, url, path,
                                                          int(event.at))
            except FetchFailed as exc:
                await self._failed(batch_id, f"{url}: {exc.text}", code="fetch_failed",
                                   param="input_file_url")
                return
        if path is None:
            await self._failed(batch_id, "the input file is gone")
            return
        line_rules = rules(self.settings, str(event.batch.get("endpoint")), self.board)
        started = time.monotonic()
        try:
            report = await asyncio.to_thread(validate, self.files.iter_lines(path),
                                             line_rules)
        except FileNotFoundError:
            await self._failed(batch_id, "the input file is gone")
            return
        checked = time.monotonic()
        if report.errors:
            if fetched_file is not None:  # not a batch: the page is not kept
                await asyncio.to_thread(self.files.delete, path)
            failed = BatchValidationFailed(batch_id=batch_id, errors=report.errors)
            await self.owned(partition)
            await self.producer.send(self.topics.batch_events, batch_id, failed.dumps())
            return
        if fetched_file is not None:
            await self.registry.put_file(fetched_file, project, path)
        after = int(checkpoint.get("lines", 0)) if checkpoint.get("epoch") == epoch else 0
        done = await self.store.done_lines(batch_id)
        line_key = await self.store.line_key(batch_id)
        lines = (line for line in file_lines(self.files, path, line_rules, batch_id, project,
                                             bool(ext.get("single")), report.model, line_key)
                 if line.line > after and line.line not in done)
        fetched = await self.fetched(batch_id)
        while chunk := await asyncio.to_thread(lambda: list(islice(lines, CHECKPOINT_LINES))):
            items = await self.enqueued(batch_id, chunk, fetched)
            await self.owned(partition)
            await asyncio.to_thread(self.bulk.send_all, items)
            metrics.LINES_INGESTED.labels("file").inc(len(chunk))
            await self.checkpoint(batch_id, partition, epoch=epoch, lines=chunk[-1].line)
        validated = BatchValidated(batch_id=batch_id, total=report.total, model=report.model)
        await self.owned(partition)
        await self.producer.send(self.topics.batch_events, batch_id, validated.dumps())
        await self.checkpoint(batch_id, partition, epoch=epoch, complete="1")
        log.info("%s: %d lines validated in %.2f s, in Kafka %.2f s later", batch_id,
                 report.total, checked - started, time.monotonic() - checked)

    async def enqueued(self, batch_id: str, chunk: list[FileLine], fetched: Fetched
                       ) -> list[Produce]:
        """What to produce for these lines of the batch's file (`linked` for those that may
        have link inputs)."""
        plain = [enqueue(self.settings, self.topics, line, batch_id)
                 for line in chunk if not line.maybe_links]
        maybe = [line.record() for line in chunk if line.maybe_links]
        return plain + (await self.linked(batch_id, maybe, fetched) if maybe else [])

    async def _failed(self, batch_id: str, why: str, code: str = "server_error",
                      param: str | None = None) -> None:
        failed = BatchValidationFailed(batch_id=batch_id, errors=[
            BatchError(code=code, message=f"could not read the batch: {why}", param=param)])
        await self.producer.send(self.topics.batch_events, batch_id, failed.dumps())

    async def fetch_input(self, file_id: str, url: str, path: str, at: int) -> FileObject:
        """The input file named by URL, into the file store at `path`; the file it will be
        once it validated."""
        size = await self.fetcher.to_store(url, self.files, path, self.settings.batch_max_bytes)
        name = url.rsplit("/", 1)[-1].split("?")[0][:255] or "input.jsonl"
        return FileObject(id=file_id, bytes=size, created_at=at, filename=name,
                          purpose="batch")

    # --- link inputs ----------------------------------------------------------------------
    def _links_key(self, batch_id: str) -> str:
        return f"links/{batch_id}.json"

    async def fetched(self, batch_id: str) -> Fetched:
        """The pages this batch's explode fetched already (a re-drive uses them again)."""
        key = self._links_key(batch_id)
        if not await asyncio.to_thread(self.files.exists, key):
            return {}
        raw = await asyncio.to_thread(self.files.read_bytes, key)
        return {url: (text, reason) for url, (text, reason) in json.loads(raw).items()}

    async def linked(self, batch_id: str, chunk: list[RequestRecord], fetched: Fetched
                     ) -> list[Produce]:
        """The chunk's records to produce, their link inputs fetched (each URL once per
        batch, a few at a time, off the event loop's back) and put in place."""
        wanted = sorted({u for r in chunk for u in link_urls(r)} - set(fetched))
        if wanted:
            gate = asyncio.Semaphore(PAGES_AT_ONCE)

            async def one(url: str) -> None:
                async with gate:
                    try:
                        fetched[url] = (await self.fetcher.text(url), "")
                    except FetchFailed as exc:
                        fetched[url] = (None, exc.text)

            async with self.fetching(chunk[0].project):
                await asyncio.gather(*(one(u) for u in wanted))
            data = json.dumps({u: list(v) for u, v in fetched.items()}).encode()
            await asyncio.to_thread(self.files.write_bytes, self._links_key(batch_id), data)
        out: list[Produce] = []
        for record in chunk:
            done = with_links(record, fetched) if link_urls(record) else record
            out.append(request(self.settings, self.topics, done)
                       if isinstance(done, RequestRecord) else self._error(done))
        return out

    async def forget(self, event: BatchFinished) -> None:
        await self.store.r.delete(self.store.keys.explode(event.batch_id))
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.files.delete, self._links_key(event.batch_id))
        if event.batch.get("input_file_id") == STREAM_INPUT:
            await self.ledger.forget(event.batch_id)
            await asyncio.to_thread(self.files.delete_tree, stream_dir(event.batch_id))

    # --- fill and re-drive ----------------------------------------------------------------
    async def fill(self, event: BatchFillRequested, partition: int) -> None:
        if event.input_file_id == STREAM_INPUT:
            await self.ledger.close(event.batch_id)  # no line joins a batch being filled
        walk = await self._missing(event.batch_id, event.project, event.input_file_id,
                                   fill=event.code)
        sent = await self._enqueue(event.batch_id, walk, partition)
        filled = BatchFilled(batch_id=event.batch_id, total=walk.lines)
        await self.owned(partition)
        await self.producer.send(self.topics.batch_events, event.batch_id, filled.dumps())
        log.info("%s: %d of %d lines filled with %s", event.batch_id, sent, walk.lines,
                 event.code)

    async def redrive(self, event: BatchRedriveRequested, partition: int) -> None:
        walk = await self._missing(event.batch_id, event.project, event.input_file_id)
        sent = await self._enqueue(event.batch_id, walk, partition)
        log.info("%s: %d lines enqueued again", event.batch_id, sent)

    async def _enqueue(self, batch_id: str, walk: Missing, partition: int) -> int:
        """Produce what the walk finds, a chunk at a time (a 50,000-line batch is never
        held whole); lines with link inputs get their pages as the explode fetched them."""
        sent = 0
        fetched: Fetched | None = None
        while chunk := await asyncio.to_thread(lambda: list(islice(walk, CHECKPOINT_LINES))):
            ready = [item for item in chunk if not isinstance(item, RequestRecord)]
            linked = [item for item in chunk if isinstance(item, RequestRecord)]
            if linked:
                fetched = fetched if fetched is not None else await self.fetched(batch_id)
                ready += await self.linked(batch_id, linked, fetched)
            await self.owned(partition)
            await asyncio.to_thread(self.bulk.send_all, ready)
            sent += len(chunk)
        return sent

    async def _missing(self, batch_id: str, project: str, input_file_id: str | None,
                       fill: str | None = None) -> Missing:
        """A walk over the batch's lines yielding what to enqueue for each line without a
        result: its request again (a request with link inputs as its record, to be fetched
        first), or with `fill`, its error line."""
        done = await self.store.done_lines(batch_id)
        walk = Missing()
        if input_file_id == STREAM_INPUT:
            line_key = await self.store.line_key(batch_id)
            walk.items = self._stream_missing(walk, batch_id, done, fill, line_key)
            return walk
        source = await self.store.get_file(str(input_file_id), project)
        batch = await self.store.get_batch(batch_id, project)
        if source is None or batch is None:
            return walk
        reply = bool((await self.store.get_ext(batch_id)).get("single"))
        line_rules = rules(self.settings, batch.endpoint, self.board)
        line_key = await self.store.line_key(batch_id)
        lines = file_lines(self.files, source.path, line_rules, batch_id, project, reply,
                           line_key=line_key)
        walk.items = self._file_missing(walk, batch_id, project, lines, done, fill, line_key)
        return walk

    def _file_missing(self, walk: Missing, batch_id: str, project: str,
                      lines: Iterator[FileLine], done: DoneLines, fill: str | None,
                      line_key: str | None) -> Iterator[Produce | RequestRecord]:
        for line in lines:
            walk.lines += 1
            if line.line in done:
                continue
            if fill is not None:
                yield self._error(not_run(batch_id, project, line.custom_id, line.line, fill,
                                          line_key))
            elif line.maybe_links and link_urls(record := line.record()):
                yield record
            else:
                yield enqueue(self.settings, self.topics, line, batch_id)

    def _stream_missing(self, walk: Missing, batch_id: str, done: DoneLines,
                        fill: str | None, line_key: str | None
                        ) -> Iterator[Produce | RequestRecord]:
        for line in stream_lines(self.files, batch_id):
            walk.lines += 1
            if line.line in done:
                continue
            if line.error is not None:  # a message that failed validation: its error line
                yield self._error(line.error)
            elif fill is not None:
                assert line.request is not None
                yield self._error(not_run(batch_id, line.request.project, line.custom_id,
                                          line.line, fill, line_key))
            elif line.request is not None:
                yield request(self.settings, self.topics, line.request)

    def _error(self, record: ResponseRecord) -> Produce:
        return self.topics.responses, record.batch_id, None, record.dumps()
