"""The gpu_consumer on the real engine: continuous admission, fair share, a poison line, two
workers splitting one batch, graceful hand-over, and a SIGKILL mid-batch.

The session deployment runs 16 requests in flight per model, so batches of more lines keep
a backlog in the worker (as on a busy GPU host).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from millrace.client import iter_results
from millrace.records import ResponseRecord
from tests.batch_flow import create_batch, read_lines, wait_done
from tests.conftest import VLLM_MODEL_ARGS, chat_line, write_jsonl
from tests.deployment import Deployment, extra_worker, wait_until

IN_FLIGHT = 16


def results(deployment: Deployment, batch_id: str, expected: int) -> list[ResponseRecord]:
    found = list(iter_results(str(deployment.endpoints["kafka_bootstrap"]), batch_id,
                              topic_prefix=str(deployment.endpoints["topic_prefix"]),
                              expected=expected, timeout=60))
    assert len(found) == expected
    return found


def assert_exactly_once(client: OpenAI, batch_id: str, ids: list[str]) -> None:
    done = wait_done(client, batch_id)
    assert done.status == "completed", done.errors
    output = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert sorted(x.custom_id for x in output + errors) == sorted(ids)
    assert done.request_counts is not None
    assert done.request_counts.completed == len(output)
    assert done.request_counts.failed == len(errors)


def test_new_lines_join_while_others_run(client: OpenAI, model: str, deployment: Deployment,
                                         tmp_path: Path) -> None:
    # 40 lines > 16 in flight; short and long generations mixed
    ids = [f"ca{i}" for i in range(40)]
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Count from {i} upwards.", max_tokens=2 if i % 2 else 40)
        for i, cid in enumerate(ids)])
    batch = create_batch(client, path)
    assert_exactly_once(client, batch.id, ids)
    records = results(deployment, batch.id, len(ids))
    spans = sorted((r.finished_at - r.engine_ms / 1000, r.finished_at)
                   for r in records if r.engine_ms is not None)
    assert len(spans) == len(ids)
    first_finish = min(end for _, end in spans)
    # continuous admission: some line started after the first finished, while a line that
    # started before it was still running (a "wait for the slowest" barrier never does)
    assert any(start_r > first_finish and start_s < start_r < end_s
               for start_r, _ in spans for start_s, end_s in spans), spans
    assert max(r.queue_ms or 0 for r in records) > 0


def test_a_small_batch_is_not_stuck_behind_a_large_one(
        client: OpenAI, model: str, deployment: Deployment, tmp_path: Path) -> None:
    """Both batches wait in Kafka behind a frozen worker, the large one first; once it
    thaws, the small one's lines are admitted within the first slots (round-robin across
    batches), not after the large one's 128 lines. Read from the lines' own engine start
    times, so it holds on any machine."""
    big_ids = [f"big{i}" for i in range(128)]
    with deployment.frozen("worker"):
        big = create_batch(client, write_jsonl(tmp_path / "big.jsonl", [
            chat_line(cid, model, f"Tell a story about the number {i}.", max_tokens=16)
            for i, cid in enumerate(big_ids)]))
        wait_until(lambda: client.batches.retrieve(big.id).status == "in_progress", 60,
                   "the big batch's lines to be enqueued")
        small = create_batch(client, write_jsonl(tmp_path / "small.jsonl", [
            chat_line(f"small{i}", model, "Say hi.", max_tokens=4) for i in range(2)]))
        wait_until(lambda: client.batches.retrieve(small.id).status == "in_progress", 60,
                   "the small batch's lines to be enqueued")

    assert wait_done(client, small.id, 300).status == "completed"
    assert_exactly_once(client, big.id, big_ids)
    started = {r.custom_id: r.finished_at - (r.engine_ms or 0) / 1000
               for r in [*results(deployment, big.id, 128), *results(deployment, small.id, 2)]}
    small_last = max(started["small0"], started["small1"])
    big_before = sum(1 for cid in big_ids if started[cid] < small_last)
    # first in first out would start ~126 big lines first; round-robin at most a wave
    assert big_before <= 2 * IN_FLIGHT, big_before


def test_a_poison_line_fails_alone(client: OpenAI, model: str, tmp_path: Path) -> None:
    # a content part this text-only engine cannot take: vLLM raises for this request
    poison = ('{"custom_id": "poison", "method": "POST", "url": "/v1/chat/completions", '
              f'"body": {{"model": "{model}", "max_tokens": 4, "messages": [{{"role": "user",'
              ' "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", '
              '"format": "wav"}}]}]}}')
    ids = [f"ok{i}" for i in range(6)]
    lines = [chat_line(cid, model, "Say yes.", max_tokens=4) for cid in ids]
    batch = create_batch(client, write_jsonl(tmp_path / "in.jsonl", [*lines[:3], poison,
                                                                      *lines[3:]]))
    done = wait_done(client, batch.id)
    assert done.status == "completed"
    output = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert sorted(x.custom_id for x in output) == sorted(ids)
    assert [x.custom_id for x in errors] == ["poison"]
    assert errors[0].response is not None and errors[0].response.status_code >= 400
    # the partition moved on: a batch after it runs normally
    after = create_batch(client, write_jsonl(tmp_path / "after.jsonl", lines[:2]))
    assert wait_done(client, after.id).status == "completed"


@pytest.fixture
def second_worker(deployment: Deployment, model: str) -> Iterator[tuple[subprocess.Popen[str],
                                                                      threading.Event]]:
    """One more `millrace worker` (chat model only) joining the deployment's group."""
    env = {"MILLRACE_WORKER_MAX_IN_FLIGHT": str(IN_FLIGHT),
           "MILLRACE_VLLM_MODEL_ARGS": json.dumps(VLLM_MODEL_ARGS)}
    with extra_worker(deployment, model, env) as (proc, assigned, _):
        yield proc, assigned


