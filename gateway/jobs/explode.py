"""The explode of a file batch (`created`): its input fetched when named by URL, every line
validated, each line without a result enqueued, `validated` or `validation_failed`."""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import islice

from gateway.jobs.base import CHECKPOINT_LINES, JobBase
from gateway.lines import Fetched, FileLine, Produce, enqueue, file_lines, rules
from gateway.validation import validate
from millrace import metrics
from millrace.fetch import FetchFailed
from millrace.lifecycle.state import STREAM_INPUT
from millrace.protocol import BatchError, FileObject
from millrace.records import BatchCreated, BatchValidated, BatchValidationFailed, Order

log = logging.getLogger(__name__)


class Explode(JobBase):
    async def explode(self, event: BatchCreated, partition: int) -> None:
        if event.batch.get("input_file_id") == STREAM_INPUT:
            return  # a stream batch: its lines come from the ingest topic
        batch_id, project = event.batch_id, event.project
        epoch = await asyncio.to_thread(self.producer.cluster_id)
        checkpoint = await self.store.explode_checkpoint(batch_id)
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
                                             bool(ext.get("single")), report.model, line_key,
                                             Order.of(event.batch))
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

