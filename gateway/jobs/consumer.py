"""The jobs consumer: `<prefix>.batch-events` in group `<prefix>.gateway-jobs`, each event's
job in its batch's lane, offsets committed only past jobs done (see `gateway/jobs`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from confluent_kafka import KafkaException, Message, TopicPartition
from pydantic import ValidationError

from gateway.jobs.base import RETRY_S, TAKEN_MOST, Fenced, Partition
from gateway.jobs.explode import Explode
from gateway.jobs.fill import Fill
from millrace.errors import OUTAGES, disk_full
from millrace.kafka import consume_loop, skip_malformed
from millrace.records import BatchEvent, parse_event

log = logging.getLogger(__name__)


class Jobs(Explode, Fill):
    """The jobs of the partitions this gateway owns; `do` dispatches by event type."""

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

    async def do(self, event: BatchEvent, partition: int) -> None:
        await self.owned(partition)
        handler = self.HANDLERS.get(event.type)
        if handler is not None:
            await handler(self, event, partition)

    # event type → its job (`millrace.records.EVENT_FLOW` lists the gateway as their reader)
    HANDLERS: ClassVar[dict[str, Callable[[Jobs, Any, int], Awaitable[None]]]] = {
        "created": Explode.explode,
        "fill_requested": Fill.fill,
        "redrive_requested": Fill.redrive,
        "finished": Fill.forget,
    }
