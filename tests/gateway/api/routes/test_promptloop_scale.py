"""PromptLoop on the echo engine (the pipeline, not inference): a 50,000-row job launched as
one JSONL upload and its results streamed back row by row; one row answered at once."""

from __future__ import annotations

import json
import os
import signal

import httpx

from tests.deployment import Deployment, wait_until
from tests.receiver import receiving

ROWS = 50_000


def test_fifty_thousand_rows_stream_back_as_jsonl(echo: Deployment) -> None:
    headers = {"x-api-key": echo.api_key}
    with httpx.Client(base_url=echo.base_url.removesuffix("/v1"), timeout=120) as http:
        task = http.post("/v0/tasks", headers=headers, json={
            "name": "echo", "instructions": "Repeat.", "inputs": [{"name": "text"}],
            "outputs": [{"name": "text"}]}).json()
        rows = b"".join(json.dumps({"data_uuid": f"r{i}", "inputs": [f"row {i}"]}).encode()
                        + b"\n" for i in range(ROWS))
        with receiving() as receiver:
            launched = http.post(f"/v0/launch-job?task_id={task['id']}&webhook_url="
                                 f"{receiver.url}", headers=headers, content=rows)
            hook = json.loads(receiver.wait_for(1, 300)[0].body)
        assert launched.status_code == 200, launched.text
        job_id = launched.json()["job_id"]
        job = wait_until(lambda: (j := http.get(f"/v0/job-status/{job_id}", headers=headers)
                                  .json())["status"] != "in_progress" and j, 300, "the job",
                         every=0.5)
        assert job["progress"]["total"] == ROWS
        # past promptloop_webhook_max_rows the webhook says where the rows are instead
        assert (hook["job_id"], hook["data"], hook["rows"]) == (job_id, None, ROWS)
        assert hook["results_url"] == f"/v0/batch/{job_id}/results?output_type=stream"

        seen: set[str] = set()
        with http.stream("GET", f"/v0/batch/{job_id}/results?output_type=stream",
                         headers=headers) as response:
            assert response.status_code == 200
            assert "content-length" not in response.headers  # written as it is read
            for line in response.iter_lines():
                row = json.loads(line)
                assert row["data_uuid"] not in seen
                seen.add(row["data_uuid"])
                # the echo engine answers the prompt, not the fields' JSON: each row is
                # that row's own error, never lost
                assert row["error"]["code"] == "invalid_output"
        assert len(seen) == ROWS


def test_one_row_is_answered_without_waiting_for_the_batch_to_be_final(
        echo: Deployment) -> None:
    """The sink hands a waited-on line to the gateway as soon as it is spooled: with the
    aggregator (which makes batches final) stopped, a row is still answered."""
    headers = {"x-api-key": echo.api_key}
    aggregator = int(str((echo.ready_info("aggregator") or {})["pid"]))
    with httpx.Client(base_url=echo.base_url.removesuffix("/v1"), timeout=60) as http:
        task = http.post("/v0/tasks", headers=headers, json={
            "name": "echo", "instructions": "Repeat.", "inputs": [{"name": "text"}],
            "outputs": [{"name": "text"}]}).json()
        os.kill(aggregator, signal.SIGSTOP)
        try:
            answered = http.post(f"/v0/tasks/{task['id']}", headers=headers,
                                 json={"inputs": ["hello"], "data_uuid": "h"})
            jobs = http.get("/v0/batches", headers=headers).json()
        finally:
            os.kill(aggregator, signal.SIGCONT)
    # the echo engine's answer is the prompt, not JSON: the row's own error, answered
    assert answered.status_code == 400, answered.text
    assert answered.json()["error"]["code"] == "invalid_output"
    one = next(j for j in jobs if j["name"] == "run")
    assert one["millrace_status"] != "completed"  # the batch was not final when answered
