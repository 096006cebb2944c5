"""Issue 25: a sink and an aggregator frozen (SIGSTOP) for 25 s mid-batch — a long GC
pause, a VM's live migration, a suspended laptop — with two of each service. Their group
sessions expire, the other sink and aggregator take the batch's partition over and go on;
the frozen pair then wakes up still holding records it had fetched. Whatever order that
happens in, the batch ends completed and stays so: every line once, counts and usage equal
to the files, `batch.completed` delivered once. The fault is `millrace chaos --faults pause`
(`millrace.up.chaos.pause_owners`)."""

from __future__ import annotations

import time
from pathlib import Path

from millrace.up import readiness
from millrace.up.chaos import (
    SLOW_ECHO,
    TERMINAL,
    Api,
    Receiver,
    Round,
    Up,
    check,
    pause_owners,
)
from millrace.up.embedded import free_port
from tests.deployment import wait_until

LINES = 400  # 250 ms an engine step, 8 lines a step: most of it runs while the pair is frozen


def test_a_frozen_sink_and_aggregator_never_undo_what_their_successors_did(
        tmp_path: Path) -> None:
    receiver = Receiver()
    up = Up(tmp_path / "up", free_port(), "echo", {
        "MILLRACE_REPLICAS": "sink=2,aggregator=2", **SLOW_ECHO})
    try:
        up.start()
        api = Api(up)
        batch_id = api.create(LINES, "pause", receiver.url)
        frozen = pause_owners(up, batch_id)
        woke = time.time()
        assert sorted(name.split("-")[0] for name in frozen) == ["aggregator", "sink"]
        final = wait_until(lambda: (b := api.batch(batch_id)) is not None
                           and b["status"] in TERMINAL and b, 300, "the batch to end")
        result = Round(1, "pause", 0.0, LINES)
        check(result, final, api, "pause")
        # the woken pair polled again (a rejoin rewrites their markers): whatever they held
        # when they froze has been handled by now
        wait_until(lambda: all(_marked_since(up, name, woke) for name in frozen), 120,
                   "the frozen pair to rejoin")
        wait_until(lambda: receiver.delivered(batch_id), 60, "the webhook")
        after = api.batch(batch_id)
        assert after is not None
        result.webhooks = receiver.delivered(batch_id)
        assert result.ok, result
        assert (after["status"], after["request_counts"], after["usage"]) == (
            final["status"], final["request_counts"], final["usage"])
        assert [t for _, t, b in receiver.events if b == batch_id] == ["batch.completed"]
    finally:
        receiver.close()
        if up.proc is not None and up.proc.poll() is None:
            up.stop()


def _marked_since(up: Up, name: str, since: float) -> bool:
    return any(path.stem == name and path.stat().st_mtime > since
               for path in readiness.markers(up.data_dir))
