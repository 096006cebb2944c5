"""Everything a user made is still there after the whole stack was killed and started again
on the same data dir: uploaded files, minted keys, webhook endpoints, an open stream batch
(which still takes lines and seals), and a partial-results cursor that means the same lines."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator

import httpx
import pytest

from millrace.client import StreamBatch
from millrace.settings import BUNDLED_CHAT_MODEL
from ops.chaos import Api, Up, batch_file, deployment
from tests.deployment import wait_until


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    # partial results every 0.2 s, so a page exists while the batch runs
    with deployment(tmp_path_factory.mktemp("restart"), "echo",
                    {"MILLRACE_SINK_PARTIAL_EVERY_S": "0.2"}) as running:
        yield running


def line(custom_id: str) -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": BUNDLED_CHAT_MODEL,
                     "messages": [{"role": "user", "content": f"echo {custom_id}"}]}}


def bootstrap(up: Up) -> str:
    return str(json.loads((up.data_dir / "endpoints.json").read_text())["kafka_bootstrap"])


def test_a_killed_stack_comes_back_with_everything_its_users_made(up: Up) -> None:
    api = Api(up)
    headers = {"Authorization": f"Bearer {up.api_key}"}
    minted = httpx.post(up.base_url.removesuffix("/v1") + "/admin/api-keys", headers=headers,
                        json={"project": "kept"}).json()["key"]
    endpoint = httpx.post(up.base_url + "/webhook_endpoints", headers=headers,
                          json={"url": "http://127.0.0.1:9/hook"}).json()
    uploaded = api.call("POST", "/files", files={"file": ("keep.jsonl", batch_file(3, "k"))},
                        data={"purpose": "batch"})
    assert uploaded is not None and uploaded.status_code == 200
    # an open stream batch with half its lines
    with StreamBatch.open(up.base_url, up.api_key, kafka=bootstrap(up)) as stream:
        for i in range(50):
            stream.send(line(f"s{i}"))
        stream.flush()
    # a running batch, and a page of its results handed out while it runs
    running = api.create(40_000, "cursor", "http://127.0.0.1:9/none")
    page = wait_until(lambda: (r := api.call("GET", f"/batches/{running}/output",
                                             params={"after": 0, "limit": 100}))
                      and r.status_code == 200 and len(r.text.splitlines()) == 100 and r,
                      120, "a first page of partial results")
    assert page.headers["x-millrace-complete"] == "false"

    up.stop(signal.SIGKILL)  # a power loss: every process at once
    up.start()

    api = Api(up)
    assert api.call("GET", "/files/" + uploaded.json()["id"]).status_code == 200  # type: ignore[union-attr]
    other = httpx.get(up.base_url + "/files", headers={"Authorization": f"Bearer {minted}"})
    assert other.status_code == 200 and other.json()["data"] == []
    hooks = httpx.get(up.base_url + "/webhook_endpoints", headers=headers).json()["data"]
    assert [h["id"] for h in hooks] == [endpoint["id"]]
    # the open stream batch still takes lines, and seals with all of them
    with StreamBatch.attach(up.base_url, up.api_key, stream.id, kafka=bootstrap(up),
                            ingest_token=stream.ingest_token) as more:
        for i in range(50, 100):
            more.send(line(f"s{i}"))
        more.seal(total=100)
    closed = wait_until(lambda: (b := api.batch(stream.id)) and b["status"] == "completed"
                        and b, 300, "the stream batch to complete")
    assert closed["request_counts"] == {"total": 100, "completed": 100, "failed": 0}
    assert sorted(x["custom_id"] for x in api.lines(closed["output_file_id"])) == sorted(
        f"s{i}" for i in range(100))
    finished = wait_until(lambda: (b := api.batch(running)) and b["status"] == "completed"
                          and b, 300, "the running batch to complete")
    again = api.call("GET", f"/batches/{running}/output", params={"after": 0, "limit": 100})
    assert again is not None and again.text == page.text  # the cursor means the same lines
    final = api.lines(finished["output_file_id"])[:100]
    assert [json.dumps(x, sort_keys=True) for x in final] == [
        json.dumps(json.loads(x), sort_keys=True) for x in page.text.splitlines()]
