"""Nothing stuck, nothing lost: a running batch survives any one fault.

Each case runs a batch on its own embedded deployment (echo engine: the faults are in the
pipeline, not the model), does the fault at a random moment of the batch, and checks what a
user would (`ops.chaos.Round.ok`): a final status, every line exactly once across
the output and error files, counts and usage equal to the files, the webhook delivered.
The two whole-stack cases also run on the real engine (`test_real_engine.py`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from ops.chaos import FAULTS, Api, Receiver, Up, batch_file, deployment, run_round
from tests.deployment import wait_until
from tests.website import serving

LINES = 5000


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with deployment(tmp_path_factory.mktemp("chaos"), "echo", {}) as running:
        yield running


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


@pytest.fixture(scope="module")
def span(up: Up, receiver: Receiver) -> float:
    """How long a batch takes on this machine: faults land anywhere within it."""
    api = Api(up)
    started = time.monotonic()
    batch_id = api.create(LINES, "warmup", receiver.url)
    assert api.until(lambda: (b := api.batch(batch_id)) and b["status"] == "completed", 300)
    return max(time.monotonic() - started, 0.5)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_batch_finishes_exactly_whatever_dies(up: Up, receiver: Receiver, span: float,
                                                fault: str) -> None:
    at = random.uniform(0, span)
    result = run_round(up, receiver, FAULTS.index(fault) + 1, fault, LINES, at)
    assert result.ok, result
    assert result.recovered_s > 0


def test_a_gateway_killed_while_it_explodes_a_large_file_is_taken_over(
        up: Up, receiver: Receiver) -> None:
    """The explode of a 50,000-line file is a job on batch-events: the restarted gateway
    takes it up again, skips what it had enqueued, and no line runs twice into the files."""
    result = run_round(up, receiver, 100, "kill-gateway", 50_000, 0.3)
    assert result.ok, result


def traffic(api: Api, seconds: float) -> list[tuple[int | None, float, dict[str, object]]]:
    """Create and read batches for `seconds`: (status, seconds it took, body) per call."""
    seen: list[tuple[int | None, float, dict[str, object]]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for method, path, kwargs in (
                ("GET", "/batches", {}),
                ("POST", "/batches", {"json": {"input_file_id": "file-nope",
                                               "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"}}),
                ("POST", "/files", {"files": {"file": ("t.jsonl", b"{}\n")},
                                    "data": {"purpose": "batch"}})):
            started = time.monotonic()
            try:
                r: httpx.Response | None = httpx.request(
                    method, api.up.base_url + path, timeout=15, **kwargs,  # type: ignore[arg-type]
                    headers={"Authorization": f"Bearer {api.up.api_key}"})
            except httpx.HTTPError:
                r = None
            took = time.monotonic() - started
            seen.append((r.status_code if r is not None else None, took,
                         r.json() if r is not None and r.content else {}))
    return seen


@pytest.mark.parametrize("part", ["broker", "redis"])
def test_an_outage_gets_503s_not_hangs_and_loses_nothing(up: Up, receiver: Receiver,
                                                         part: str) -> None:
    api = Api(up)
    before = api.create(200, f"before-{part}", receiver.url)
    pid = up.pid(part)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # unreachable for 10 s: connections hang, nothing answers
    try:
        seen = traffic(api, 10)
    finally:
        os.kill(pid, signal.SIGCONT)
    answered = [(status, took, body) for status, took, body in seen]
    assert answered and all(status is not None for status, _, _ in answered)
    for status, took, body in answered:
        assert status in (200, 400, 404, 503), (status, body)
        assert took < 8, (status, took)  # within a client's patience, never a hang
        if status == 503:
            error = body["error"]
            assert isinstance(error, dict) and error["code"] == "service_unavailable"
            assert error["type"] == "server_error" and error["message"]
    assert any(status == 503 for status, _, _ in answered)
    # when the part is back, the services carry on by themselves: nothing accepted is lost
    assert wait_until(lambda: (b := api.batch(before)) and b["status"] == "completed", 120,
                      "the batch accepted before the outage to complete")
    after = api.create(100, f"after-{part}", receiver.url)
    assert wait_until(lambda: (b := api.batch(after)) and b["status"] == "completed", 120,
                      "a batch created after the outage to complete")


def test_promptloop_and_plai_batches_finish_exactly_through_a_whole_stack_sigkill(
        up: Up, receiver: Receiver) -> None:
    """The fetches of issue 13 happen inside the explode: a PLai input file and a PromptLoop
    job's link pages are in flight when the whole `millrace up` is SIGKILLed and started
    again. Both batches still finish with every line exactly once."""
    rows = 3000
    plai_lines = batch_file(500, "plai")
    pages = {"/a": b"<p>A kettle.</p>", "/held": b"<p>A teapot.</p>", "/plai.jsonl": plai_lines}
    with serving(pages, held=frozenset({"/held", "/plai.jsonl"})) as site:
        http = httpx.Client(base_url=up.base_url.removesuffix("/v1"), timeout=30,
                            headers={"x-api-key": up.api_key})
        task = http.post("/v0/tasks", json={
            "name": "links", "instructions": "Summarise.", "inputs": [{"name": "page",
                                                                       "type": "link"}],
            "outputs": [{"name": "summary"}]}).json()
        urls = [f"{site.url}/a", f"{site.url}/held", f"{site.url}/gone"]
        data = b"".join(json.dumps({"data_uuid": f"u{i}", "inputs": [urls[i % 3]]}).encode()
                        + b"\n" for i in range(rows))
        job_id = http.post(f"/v0/launch-job?task_id={task['id']}", content=data).json()[
            "job_id"]
        plai = http.post("/plai/batches", json={
            "name": "p", "type": "COMPLETIONS", "input_file_url": f"{site.url}/plai.jsonl",
            "callback_url": receiver.url}).json()
        assert site.held_hit.wait(120), "no fetch reached the site"

        up.stop(signal.SIGKILL)  # with fetches in flight
        up.start()
        site.release.set()
        http.close()
        http = httpx.Client(base_url=up.base_url.removesuffix("/v1"), timeout=30,
                            headers={"x-api-key": up.api_key})

        job = wait_until(lambda: (j := http.get(f"/v0/job-status/{job_id}").json())[
            "status"] != "in_progress" and j, 300, "the PromptLoop job", every=0.5)
        done = wait_until(lambda: (b := http.get(f"/plai/batches/{plai['id']}").json())[
            "status"] in ("completed", "failed") and b, 300, "the PLai batch", every=0.5)

    # the batch's own counts: a fetched row's request completed, a 404 row failed
    assert job["progress"] == {"total": rows, "completed": 2000, "failed": 1000}
    results = http.get(f"/v0/batch/{job_id}/results").json()
    uuids = [r["data_uuid"] for r in results]
    assert len(uuids) == len(set(uuids)) == rows
    codes = {r["data_uuid"]: r["error"]["code"] for r in results}
    assert {codes[f"u{i}"] for i in range(2, rows, 3)} == {"fetch_failed"}  # the 404 page
    fetched = [f"u{i}" for i in range(rows) if i % 3 != 2]  # /a, and /held after the restart
    assert {codes[u] for u in fetched} == {"invalid_output"}  # echo answers no JSON

    assert done["status"] == "completed", done["error_details"]
    assert done["request_counts"]["total"] == 500
    urls_of = http.get(f"/plai/batches/{plai['id']}/download").json()
    http.close()
    ids = [json.loads(x)["custom_id"] for x in httpx.get(
        urls_of["output_file_url"]).text.splitlines()]
    assert sorted(ids) == sorted(f"plai-{i}" for i in range(500))
