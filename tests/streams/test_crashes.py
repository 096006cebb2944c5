"""SIGKILL of the aggregator, and separately of the sink, at a random point of a 500-line batch
on the real engine: `millrace up` restarts the process, and the batch still completes with
every line exactly once in its files and exact `request_counts`."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from openai import OpenAI

from tests.batch_flow import create_batch, read_lines, wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until

LINES = 500


@pytest.mark.parametrize("service", ["aggregator", "sink"])
def test_a_killed_service_loses_and_repeats_nothing(
        client: OpenAI, model: str, deployment: Deployment, tmp_path: Path,
        service: str) -> None:
    kill_after = random.randint(1, LINES - 100)  # counted lines when the kill comes
    ids = [f"{service}{i}" for i in range(LINES)]
    batch = create_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Say {i}.", max_tokens=2) for i, cid in enumerate(ids)]))
    wait_until(lambda: (c := client.batches.retrieve(batch.id).request_counts) is not None
               and c.completed >= kill_after, 300, f"{kill_after} lines to be counted")
    info = deployment.ready_info(service)
    assert info is not None

    os.kill(int(str(info["pid"])), signal.SIGKILL)

    wait_until(lambda: (i := deployment.ready_info(service)) is not None
               and i["pid"] != info["pid"], 120, f"the {service} to restart")
    done = wait_done(client, batch.id, 600)
    assert done.status == "completed", (kill_after, done.errors)
    output = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert sorted(x.custom_id for x in output + errors) == sorted(ids), kill_after
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (LINES, len(output), len(errors)), kill_after
    assert len(output) == LINES, kill_after  # every line ran (none dropped as an error)
