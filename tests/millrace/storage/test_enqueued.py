"""What admission counts, on a real Redis: a batch's entry is written with the batch, read
back with what is left of it (its tokens times the share of its lines not counted yet), and
dropped once the batch ended or was taken back — pruned only by its writer."""

from __future__ import annotations

import json
from typing import Any

from millrace.lifecycle.status import BatchStatus
from millrace.protocol import Batch, RequestCounts
from millrace.storage.enqueued import Enqueued, Queued, queued
from millrace.storage.store import Store, Version
from tests.deployment import OnStore

MODEL = "m"


def batch(batch_id: str) -> Batch:
    return Batch(id=batch_id, endpoint="/v1/chat/completions", input_file_id="file-1",
                 completion_window="24h", status=BatchStatus.VALIDATING, created_at=1_000,
                 expires_at=90_000)


async def progress(store: Store, batch_id: str, status: str, done: int, offset: int) -> None:
    counts = RequestCounts(total=100, completed=done, failed=0).model_dump()
    fields = {"status": status, "request_counts": counts}
    assert await store.save_aggregate(batch_id, json.dumps(fields), fields,
                                      version=Version("e", offset, status == "completed"),
                                      finished=status == "completed", deadline=90_000)


def test_an_entry_is_counted_with_what_is_left_until_the_batch_ends(
        on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        await store.create_batch(batch("a"), "p1", listed_at=1.0,
                                 enqueued=Enqueued(MODEL, 5, 90_000, 100, 1_000, 3_000))
        await store.create_batch(batch("b"), "p2", listed_at=2.0,
                                 enqueued=Enqueued(MODEL, 0, 80_000, 100, 200, 200))
        await store.create_batch(batch("c"), "p1", listed_at=3.0)  # no estimate: not counted
        found = {q.batch_id: q for q in await queued(store, MODEL)}
        assert set(found) == {"a", "b"}
        assert (found["a"].project, found["a"].priority, found["a"].lines,
                found["a"].prompt_tokens, found["a"].tokens) == ("p1", 5, 100, 1_000, 4_000)
        assert found["a"].ahead_of(found["b"])  # higher priority, whatever the deadline

        await progress(store, "a", "in_progress", 75, offset=1)  # a quarter is left
        found = {q.batch_id: q for q in await queued(store, MODEL)}
        assert (found["a"].lines, found["a"].prompt_tokens, found["a"].tokens) == (
            25, 250, 1_000)

        await progress(store, "a", "completed", 100, offset=2)
        await store.forget_batch("b", "p2")  # a create taken back (its event not published)
        # a reader that is not the writer leaves the hash alone
        assert await queued(store, MODEL, prune=False) == []
        assert await store.r.hlen(store.keys.enqueued(MODEL)) == 2
        assert await queued(store, MODEL) == []
        assert await store.r.hlen(store.keys.enqueued(MODEL)) == 0

    on_store(scenario)


def test_equal_priorities_go_by_deadline() -> None:
    early = Queued("e", "p", 0, 1_000, 1, 10, 10)
    late = Queued("l", "p", 0, 2_000, 1, 10, 10)
    assert early.ahead_of(late) and not late.ahead_of(early)
    assert not early.ahead_of(early)
