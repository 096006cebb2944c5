"""Issue 17: two of every service, each on its own disk as on its own host, sharing only
Kafka, Redis and an S3 file store (moto's server); mid-batch a sink, an aggregator and a
gateway lose their hosts (SIGKILL, data dir deleted), then a host with one more of every
service joins and leaves. The scenario is `millrace chaos --scale-out`
(`ops/scale_out.py`)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from millrace.kafka import partition_of
from millrace.topics import Topics
from ops import scale_out
from ops.chaos import SLOW_ECHO, Api, Receiver, Round, Up, owner
from ops.embedded import free_port
from tests.deployment import wait_until


def test_every_line_once_when_hosts_are_lost_and_a_sink_added_mid_batch(
        tmp_path: Path, s3_url: str) -> None:
    result = scale_out.run(tmp_path, {"MILLRACE_FILE_STORE_URL": s3_url})
    report = scale_out.table(result)
    # both batches: completed, every line exactly once, counts and usage exact
    assert result.file.ok, report
    assert result.stream.ok, report
    # one of each lost, while the batch ran: the sink had spooled lines only its disk held
    assert sorted(name.split("-")[0] for name in result.lost) == [
        "aggregator", "gateway", "sink"], report
    assert 0 < result.lost_at_done < result.file.lines, report
    # a host with one of every service joined, and its sink took partitions over
    assert result.added == ["aggregator-3", "gateway-3", "sink-3", "worker-3"], report
    assert result.added_partitions, report
    # one webhook per event, even with a partition finished by another sink than began it
    assert result.webhooks_once, result.webhooks
    # nothing on a local disk: the files are in S3
    up = tmp_path / "up"
    assert not (up / "files").exists()
    assert not [d for d in (up / "replicas").glob("*/files")]


def test_a_partition_that_moves_after_the_broker_lost_its_data_loses_no_line(
        tmp_path: Path) -> None:
    """The embedded broker is SIGKILLed mid-batch: it comes back empty and the batch is
    resumed on it (lines without a result run again). Then the sink that spooled the
    batch's lines stops and its partition goes to the other sink. Those lines are now in
    neither Kafka nor the new owner's disk: only in the segments the first sink published
    to the shared file store when it gave the partition up."""
    receiver = Receiver()
    up = Up(tmp_path / "up", free_port(), "echo", {
        "MILLRACE_REPLICAS": "sink=2", **SLOW_ECHO})
    try:
        up.start()
        api = Api(up)
        endpoints = json.loads((up.data_dir / "endpoints.json").read_text())
        topics = Topics(endpoints["topic_prefix"])
        lines = 1000
        batch_id = api.create(lines, "b", receiver.url)
        wait_until(lambda: done(api, batch_id) >= lines // 10, 120, "a tenth of the batch")
        partition = partition_of(batch_id, 4)
        broker = up.pid("broker")
        assert broker is not None
        os.kill(broker, signal.SIGKILL)
        wait_until(lambda: up.pid("broker") not in (None, broker), 60, "a new broker")
        # resumed on the new broker (the launcher resumes, the sinks rejoin): lines move on
        moved = done(api, batch_id)
        wait_until(lambda: done(api, batch_id) > moved, 120, "the batch to move on")
        first = wait_until(lambda: owner(up, "sink", topics.responses, partition),
                           60, "a sink to hold the partition again")
        other = "sink-2" if first == "sink" else "sink"
        assert up.proc is not None
        os.kill(up.proc.pid, signal.SIGSTOP)  # the stopped sink stays away meanwhile
        try:
            stopped = up.pid(first)
            assert stopped is not None
            os.kill(stopped, signal.SIGTERM)
            wait_until(lambda: owner(up, "sink", topics.responses, partition)
                       == other, 60, f"{other} to take the partition over")
        finally:
            os.kill(up.proc.pid, signal.SIGCONT)
        result = Round(1, "kill-broker, then the partition moves", 0, lines)
        scale_out.finish(api, receiver, batch_id, result, "b", 300)
        assert result.ok, result
    finally:
        receiver.close()
        if up.proc is not None and up.proc.poll() is None:
            up.stop()


def done(api: Api, batch_id: str) -> int:
    batch = api.batch(batch_id) or {"request_counts": {"completed": 0}}
    return int(batch["request_counts"]["completed"])
