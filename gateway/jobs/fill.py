"""Fill (`fill_requested`: an error line for every line without a result, then `filled`),
re-drive (`redrive_requested`: every line without a result enqueued again) and forget
(`finished`: what a batch needed while it ran, removed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from itertools import islice

from gateway.jobs.base import CHECKPOINT_LINES, JobBase
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
)
from millrace.lifecycle.state import STREAM_INPUT
from millrace.records import (
    BatchFilled,
    BatchFillRequested,
    BatchFinished,
    BatchRedriveRequested,
    Order,
    RequestRecord,
)
from millrace.storage.done import DoneLines

log = logging.getLogger(__name__)


class Missing:
    """A walk over a batch's lines (`Jobs._missing`): iterating yields what to enqueue;
    `lines` counts the lines walked so far (all of them once it is exhausted)."""

    def __init__(self) -> None:
        self.lines = 0
        self.items: Iterator[Produce | RequestRecord] = iter(())

    def __iter__(self) -> Iterator[Produce | RequestRecord]:
        return self.items


class Fill(JobBase):
    async def forget(self, event: BatchFinished, partition: int) -> None:
        await self.store.forget_explode(event.batch_id)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.files.delete, self._links_key(event.batch_id))
        if event.batch.get("input_file_id") == STREAM_INPUT:
            await self.ledger.forget(event.batch_id)
            await asyncio.to_thread(self.files.delete_tree, stream_dir(event.batch_id))

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
                           line_key=line_key, order=Order.of(batch.model_dump()))
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

