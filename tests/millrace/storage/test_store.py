"""The batch half of the read model on a real Redis: the aggregator's fenced save (an older
view or an un-finishing one changes nothing), the active set and deadlines it keeps, the
gateway's half that a rebuild restores without overwriting, and the paging and indexes the
API reads."""

from __future__ import annotations

import json
from typing import Any

from millrace.lifecycle.status import BatchStatus
from millrace.protocol import Batch, StoredEndpoint
from millrace.storage.store import RestoredBatch, Store, Version
from tests.deployment import OnStore


def batch(batch_id: str, expires_at: int | None = 2_000) -> Batch:
    return Batch(id=batch_id, endpoint="/v1/chat/completions", input_file_id="file-1",
                 completion_window="24h", status=BatchStatus.VALIDATING, created_at=1_000,
                 expires_at=expires_at)


async def save(store: Store, batch_id: str, status: str, *, epoch: str = "e1", offset: int,
               final: bool = False, deadline: int | None = 2_000) -> bool:
    return await store.save_aggregate(
        batch_id, json.dumps({"status": status}), {"status": status},
        version=Version(epoch, offset, final), finished=final, deadline=deadline)


def test_the_aggregate_save_is_fenced_by_broker_epoch_offset_and_finality(
        on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        await store.create_batch(batch("b"), "p", listed_at=1.0)
        assert await save(store, "b", "in_progress", offset=10)
        assert not await save(store, "b", "validating", offset=9)  # an older view
        assert await save(store, "b", "in_progress", offset=10)  # the same one again
        assert (await store.get_batch("b", "p")).status is BatchStatus.IN_PROGRESS
        # a broker that came back empty: its offsets start again, under a new cluster id
        assert await save(store, "b", "finalizing", epoch="e2", offset=3)
        assert await save(store, "b", "completed", epoch="e2", offset=4, final=True,
                          deadline=None)
        # a frozen aggregator that wakes up, on any epoch and offset, cannot un-finish it
        assert not await save(store, "b", "in_progress", epoch="e3", offset=99)
        assert not await save(store, "b", "in_progress", epoch="e2", offset=5)
        assert (await store.get_batch("b", "p")).status is BatchStatus.COMPLETED
        assert await store.versions(["b", "none"]) == {"b": Version("e2", 4, True)}
        # finished: out of the deadlines at once, in the active set until the sink is done
        assert await store.due_batches(now=10**10) == []
        assert await store.active_batches() == ["b"]
        await store.done_with("b")
        assert await store.active_batches() == []

    on_store(scenario)


def test_a_batch_is_active_with_its_deadline_from_creation_until_forgotten(
        on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        await store.create_batch(batch("early", expires_at=100), "p", listed_at=1.0,
                                 created='{"type": "created"}')
        await store.create_batch(batch("late", expires_at=500), "p", listed_at=2.0)
        assert await store.active_batches() == ["early", "late"]
        assert await store.due_batches(now=100) == ["early"]
        assert await store.due_batches(now=499) == ["early"]
        assert await store.active_by_status() == {"validating": 2}
        assert (await store.load_aggregate("early")).created == '{"type": "created"}'
        assert (await store.load_aggregate("late")).created is None
        assert await store.line_key("early") not in (None, await store.line_key("late"))
        await store.put_ext("early", {"name": "x"})
        await store.forget_batch("early", "p")
        assert await store.active_batches() == ["late"]
        assert await store.due_batches(now=10**10) == ["late"]
        assert await store.get_batch("early", "p") is None
        assert await store.get_ext("early") == {}
        assert await store.list_batches("p") == [await store.get_batch("late", "p")]

    on_store(scenario)


def test_a_batch_is_only_its_owners_and_pages_newest_first(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        for n in range(5):
            await store.create_batch(batch(f"b{n}"), "p", listed_at=float(n))
        await store.create_batch(batch("q0"), "q", listed_at=2.5)
        assert await store.get_batch("b1", "q") is None
        assert await store.batch_project("q0") == "q"
        first = await store.list_batches("p", limit=2)
        assert [b.id for b in first] == ["b4", "b3"]
        rest = await store.list_batches("p", after="b3", limit=10)
        assert [b.id for b in rest] == ["b2", "b1", "b0"]
        assert await store.list_batches("p", after="q0") == []  # not in p's index
        assert await store.batch_ids_at("p", 1, 2, newest_first=False) == ["b1", "b2"]
        # the admin view merges every project's index by creation
        assert await store.newest_batch_ids(None, 3) == [("b4", "p"), ("b3", "p"),
                                                         ("q0", "q")]
        assert await store.newest_batch_ids("q", 3) == [("q0", "q")]
        owners = await store.line_owners(["b0", "q0", "none"])
        assert owners["b0"] == ("p", await store.line_key("b0"))
        assert owners["q0"] is not None and owners["q0"][0] == "q"
        assert owners["none"] is None

    on_store(scenario)


def test_a_restore_writes_back_only_what_is_missing(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        doc = batch("b").model_dump(mode="json")
        restore = RestoredBatch(project="p", doc=doc, listed_at=7.0)
        # Redis lost: the batch exists only in the aggregator's changelog
        assert await store.restore_batch("b", restore, agg='{"a": 1}',
                                         fields={"status": "in_progress"}, active=True)
        assert (await store.get_batch("b", "p")).status is BatchStatus.IN_PROGRESS
        assert await store.active_batches() == ["b"]
        # a state the aggregator wrote since is kept; the project's index is not re-dated
        await save(store, "b", "finalizing", offset=5)
        assert not await store.restore_batch(
            "b", RestoredBatch(project="p", doc=doc, listed_at=99.0), agg="{}",
            fields={"status": "validating"}, active=True)
        assert (await store.get_batch("b", "p")).status is BatchStatus.FINALIZING
        assert await store.newest_batch_ids("p", 1) == [("b", "p")]
        assert await store.r.zscore(store.keys.batches("p"), "b") == 7.0
        # a save that brings the gateway's half back where it is missing
        await store.r.hdel(store.keys.batch("b"), "doc")
        assert await store.save_aggregate("b", "{}", {"status": "finalizing"},
                                          version=Version("e1", 6, False), finished=False,
                                          deadline=None, restore=restore)
        assert (await store.get_batch("b", "p")).id == "b"

    on_store(scenario)


def test_a_sink_keeps_each_active_batch_s_lowest_offset(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        await store.create_batch(batch("a"), "p", listed_at=1.0)
        where = store.keys.sink_from("responses", 0)
        await store.note_first_offsets({("responses", 0): {"a": 40, "gone": 5}})
        await store.note_first_offsets({("responses", 0): {"a": 12}})
        await store.note_first_offsets({("responses", 0): {"a": 30}})
        await store.note_first_offsets({})
        # the lowest offset stays; a batch that is not active is never noted
        assert await store.r.zrange(where, 0, -1, withscores=True) == [("a", 12.0)]
        await store.forget_first_offsets("a", [("responses", 0)])
        assert await store.r.zcard(where) == 0

    on_store(scenario)


def test_replies_endpoints_leases_and_rate_counters(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        await store.put_replies([("b", "one"), ("b", "two"), ("c", "three")])
        assert await store.wait_reply("b", 1) == "one"
        assert await store.wait_reply("b", 1) == "two"
        assert await store.r.ttl(store.keys.reply("c")) > 0  # never kept for good
        late = StoredEndpoint(id="we_b", url="https://b.example", created_at=2)
        early = StoredEndpoint(id="we_a", url="https://a.example", events=["batch.completed"],
                                created_at=1)
        await store.put_endpoint("p", late)
        await store.put_endpoint("p", early)
        assert await store.endpoints("p") == [early, late]
        assert await store.endpoints("q") == []
        assert await store.delete_endpoint("p", "we_a")
        assert not await store.delete_endpoint("p", "we_a")
        lease = store.keys.namespace + ":lease"
        assert await store.take_lease(lease, 30)
        assert not await store.take_lease(lease, 30)
        counter = store.keys.rate("k", 1)
        assert [await store.count_request(counter, 60) for _ in range(3)] == [1, 2, 3]
        assert 60 < await store.r.ttl(counter) <= 120

    on_store(scenario)
