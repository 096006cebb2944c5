"""SIGKILL of the aggregator, and separately of the sink, in the middle of a batch on the real
engine: `millrace up` restarts the process, and the batch still completes with every line
exactly once in its files and exact `request_counts`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from openai import OpenAI

from tests.batch_flow import create_batch, read_lines, wait_done
from tests.conftest import chat_line, write_jsonl
from tests.deployment import Deployment, wait_until


@pytest.mark.parametrize(("service", "kill_after"), [("aggregator", 12), ("sink", 40)])
def test_a_killed_service_loses_and_repeats_nothing(
        client: OpenAI, model: str, deployment: Deployment, tmp_path: Path,
        service: str, kill_after: int) -> None:
    ids = [f"{service}{i}" for i in range(96)]
    batch = create_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Name a fruit and the number {i}.", max_tokens=8)
        for i, cid in enumerate(ids)]))
    wait_until(lambda: (c := client.batches.retrieve(batch.id).request_counts) is not None
               and c.completed >= kill_after, 120, "the batch to be under way")
    info = deployment.ready_info(service)
    assert info is not None

    os.kill(int(str(info["pid"])), signal.SIGKILL)

    wait_until(lambda: (i := deployment.ready_info(service)) is not None
               and i["pid"] != info["pid"], 120, f"the {service} to restart")
    done = wait_done(client, batch.id)
    assert done.status == "completed", done.errors
    output = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert sorted(x.custom_id for x in output + errors) == sorted(ids)
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (96, len(output), len(errors))
    assert len(output) == 96  # every line ran (none was dropped as an error)
