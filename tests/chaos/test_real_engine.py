"""The whole stack stopped mid-batch — by SIGTERM (Ctrl-C), or by SIGKILL of every process
(a power loss) — and started again on the same data dir, on the real engine: the batch
finishes, every line exactly once, counts and usage exact, the webhook delivered. And a
worker whose vLLM engine-core process dies mid-batch."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.chaos import TERMINAL, Api, Receiver, Round, Up, check, deployment, run_round

pytestmark = pytest.mark.engine
LINES = 40  # at max_tokens 8: half a minute of the engine on two cores


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with deployment(tmp_path_factory.mktemp("chaos-vllm"), "vllm", {}) as running:
        yield running


@pytest.mark.parametrize("fault", ["sigterm-all", "sigkill-all"])
def test_the_whole_stack_stops_and_the_batch_still_finishes_exactly(up: Up, fault: str) -> None:
    receiver = Receiver()
    try:
        result = run_round(up, receiver, 1, fault, LINES, random.uniform(0.5, 4.0))
    finally:
        receiver.close()
    assert result.ok, result


def engine_cores(worker: int) -> list[int]:
    """The pids of a worker's vLLM engine-core processes (named by vLLM's proctitle)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name = (stat.parent / "cmdline").read_bytes().split(b"\0")[0]
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if parent == worker and name.startswith(b"VLLM::EngineCore"):
            found.append(int(stat.parent.name))
    return found


def test_a_dead_engine_takes_its_worker_down_and_no_line_fails(up: Up) -> None:
    """SIGKILL of the engine-core process mid-batch: the worker stops rather than answer its
    lines with 500s, `up` starts it again, and every line is answered by the new engine."""
    api, receiver = Api(up), Receiver()
    try:
        batch_id = api.create(LINES, "dead-engine", receiver.url)
        assert api.until(lambda: (b := api.batch(batch_id)) and
                         b["request_counts"]["completed"] >= 1, 300), "the batch to start"
        worker = up.pid("worker")
        assert worker is not None
        cores = engine_cores(worker)
        assert cores, "no engine-core process under the worker"
        os.kill(cores[0], signal.SIGKILL)
        final = api.until(lambda: (b := api.batch(batch_id)) and b["status"] in TERMINAL
                          and b, 600)
        assert final and final["status"] == "completed", final
        # the batch may have been answered before the engine died (a fast engine): the worker
        # must still notice its dead engine while idle and go down, so `up` starts a new one
        assert api.until(lambda: up.pid("worker") not in (None, worker), 120), \
            "the worker went on with a dead engine"
        result = Round(1, "kill-engine-core", 0.0, LINES)
        check(result, final, api, "dead-engine")
        assert api.until(lambda: receiver.delivered(batch_id), 60)
        result.webhooks = receiver.delivered(batch_id)
        assert result.errors == 0, "lines failed instead of running again"
        assert result.ok, result
    finally:
        receiver.close()
