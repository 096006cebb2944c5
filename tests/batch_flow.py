"""Driving a batch through the unmodified OpenAI SDK and reading its files back."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI
from openai.types import Batch

from millrace.protocol import OutputLine
from millrace.status import BatchStatus
from tests.deployment import wait_until

ORDER = ["validating", "in_progress", "finalizing", "completed"]


def run_batch(client: OpenAI, path: Path, endpoint: str = "/v1/chat/completions",
              timeout: float = 300) -> tuple[Batch, list[str]]:
    """Upload, create, poll to a terminal status; returns the batch and statuses seen."""
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                  completion_window="24h")
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
