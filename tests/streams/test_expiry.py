"""A batch whose completion window passes on the real engine: finished lines stay in the
output file, unfinished ones become `batch_expired` error lines, counts match the files.

Machine-independent: once the first line has a result, the worker is frozen (SIGSTOP, its
engine too) until the batch has expired and its files are sealed, so some lines finished
and some did not on any machine. The last 48 lines must generate 1,500 tokens each
(`min_tokens`), 16 at a time: no engine finishes them between the first result being
counted and the freeze. The first 16 are short, so that the first line read from every
partition of the requests topic (a batch's lines go round-robin over its shards) finishes
at once.
"""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI
from openai.types import Batch

from tests.batch_flow import read_lines
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until

SHORT = 16


def test_short_window_expires_with_partial_results(
    client: OpenAI, model: str, deployment: Deployment, tmp_path: Path
) -> None:
    ids = [f"x{i}" for i in range(64)]
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Count to {i}.", max_tokens=2) if i < SHORT else
        chat_line(cid, model, f"Count to {i}.", max_tokens=1500, min_tokens=1500)
        for i, cid in enumerate(ids)])
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    # "30s" is a millrace extension: OpenAI accepts only "24h"
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="30s")  # type: ignore[arg-type]
    assert created.expires_at == created.created_at + 30

    def counted() -> int:
        counts = client.batches.retrieve(created.id).request_counts
        return counts.completed if counts else 0

    wait_until(counted, 30, "a first line to finish inside the window")

    def sealed() -> Batch | None:
        # expired is terminal at once; its files are attached when the sink has sealed them
        current = client.batches.retrieve(created.id)
        return current if current.status != "in_progress" and current.error_file_id else None

    with deployment.frozen("worker"):
        batch = wait_until(sealed, 120, "the batch to expire and be sealed")

    assert batch.status == "expired"
    assert batch.expired_at and batch.expired_at >= created.created_at + 30
    assert batch.completed_at is None and batch.finalizing_at is None
    output = read_lines(client, batch.output_file_id)
    errors = read_lines(client, batch.error_file_id)
    assert sorted(x.custom_id for x in output + errors) == sorted(ids)
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (64, len(output), len(errors))
    assert output and errors
    assert all(e.error is not None and e.error.code == "batch_expired" for e in errors)
