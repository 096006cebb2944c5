"""A batch whose completion window passes on the real engine: finished lines stay in the
output file, unfinished ones become `batch_expired` error lines, counts match the files."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI
from openai.types import Batch

from tests.batch_flow import read_lines
from tests.conftest import chat_line, write_jsonl
from tests.deployment import wait_until


def test_short_window_expires_with_partial_results(
    client: OpenAI, model: str, tmp_path: Path
) -> None:
    ids = [f"x{i}" for i in range(320)]  # ~10 micro-batches: far more than 6 s of work
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Count to {i}.", max_tokens=8) for i, cid in enumerate(ids)])
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    # "6s" is a millrace extension: OpenAI accepts only "24h"
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="6s")  # type: ignore[arg-type]
    assert created.expires_at == created.created_at + 6

    def sealed() -> Batch | None:
        # expired is terminal at once; its files are attached when the sink has sealed them
        current = client.batches.retrieve(created.id)
        return current if current.status != "in_progress" and current.error_file_id else None

    batch = wait_until(sealed, 300, "the batch to expire and be sealed")

    assert batch.status == "expired"
    assert batch.expired_at and batch.expired_at >= created.created_at + 6
    assert batch.completed_at is None and batch.finalizing_at is None
    output = read_lines(client, batch.output_file_id)
    errors = read_lines(client, batch.error_file_id)
    assert sorted(x.custom_id for x in output + errors) == sorted(ids)
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (320, len(output), len(errors))
    assert output, "nothing finished inside the window"
    assert all(x.response is not None and x.response.status_code == 200 for x in output)
    assert errors and all(
        x.response is None and x.error is not None and x.error.code == "batch_expired"
        for x in errors)