def test_two_workers_split_one_batch_and_hand_over_on_sigterm(
        client: OpenAI, model: str, deployment: Deployment, tmp_path: Path,
        second_worker: tuple[subprocess.Popen[str], threading.Event]) -> None:
    proc, assigned = second_worker
    assert assigned.wait(180), "the second worker got no partitions"
    ids = [f"two{i}" for i in range(48)]
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Name a colour and the number {i}.", max_tokens=12)
        for i, cid in enumerate(ids)])
    batch = create_batch(client, path)
    assert_exactly_once(client, batch.id, ids)
    by_worker = Counter(r.worker for r in results(deployment, batch.id, len(ids)))
    assert len(by_worker) == 2, by_worker
    assert all(n >= 0.3 * len(ids) for n in by_worker.values()), by_worker

    # SIGTERM mid-batch: the worker finishes what runs, hands back the rest and leaves
    ids2 = [f"handover{i}" for i in range(48)]
    second = create_batch(client, write_jsonl(tmp_path / "in2.jsonl", [
        chat_line(cid, model, f"Describe the number {i}.", max_tokens=24)
        for i, cid in enumerate(ids2)]))
    wait_until(lambda: (c := client.batches.retrieve(second.id).request_counts) is not None
               and c.completed >= 4, 120, "the batch to be under way")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert_exactly_once(client, second.id, ids2)


def test_worker_killed_mid_batch_loses_and_repeats_nothing(
        client: OpenAI, model: str, deployment: Deployment, tmp_path: Path) -> None:
    ids = [f"kill{i}" for i in range(48)]
    batch = create_batch(client, write_jsonl(tmp_path / "in.jsonl", [
        chat_line(cid, model, f"Write about the number {i}.", max_tokens=24)
        for i, cid in enumerate(ids)]))
    wait_until(lambda: (c := client.batches.retrieve(batch.id).request_counts) is not None
               and c.completed >= 4, 120, "the batch to be under way")
    info = deployment.ready_info("worker")
    assert info is not None
    os.kill(int(str(info["pid"])), signal.SIGKILL)
    # `millrace up` restarts the worker; it resumes from the last committed offsets
    restarted = wait_until(lambda: (i := deployment.ready_info("worker")) is not None
                           and i["pid"] != info["pid"] and i, 180, "the worker to restart")
    assert restarted["pid"] != info["pid"]
    # the killed worker's vLLM engine-core process was reaped with its process group
    assert not running_in_group(int(str(info["pid"])))
    assert_exactly_once(client, batch.id, ids)


def running_in_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids
