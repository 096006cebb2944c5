"""Inline batches (`POST /v1/batches` with `requests`) and `DELETE /v1/batches/{id}`, on a
deployment of their own (echo engine) whose input-file limits are small enough to pass:
50 lines, 20,000 bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.batch_flow import read_lines, wait_done
from tests.deployment import Deployment, start

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
MAX_LINES, MAX_BYTES = 50, 20_000


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = start(tmp_path_factory.mktemp("inline"), engine="echo", timeout=180, extra_env={
        "MILLRACE_BATCH_MAX_LINES": str(MAX_LINES), "MILLRACE_BATCH_MAX_BYTES": str(MAX_BYTES)})
    yield dep
    assert dep.stop() == 0, "".join(dep.stderr_lines[-50:])


@pytest.fixture
def api(small: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {small.api_key}"}) as http:
        yield http


def request(custom_id: str, content: str = "Hi.") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}]}}


def inline(api: httpx.Client, requests: list[Any], **more: Any) -> httpx.Response:
    return api.post("/batches", json={"endpoint": CHAT, "completion_window": "24h",
                                      "requests": requests, **more})


def test_an_inline_batch_runs_as_a_batch_of_its_lines(small: Deployment,
                                                      api: httpx.Client) -> None:
    client = small.sdk()
    created = inline(api, [request(f"r{i}", f"line {i}") for i in range(3)])
    assert created.status_code == 200, created.text
    batch = wait_done(client, created.json()["id"], 120)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 3
    assert sorted(line.custom_id for line in read_lines(client, batch.output_file_id)) == [
        "r0", "r1", "r2"]
    # its input file is the lines, one a line, in their order
    source = client.files.retrieve(batch.input_file_id)
    assert (source.purpose, source.filename) == ("batch", "inline_requests.jsonl")
    kept = client.files.content(batch.input_file_id).text.splitlines()
    assert [json.loads(line) for line in kept] == [request(f"r{i}", f"line {i}")
                                                    for i in range(3)]


def test_inline_lines_are_validated_exactly_as_a_file_s(small: Deployment,
                                                         api: httpx.Client,
                                                         tmp_path: Path) -> None:
    client = small.sdk()
    lines: list[Any] = [request("a"), {"method": "POST", "url": CHAT, "body": {}},
                        request("a")]
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    as_file = client.batches.create(
        input_file_id=client.files.create(file=(path.name, path.read_bytes()), purpose="batch").id,
        endpoint=CHAT, completion_window="24h")
    created = inline(api, lines)
    assert created.status_code == 200, created.text
    from_file, from_lines = (wait_done(client, b, 120) for b in (as_file.id,
                                                                 created.json()["id"]))
    assert from_file.status == from_lines.status == "failed"
    assert from_file.errors is not None and from_lines.errors is not None
    assert from_lines.errors.model_dump() == from_file.errors.model_dump()


@pytest.mark.parametrize(("requests", "more", "status", "code"), [
    ([request(f"r{i}") for i in range(MAX_LINES + 1)], {}, 400, "too_many_requests"),
    ([request(f"r{i}", "x" * 1000) for i in range(25)], {}, 413, "file_too_large"),
    ([], {}, 400, "invalid_value"),
    ([request("r")], {"input_file_id": "file-abc"}, 400, "invalid_value"),
    ([request("r")], {"input": "stream"}, 400, "invalid_value"),
    (["not an object"], {}, 400, None),
])
def test_inline_refusals_name_requests_and_store_nothing(
        small: Deployment, api: httpx.Client, requests: list[Any], more: dict[str, Any],
        status: int, code: str | None) -> None:
    files_before = api.get("/files").json()["data"]
    refused = inline(api, requests, **more)
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert error["param"].startswith("requests"), error
    if code is not None:
        assert error["code"] == code
    assert api.get("/files").json()["data"] == files_before


def test_a_batch_that_ended_is_deleted_with_its_files(small: Deployment, api: httpx.Client,
                                                      tmp_path: Path) -> None:
    client = small.sdk()
    path = tmp_path / "shared.jsonl"
    path.write_text("".join(json.dumps(request(f"s{i}")) + "\n" for i in range(2)))
    shared = client.files.create(file=(path.name, path.read_bytes()), purpose="batch").id
    first, second = (client.batches.create(input_file_id=shared, endpoint=CHAT,
                                           completion_window="24h") for _ in range(2))
    done = [wait_done(client, b.id, 120) for b in (first, second)]
    assert [b.status for b in done] == ["completed", "completed"]

    gone = api.delete(f"/batches/{first.id}")
    assert gone.status_code == 200, gone.text
    assert gone.json()["object"] == "batch.deleted" and gone.json()["deleted"] is True
    # its output went; the input file stays while the second batch uses it
    assert gone.json()["deleted_files"] == [done[0].output_file_id]
    assert api.get(f"/batches/{first.id}").status_code == 404
    assert api.get(f"/files/{done[0].output_file_id}/content").status_code == 404
    assert api.get(f"/files/{shared}").status_code == 200
    assert first.id not in [b.id for b in client.batches.list(limit=100)]
    assert api.delete(f"/batches/{first.id}").status_code == 404

    last = api.delete(f"/batches/{second.id}")
    assert set(last.json()["deleted_files"]) == {done[1].output_file_id, shared}
    assert api.get(f"/files/{shared}").status_code == 404

    # a rebuild of the read model from the topics does not bring either back
    subprocess.run([sys.executable, "-m", "ops", "rebuild", "--data-dir", str(small.data_dir)],
                   capture_output=True, text=True, check=True, timeout=120)
    for batch in (first, second):
        assert api.get(f"/batches/{batch.id}").status_code == 404
    assert api.get(f"/files/{shared}").status_code == 404


def test_a_batch_still_running_is_not_deleted(api: httpx.Client) -> None:
    stream = api.post("/batches", json={"input": "stream", "endpoint": CHAT,
                                        "completion_window": "24h"}).json()["id"]
    refused = api.delete(f"/batches/{stream}")
    assert refused.status_code == 409
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == (
        "batch_not_finished", "batch_id")
    assert api.get(f"/batches/{stream}").status_code == 200
    assert api.delete("/batches/batch_nope").status_code == 404
