"""Cancelling a running batch on the real engine: in-flight lines finish, the rest become
`batch_cancelled` error lines, partial output is kept, counts add up."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI

from tests.batch_flow import read_lines
from tests.conftest import chat_line, write_jsonl
from tests.deployment import wait_until


def test_cancel_mid_run(client: OpenAI, model: str, tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(64)]  # 16 run at once; the rest wait in the worker
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Write a long story about the number {i}.", max_tokens=32)
        for i, cid in enumerate(ids)])
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", 60,
               "the batch to start")

    cancelling = client.batches.cancel(batch.id)

    assert cancelling.status == "cancelling"
    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status == "cancelled"
                      and b, 300, "the batch to be cancelled")
    assert done.cancelling_at and done.cancelled_at and done.completed_at is None
    assert done.request_counts is not None
    counts = done.request_counts
    assert counts.total == 64 and counts.completed + counts.failed == 64
    assert counts.failed >= 1, "the cancel reached no worker before the batch finished"
    output = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert sorted(x.custom_id for x in output + errors) == sorted(ids)
    assert len(output) == counts.completed and len(errors) == counts.failed
    for line in errors:
        assert line.response is None and line.error is not None
        assert line.error.code == "batch_cancelled"
    for line in output:
        assert line.response is not None and line.response.status_code == 200
