"""What every job uses: the gateway's clients, its partitions' owner epochs, its job and
fetch slots, and the link pages a batch's explode fetched (a re-drive uses them again)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator

from confluent_kafka import Consumer

from gateway.lines import Fetched, Produce, link_urls, request, with_links
from gateway.worker_board import WorkerBoard
from millrace.fetch import Fetcher, FetchFailed
from millrace.filestore import FileStore
from millrace.kafka import AsyncProducer, BulkProducer, KafkaConfig
from millrace.records import RequestRecord, ResponseRecord
from millrace.registry import Registry
from millrace.settings import Settings
from millrace.storage.ledger import StreamLedger
from millrace.storage.ownership import Ownership
from millrace.storage.store import Store
from millrace.topics import Topics

log = logging.getLogger(__name__)

CHECKPOINT_LINES = 5000
RETRY_S = 1.0
JOBS_AT_ONCE = 4  # jobs of different batches one gateway runs at once (fetches aside)
FETCHES_PER_PROJECT = 2  # fetches (input files, link pages' batches) of one project at once
PAGES_AT_ONCE = 8  # link pages of one batch fetched at once
TAKEN_MOST = 1000  # jobs taken and not done before the loop stops taking more


Partition = tuple[str, int]


class Fenced(Exception):
    """Another gateway owns the job's partition now: the job is left to it."""


class JobBase:
    """The clients, slots and owner epochs every kind of job uses (explode, fill,
    re-drive), and the link pages an explode fetched."""

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

    @contextlib.asynccontextmanager
    async def fetching(self, project: str) -> AsyncIterator[None]:
        """A fetch: off the gateway's job slots, within its project's own few."""
        self.work.release()
        try:
            async with self.fetches[project]:
                yield
        finally:
            await self.work.acquire()

    async def owned(self, partition: int) -> None:
        """Raises `Fenced` once another gateway owns the partition."""
        if await asyncio.to_thread(self.owners.lost, [partition]):
            raise Fenced(partition)

    async def checkpoint(self, batch_id: str, partition: int, **fields: str | int) -> None:
        """How far the explode got, written only while we own the partition."""
        if not await asyncio.to_thread(self.owners.hset_if_owner, partition,
                                       self.store.keys.explode(batch_id), fields):
            raise Fenced(partition)

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

    def _error(self, record: ResponseRecord) -> Produce:
        return self.topics.responses, record.batch_id, None, record.dumps()
