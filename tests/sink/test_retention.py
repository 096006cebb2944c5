"""Retention on a real deployment (echo engine) whose input files are kept 4 s and whose
output files are kept until deleted (retention off), with a janitor that looks every
second: an expired file is a 404 at once and gone from the file store soon after; a file
under retention off stays."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.batch_flow import wait_done
from tests.deployment import Deployment, start, wait_until

KEPT_S = 4


@pytest.fixture(scope="module")
def retaining(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = start(tmp_path_factory.mktemp("retention"), engine="echo", timeout=180, extra_env={
        "MILLRACE_BATCH_FILE_RETENTION_S": str(KEPT_S), "MILLRACE_OUTPUT_RETENTION_S": "0",
        "MILLRACE_JANITOR_EVERY_S": "1"})
    yield dep
    assert dep.stop() == 0, "".join(dep.stderr_lines[-50:])


def test_an_expired_input_file_goes_and_a_kept_output_stays(retaining: Deployment) -> None:
    client = retaining.sdk()
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "smollm2-135m-instruct",
                     "messages": [{"role": "user", "content": "Hi."}]}}
    source = client.files.create(file=("in.jsonl", json.dumps(line).encode() + b"\n"),
                                 purpose="batch")
    assert source.expires_at == source.created_at + KEPT_S
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_done(client, batch.id, 120)
    assert done.status == "completed" and done.output_file_id is not None
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at is None  # OUTPUT_RETENTION_S=0: kept until deleted
    stored = Path(retaining.data_dir) / "files" / "files" / source.id
    assert stored.exists()

    def gone() -> bool:
        return source.id not in [f.id for f in client.files.list()] and not stored.exists()

    wait_until(gone, 60, "the janitor to delete the expired input file", every=0.5)
    http = httpx.Client(base_url=retaining.base_url, timeout=30,
                        headers={"Authorization": f"Bearer {retaining.api_key}"})
    download = http.get(f"/files/{source.id}/content")
    assert download.status_code == 404
    assert download.json()["error"]["type"] == "invalid_request_error"
    # the output file, under retention off, is still there to download
    assert http.get(f"/files/{done.output_file_id}/content").status_code == 200
    http.close()
