"""`POST /v1/batches/{id}/retry` on the real engine: a new batch of exactly the failed lines
(cancelled ones and ones the engine refused), their request lines unchanged, pointing back
with `metadata.retry_of`; the original stays as it was."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.batch_flow import create_batch, read_lines, wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until


def test_retry_runs_exactly_the_failed_lines_again(client: OpenAI, model: str,
                                                   deployment: Deployment, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    """Four lines that must generate 1,500 tokens each (vLLM's `min_tokens`) are still
    running at the cancel on any machine, so they are surely among the failed lines; short
    lines may have finished or not; the `refused` line is refused by vLLM every time."""
    lines = [chat_line(f"long{i}", model, f"Tell a tale about {i}.", max_tokens=1500,
                       min_tokens=1500) for i in range(4)]
    lines += [chat_line(f"r{i}", model, f"Count to {i}.", max_tokens=8) for i in range(8)]
    lines.append(chat_line("refused", model, "x", temperature=-1))
    by_id = {json.loads(x)["custom_id"]: x for x in lines}
    batch = create_batch(client, write_jsonl(tmp_path / "in.jsonl", lines))
    http = httpx.Client(base_url=deployment.base_url, timeout=30,
                        headers={"Authorization": f"Bearer {deployment.api_key}"})
    request.addfinalizer(http.close)  # closed even when an assertion fails
    early = http.post(f"/batches/{batch.id}/retry")
    assert early.status_code == 409 and early.json()["error"]["param"] == "batch_id"
    wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", 60,
               "the batch to start")
    client.batches.cancel(batch.id)
    original = wait_done(client, batch.id)
    assert original.status == "cancelled"
    failed = {x.custom_id for x in read_lines(client, original.error_file_id)}
    assert {"refused", "long0", "long1", "long2", "long3"} <= failed

    unknown = http.post(f"/batches/{batch.id}/retry", json={"custom_ids": ["refused", "nope"]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "custom_ids"
    extra = http.post(f"/batches/{batch.id}/retry", json={"webhook": "x"})
    assert extra.status_code == 400 and extra.json()["error"]["code"] == "unknown_parameter"

    # every failed line: the same request lines, in a new batch pointing back
    answer = http.post(f"/batches/{batch.id}/retry")
    assert answer.status_code == 200, answer.text
    again = answer.json()
    assert again["id"] != batch.id and again["metadata"] == {"retry_of": batch.id}
    assert again["endpoint"] == "/v1/chat/completions" and again["completion_window"] == "24h"
    sent = client.files.content(again["input_file_id"]).text.splitlines()
    assert sorted(sent) == sorted(by_id[c] for c in failed)
    client.batches.cancel(again["id"])  # its long lines would take minutes on a CPU
    assert wait_done(client, again["id"]).request_counts.total == len(failed)  # type: ignore[union-attr]

    # the short ones, chosen by custom_id, run for real
    short = sorted(failed - {"long0", "long1", "long2", "long3"})
    chosen = http.post(f"/batches/{batch.id}/retry", json={"custom_ids": short}).json()
    retried = wait_done(client, chosen["id"])
    assert retried.status == "completed"
    assert retried.request_counts is not None and retried.request_counts.total == len(short)
    output = read_lines(client, retried.output_file_id)
    errors = read_lines(client, retried.error_file_id)
    assert sorted(x.custom_id for x in output) == sorted(set(short) - {"refused"})
    assert all(x.response and x.response.status_code == 200 for x in output)
    assert [(x.custom_id, x.response.body["error"]["param"]) for x in errors
            if x.response] == [("refused", "temperature")]

    assert client.batches.retrieve(batch.id).model_dump() == original.model_dump()
    # a line that succeeded is not a failed line
    if output:
        done = http.post(f"/batches/{retried.id}/retry", json={"custom_ids": [output[0].custom_id]})
        assert done.status_code == 400 and done.json()["error"]["param"] == "custom_ids"
    http.close()
