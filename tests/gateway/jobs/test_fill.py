"""Fill, re-drive and forget, by a jobs stage on the real broker: a fill writes one error
line with the stop's code for each line without a result and announces the batch's total; a
re-drive enqueues exactly those lines again; a finished batch's explode checkpoint goes."""

from __future__ import annotations

import asyncio
import uuid

from gateway.jobs.consumer import Jobs
from gateway.worker_board import WorkerBoard
from millrace.lifecycle.status import BatchStatus
from millrace.protocol import Batch, FileObject
from millrace.records import (
    BatchFilled,
    BatchFillRequested,
    BatchFinished,
    BatchRedriveRequested,
    RequestRecord,
    ResponseRecord,
    parse_event,
)
from millrace.settings import BUNDLED_CHAT_MODEL
from millrace.storage.store import Store
from ops.chaos import batch_file
from tests.gateway.jobs.world import JobsWorld, close

LINES = 6
DONE = [1, 4]  # lines (numbered from 1) whose result the sink already has


def test_fill_and_redrive_touch_only_the_lines_without_a_result(world: JobsWorld) -> None:
    settings, topics = world.settings, world.topics
    data = batch_file(LINES, "f")
    world.files.write_bytes("files/file-f", data)
    batch_id = f"batch_{uuid.uuid4().hex[:12]}"
    doc = Batch(id=batch_id, endpoint="/v1/chat/completions", input_file_id="file-f",
                completion_window="24h", status=BatchStatus.IN_PROGRESS, created_at=1)

    async def scenario() -> tuple[dict[str, str], dict[str, str]]:
        store = Store.connect(settings.require_redis(), settings.topic_prefix)
        await store.put_file(FileObject(id="file-f", bytes=len(data), created_at=1,
                                        filename="f.jsonl", purpose="batch"),
                             "p", "files/file-f")
        await store.create_batch(doc, "p", listed_at=1.0)
        await store.mark_done({batch_id: DONE})
        await store.r.hset(store.keys.explode(batch_id), mapping={"complete": "1"})
        jobs = Jobs(settings, store, world.files, WorkerBoard())
        jobs.owners.take([0])
        await jobs.redrive(BatchRedriveRequested(batch_id=batch_id, project="p",
                                                 input_file_id="file-f"), 0)
        await jobs.fill(BatchFillRequested(batch_id=batch_id, project="p",
                                           code="batch_cancelled", input_file_id="file-f"), 0)
        before = await store.explode_checkpoint(batch_id)
        await jobs.forget(BatchFinished(batch_id=batch_id, project="p",
                                        status=BatchStatus.CANCELLED, batch={}), 0)
        after = await store.explode_checkpoint(batch_id)
        await close(jobs)
        await store.close()
        return before, after

    before, after = asyncio.run(scenario())
    missing = sorted(f"f-{n - 1}" for n in range(1, LINES + 1) if n not in DONE)
    again = [RequestRecord.model_validate_json(m.value() or b"") for m in world.read(
        topics.requests_for(BUNDLED_CHAT_MODEL), settings.request_partitions)]
    assert sorted(r.custom_id for r in again) == missing
    assert all(r.batch_id == batch_id and r.line not in DONE for r in again)
    errors = [ResponseRecord.model_validate_json(m.value() or b"") for m in world.read(
        topics.responses, settings.partitions)]
    assert sorted(r.custom_id for r in errors) == missing
    assert {(r.error.code if r.error else None) for r in errors} == {"batch_cancelled"}
    events = [parse_event(m.value() or b"") for m in world.read(topics.batch_events,
                                                                settings.partitions)]
    filled = [e for e in events if isinstance(e, BatchFilled)]
    assert [(e.batch_id, e.total) for e in filled] == [(batch_id, LINES)]
    assert before == {"complete": "1"} and after == {}
