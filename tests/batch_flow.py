"""Driving a batch through the unmodified OpenAI SDK and reading its files back."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI
from openai.types import Batch

from millrace.lifecycle.status import BatchStatus
from millrace.protocol import OutputLine
from tests.deployment import wait_until

ORDER = ["validating", "in_progress", "finalizing", "completed"]
TERMINAL = {s.value for s in BatchStatus if s.terminal}


def create_batch(client: OpenAI, path: Path, endpoint: str = "/v1/chat/completions") -> Batch:
    """Upload a JSONL file and create a batch over it."""
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                 completion_window="24h")


def wait_done(client: OpenAI, batch_id: str, timeout: float = 300) -> Batch:
    return wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in TERMINAL and b,
                      timeout, f"batch {batch_id} to finish")


def run_batch(client: OpenAI, path: Path, endpoint: str = "/v1/chat/completions",
              timeout: float = 300) -> tuple[Batch, list[str]]:
    """Upload, create, poll to a terminal status; returns the batch and statuses seen."""
    batch = create_batch(client, path, endpoint)
    seen = [batch.status]

    def terminal() -> Batch | None:
        current = client.batches.retrieve(batch.id)
        if current.status != seen[-1]:
            seen.append(current.status)
        return current if BatchStatus(current.status).terminal else None

    return wait_until(terminal, timeout, f"batch {batch.id} to finish"), seen


def read_lines(client: OpenAI, file_id: str | None) -> list[OutputLine]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [OutputLine.model_validate_json(line) for line in text.splitlines()]
