"""Issue 17: two of every service, each on its own disk as on its own host, sharing only
Kafka, Redis and an S3 file store (moto's server); mid-batch a sink, an aggregator and a
gateway lose their hosts (SIGKILL, data dir deleted) and a third sink joins. The scenario
is `millrace chaos --scale-out` (`millrace/up/scale_out.py`)."""

from __future__ import annotations

from pathlib import Path

from millrace.up import scale_out


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
    # the new sink took partitions over
    assert result.added_partitions, report
    # one webhook per event, even with a partition finished by another sink than began it
    assert result.webhooks_once, result.webhooks
    # nothing on a local disk: the files are in S3
    up = tmp_path / "up"
    assert not (up / "files").exists()
    assert not [d for d in (up / "replicas").glob("*/files")]
