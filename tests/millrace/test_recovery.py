"""Redis wiped while a batch runs, then `millrace rebuild`: every batch, file, key and webhook
endpoint comes back from Kafka exactly as it was, and the running batch completes exactly.

Runs on its own deployment (echo engine): wiping the session deployment's Redis would
pull the floor from under the other tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import redis
from openai import OpenAI

from tests.batch_flow import read_lines, run_batch, wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until

LINES = 20_000


Objects = list[dict[str, Any]]


def snapshot(client: OpenAI, http: httpx.Client, key: str) -> tuple[Objects, Objects, Objects]:
    """What a user can read back that Redis holds: batches, files, webhook endpoints."""
    endpoints = http.get("/v1/webhook_endpoints", headers={"Authorization": f"Bearer {key}"})
    return ([b.model_dump() for b in client.batches.list(limit=100)],
            [f.model_dump() for f in client.files.list()], endpoints.json()["data"])


def test_a_wiped_read_model_is_rebuilt_from_the_topics(echo: Deployment,
                                                       tmp_path: Path) -> None:
    client = OpenAI(base_url=echo.base_url, api_key=echo.api_key, max_retries=0)
    http = httpx.Client(base_url=echo.base_url.removesuffix("/v1"), timeout=30)
    headers = {"Authorization": f"Bearer {echo.api_key}"}
    model = "smollm2-135m-instruct"
    finished, _ = run_batch(client, write_jsonl(tmp_path / "small.jsonl", [
        chat_line(f"s{i}", model, f"line {i}") for i in range(50)]))
    assert finished.status == "completed"
    http.post("/v1/webhook_endpoints", headers=headers,
              json={"url": "http://127.0.0.1:9/hook", "events": ["batch.expired"]})
    minted = http.post("/admin/api-keys", headers=headers, json={"project": "other"}).json()
    big = write_jsonl(tmp_path / "big.jsonl", [chat_line(f"b{i}", model, f"line {i}")
                                                 for i in range(LINES)])
    running = client.batches.create(
        input_file_id=client.files.create(file=(big.name, big.read_bytes()), purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": "v"})
    wait_until(lambda: (c := client.batches.retrieve(running.id).request_counts) is not None
               and c.completed >= 1000, 120, "the big batch to be under way")
    worker = int(str((echo.ready_info("worker") or {})["pid"]))
    os.kill(worker, signal.SIGSTOP)  # the batch holds still, mid-run, while Redis goes
    wait_until(lambda: client.batches.retrieve(running.id).status == "in_progress", 120,
               "every line of the big batch to be enqueued")
    batches, files, endpoints = snapshot(client, http, echo.api_key)
    assert batches[0]["id"] == running.id and batches[0]["status"] == "in_progress"
    assert 1000 <= batches[0]["request_counts"]["completed"] < LINES

    redis.Redis.from_url(str(echo.endpoints["redis_url"])).flushall()

    def refused() -> bool:  # even the keys are gone (a gateway remembers one for 2 s)
        try:
            client.batches.retrieve(finished.id)
        except openai.AuthenticationError:
            return True
        except openai.NotFoundError:
            return False
        return False

    wait_until(refused, 30, "the wiped keys to be refused")
    out = subprocess.run([sys.executable, "-m", "ops", "rebuild",
                          "--data-dir", str(echo.data_dir)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    report = json.loads(out)
    assert report["api_keys"] == 2 and report["webhook_endpoints"] == 1
    assert report["files"] >= 3
    # both batches came back from the batch-state topic (or the running one was already put
    # back by the aggregator itself, if the sink's last counts reached it after the wipe)
    assert report["batches"] + report["batches_kept"] == 2 and report["batches"] >= 1

    batches_now, files_now, endpoints_now = snapshot(client, http, echo.api_key)
    assert endpoints_now == endpoints and len(endpoints) == 1
    # every file as it was, in the same order (the running batch may have added its own)
    assert [f for f in files_now if f["id"] in {g["id"] for g in files}] == files
    assert {f["purpose"] for f in files_now if f not in files} <= {"batch_output"}
    # the same batches in the same order, the finished one exactly as it was
    assert [b["id"] for b in batches_now] == [b["id"] for b in batches]
    assert batches_now[-1] == batches[-1] and batches[-1]["id"] == finished.id
    other = OpenAI(base_url=echo.base_url, api_key=minted["key"], max_retries=0)
    assert other.files.list().data == []  # a minted project key works again

    # the batch that was running when Redis went completes with exact counts
    os.kill(worker, signal.SIGCONT)
    done = wait_done(client, running.id, 300)
    assert done.status == "completed" and done.metadata == {"k": "v"}
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (LINES, LINES)
    output = read_lines(client, done.output_file_id)
    assert sorted(x.custom_id for x in output) == sorted(f"b{i}" for i in range(LINES))
    assert done.created_at == running.created_at and done.input_file_id == running.input_file_id
    http.close()
