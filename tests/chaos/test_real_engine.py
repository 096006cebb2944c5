"""The whole stack stopped mid-batch — by SIGTERM (Ctrl-C), or by SIGKILL of every process
(a power loss) — and started again on the same data dir, on the real engine: the batch
finishes, every line exactly once, counts and usage exact, the webhook delivered."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from millrace.up.chaos import Receiver, Up, deployment, run_round

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
