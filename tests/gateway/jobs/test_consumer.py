"""The gateway's batch jobs are done by the owner of their partition only: a gateway that
froze holding a `created` event while another gateway took its partition over enqueues no
line and writes no explode checkpoint; the owner does the explode."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.jobs.base import Fenced
from gateway.jobs.consumer import Jobs
from gateway.worker_board import WorkerBoard
from millrace.protocol import FileObject
from millrace.records import BatchCreated
from millrace.settings import BUNDLED_CHAT_MODEL
from millrace.storage.store import Store
from ops.chaos import batch_file
from tests.gateway.jobs.world import JobsWorld, close

LINES = 3


def test_a_gateway_that_wakes_up_stale_leaves_the_explode_to_the_owner(
        world: JobsWorld) -> None:
    settings, topics, files = world.settings, world.topics, world.files
    data = batch_file(LINES, "j")
    files.write_bytes("files/file-j", data)
    batch_id = f"batch_{uuid.uuid4().hex[:12]}"
    created = BatchCreated(batch_id=batch_id, project="p", batch={
        "id": batch_id, "input_file_id": "file-j", "endpoint": "/v1/chat/completions"})

    async def scenario() -> tuple[dict[str, str], dict[str, str]]:
        store = Store.connect(settings.require_redis(), settings.topic_prefix)
        await store.put_file(FileObject(id="file-j", bytes=len(data), created_at=1,
                                        filename="j.jsonl", purpose="batch"), "p", "files/file-j")
        await store.r.hset(store.keys.batch(batch_id), mapping={"project": "p",
                                                                 "line_key": "00" * 16})
        stale, owner = (Jobs(settings, store, files, WorkerBoard()) for _ in range(2))
        stale.owners.take([0])  # as the group gave it the partition
        owner.owners.take([0])  # it froze: its session expired, the other gateway took it
        with pytest.raises(Fenced):
            await stale.do(created, 0)
        with pytest.raises(Fenced):  # a checkpoint is checked and written in one step
            await stale.checkpoint(batch_id, 0, lines=LINES)
        after_stale = await store.r.hgetall(store.keys.explode(batch_id))
        await owner.do(created, 0)
        after_owner = await store.r.hgetall(store.keys.explode(batch_id))
        await close(stale, owner)
        await store.close()
        return after_stale, after_owner

    after_stale, after_owner = asyncio.run(scenario())
    assert after_stale == {}
    assert after_owner["complete"] == "1"
    # each line enqueued once: by the owner alone
    assert len(world.read(topics.requests_for(BUNDLED_CHAT_MODEL),
                          settings.request_partitions)) == LINES
