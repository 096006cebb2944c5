"""Cancelling a running batch on the real engine: what finished is kept, every other line
(running in the engine or waiting) becomes a `batch_cancelled` error line, counts add up.

Machine-independent: the cancel comes once a first line has a result (an event, not a
moment), and the last 48 lines must generate 1,500 tokens each (`min_tokens`), 16 at a
time: no engine finishes them all between the first result being counted and the cancel.
The first 16 lines are short, so that the first line read from every partition of the
requests topic (a batch's lines go round-robin over its shards) finishes at once."""

from __future__ import annotations

import re
import time
from pathlib import Path

from openai import OpenAI

from tests.batch_flow import read_lines
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until

SHORT = 16


def test_cancel_mid_run(client: OpenAI, model: str, tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(64)]  # 16 run at once; the rest wait in the worker
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Write a long story about the number {i}.", max_tokens=2)
        if i < SHORT else
        chat_line(cid, model, f"Write a long story about the number {i}.", max_tokens=1500,
                  min_tokens=1500)
        for i, cid in enumerate(ids)])
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")

    def completed() -> int:
        counts = client.batches.retrieve(batch.id).request_counts
        return counts.completed if counts else 0

    try:
        wait_until(completed, 120, "a first line to finish")
    finally:  # whatever happened, the long lines do not stay in the engine
        cancelling = client.batches.cancel(batch.id)

    assert cancelling.status == "cancelling"
    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status == "cancelled"
                      and b, 300, "the batch to be cancelled")
    assert done.cancelling_at and done.cancelled_at and done.completed_at is None
    assert done.request_counts is not None
    counts = done.request_counts
    assert counts.total == 64 and counts.completed + counts.failed == 64
    assert counts.completed >= 1 and counts.failed >= 1
    output = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert sorted(x.custom_id for x in output + errors) == sorted(ids)
    assert len(output) == counts.completed and len(errors) == counts.failed
    for line in errors:
        assert line.response is None and line.error is not None
        assert line.error.code == "batch_cancelled"
    for line in output:
        assert line.response is not None and line.response.status_code == 200


def test_cancel_stops_the_engine_two_seconds_in(client: OpenAI, model: str,
                                                deployment: Deployment,
                                                tmp_path: Path) -> None:
    """40 lines, cancelled 2 s after create: the lines running in the engine are aborted
    (each becomes `batch_cancelled`; the worker says so), what had finished is kept, the
    batch is cancelled.

    Each line must generate 1,500 tokens (vLLM's `min_tokens`), 16 at a time: three waves
    of 1,500 decode steps, which no engine runs in two seconds.
    """
    worker_log = deployment.log("worker")
    logged_before = worker_log.stat().st_size
    ids = [f"stop{i}" for i in range(40)]
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Tell a tale about the number {i}.", max_tokens=1500,
                  min_tokens=1500) for i, cid in enumerate(ids)])
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).created_at + 2 <= time.time(), 10,
               "two seconds to pass")  # the moment of the cancel is the point of the test
    client.batches.cancel(batch.id)
    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status == "cancelled"
                      and b, 120, "the batch to be cancelled")

    def aborted() -> int:
        with worker_log.open("rb") as log:
            log.seek(logged_before)
            found = re.findall(rb"aborted (\d+) running requests of stopped batches",
                               log.read())
        return sum(int(n) for n in found)

    # the lines running in the engine were aborted, not left to run 1,500 steps each
    assert wait_until(aborted, 120, "the worker to abort the running lines") >= 1
    output = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert len(output) < 40
    assert sorted(x.custom_id for x in output + errors) == sorted(ids)
    assert all(e.error is not None and e.error.code == "batch_cancelled" for e in errors)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (
        len(output), len(errors))
    assert all(x.response is not None and x.response.status_code == 200 for x in output)
