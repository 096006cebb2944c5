"""What resuming publishes for each kind of unfinished batch, and what the sweep does to a
stuck one — pure decisions, then the sweep endpoint on a real deployment."""

from __future__ import annotations

import time

import httpx
from openai import OpenAI

from millrace.lifecycle.decisions import resume_events, sweep_events
from millrace.lifecycle.state import BatchState
from millrace.lifecycle.status import BatchStatus
from millrace.records import (
    BatchCreated,
    BatchExpireDue,
    BatchFillRequested,
    BatchOpened,
    BatchRedriveRequested,
    BatchValidated,
    Record,
)
from tests.batch_flow import read_lines
from tests.conftest import chat_line
from tests.deployment import Deployment, wait_until

DOC = {"id": "b", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
       "completion_window": "24h", "status": "validating", "created_at": 1000,
       "expires_at": 100_000}


def state(*events: object, doc: dict[str, object] | None = None) -> BatchState:
    s = BatchState(batch_id="b")
    s.apply(BatchCreated(batch_id="b", project="p", batch=doc or DOC, listed_at=1000.0))
    for event in events:
        s.apply(event)  # type: ignore[arg-type]
    return s


def kinds(events: list[Record]) -> list[str]:
    return [type(e).__name__ for e in events]


def test_a_validating_file_batch_is_exploded_again() -> None:
    assert kinds(resume_events(state())) == ["BatchCreated"]


def test_a_running_file_batch_is_exploded_again_with_its_total_restated() -> None:
    """On a new broker the explode runs again (its checkpoint belongs to the old one) and
    enqueues every line without a result; `validated` lets a sink that wrote the files
    already announce them again."""
    events = resume_events(state(BatchValidated(batch_id="b", total=7, model="m")))
    assert kinds(events) == ["BatchCreated", "BatchValidated"]
    validated = events[1]
    assert isinstance(validated, BatchValidated) and (validated.total, validated.model) == (
        7, "m")


def test_a_cancelled_or_expired_batch_is_filled() -> None:
    from millrace.records import BatchCancelRequested

    cancelled = state(BatchValidated(batch_id="b", total=3), BatchCancelRequested(batch_id="b"))
    events = resume_events(cancelled)
    assert kinds(events) == ["BatchCreated", "BatchValidated", "BatchFillRequested"]
    fill = events[-1]
    assert isinstance(fill, BatchFillRequested) and fill.code == "batch_cancelled"
    expired = state(BatchValidated(batch_id="b", total=3),
                    BatchExpireDue(batch_id="b", at=200_000))
    assert kinds(resume_events(expired))[-1] == "BatchFillRequested"


def test_an_open_stream_batch_is_redriven_from_its_persisted_lines() -> None:
    opened = state(BatchOpened(batch_id="b"), doc={**DOC, "input_file_id": "stream"})
    events = resume_events(opened)
    assert kinds(events) == ["BatchCreated", "BatchRedriveRequested"]
    assert isinstance(events[-1], BatchRedriveRequested)
    assert events[-1].input_file_id == "stream"


def test_a_final_batch_still_active_gets_its_finished_event_again() -> None:
    """Active after `finished` means the sink never took it (the broker lost it): its
    webhooks would never be sent. It is published again, the same final Batch."""
    from millrace.records import BatchFilesReady, BatchFinished

    done = state(BatchValidated(batch_id="b", total=1),
                 BatchFilesReady(batch_id="b", output_file_id="o", error_file_id=None, lines=1,
                                 completed=1))
    assert done.status is BatchStatus.COMPLETED and done.finished
    events = resume_events(done)
    assert kinds(events) == ["BatchFinished"]
    again = events[0]
    assert isinstance(again, BatchFinished) and again.status is BatchStatus.COMPLETED
    assert again.batch["output_file_id"] == "o" and again.batch["request_counts"]["total"] == 1


def test_the_sweep_expires_overdue_batches_and_moves_idle_ones_only() -> None:
    running = state(BatchValidated(batch_id="b", total=5))
    running.updated_at = 50_000
    assert sweep_events(running, 50_100, stuck_after_s=600) == (None, [])
    action, events = sweep_events(running, 51_000, stuck_after_s=600)
    assert action == "redrive" and kinds(events)[-1] == "BatchRedriveRequested"
    action, events = sweep_events(running, 100_000, stuck_after_s=600)
    assert action == "expire" and isinstance(events[0], BatchExpireDue)
    never_saved = BatchState.from_doc("b", DOC, "p")  # `created` never reached anyone
    assert sweep_events(never_saved, 1000 + 599, stuck_after_s=600) == (None, [])
    assert sweep_events(never_saved, 1000 + 600, stuck_after_s=600)[0] == "explode"


def test_the_sweep_finishes_a_batch_whose_created_was_never_published(
        client: OpenAI, http: httpx.Client, deployment: Deployment, model: str) -> None:
    """A gateway that died between storing a batch and publishing `created` leaves a batch
    nothing knows about; the operator's sweep finds it and it runs to the end."""
    import asyncio
    import json

    from millrace.protocol import Batch
    from millrace.storage.store import Store

    uploaded = client.files.create(file=("orphan.jsonl", "\n".join(
        chat_line(f"o{i}", model, "Say yes.", max_tokens=2) for i in range(3)).encode()),
        purpose="batch")
    now = int(time.time())
    batch = Batch(id=f"batch_orphan{now}", endpoint="/v1/chat/completions",
                  input_file_id=uploaded.id, completion_window="24h", status="validating",
                  created_at=now - 3600, expires_at=now + 3600)

    async def store_only() -> None:
        store = Store.connect(str(deployment.endpoints["redis_url"]),
                              str(deployment.endpoints["topic_prefix"]))
        await store.create_batch(batch, "default", listed_at=time.time())
        await store.close()

    asyncio.run(store_only())
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    dry = http.post("/admin/batches/sweep", headers=headers,
                    json={"stuck_after_s": 600, "dry_run": True}).json()
    mine = [s for s in dry["data"] if s["batch_id"] == batch.id]
    assert mine and mine[0]["action"] == "explode" and mine[0]["status"] == "validating"
    assert client.batches.retrieve(batch.id).status == "validating"  # dry run: nothing done
    user = http.post("/admin/batches/sweep", headers={"Authorization": "Bearer nope"})
    assert user.status_code == 401
    swept = http.post("/admin/batches/sweep", headers=headers, json={"stuck_after_s": 600})
    assert swept.status_code == 200 and swept.json()["acted"] >= 1, json.dumps(swept.json())
    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status == "completed"
                      and b, 300, "the swept batch to complete")
    assert sorted(x.custom_id for x in read_lines(client, done.output_file_id)) == [
        "o0", "o1", "o2"]
