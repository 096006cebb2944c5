"""Topic names from the one prefix, the layout `ensure_topics` makes, and how a batch's
lines spread over its requests topic (the README's topic contract)."""

from __future__ import annotations

import zlib
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from millrace.settings import Settings
from millrace.topics import Topics, request_route


def test_every_name_derives_from_the_prefix() -> None:
    topics = Topics("acme")
    assert topics.requests_for("org/model:v1 q4") == "acme.requests.org_model_v1_q4"
    assert [topics.responses, topics.batch_events, topics.ingest, topics.registry,
            topics.ingest_rejects, topics.batch_state, topics.workers] == [
        "acme.responses", "acme.batch-events", "acme.ingest", "acme.registry",
        "acme.ingest-rejects", "acme.batch-state", "acme.workers"]
    assert [topics.worker_group(), topics.sink_group(), topics.aggregator_group(),
            topics.jobs_group(), topics.ingest_group()] == [
        "acme.gpu-workers", "acme.sink", "acme.aggregator", "acme.gateway-jobs", "acme.ingest"]


def test_the_layout_gives_responses_and_batch_events_one_partition_count() -> None:
    settings = Settings(partitions=6, request_partitions=12, model="a,b")
    topics = Topics.from_settings(settings)
    layout = topics.layout(settings)
    assert layout[topics.responses] == layout[topics.batch_events] == 6
    assert layout[topics.requests_for("a")] == layout[topics.requests_for("b")] == 12
    assert layout[topics.workers] == layout[topics.registry] == 1
    assert set(topics.configs()) == {topics.registry, topics.batch_state, topics.workers}


@given(st.text(min_size=1, max_size=40), st.integers(1, 64), st.integers(1, 64))
def test_a_batch_s_lines_go_round_robin_over_its_shards(batch_id: str, shards: int,
                                                        partitions: int) -> None:
    routes = [request_route(batch_id, line, shards, partitions) for line in range(shards * 3)]
    first = zlib.crc32(batch_id.encode()) % partitions
    for line, (key, partition) in enumerate(routes):
        assert key == f"{batch_id}:{line % shards}"
        assert partition == (first + line % shards) % partitions
    # every shard gets the same number of lines
    assert set(Counter(key for key, _ in routes).values()) == {3}
