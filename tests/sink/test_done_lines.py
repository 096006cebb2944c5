"""The sink marks the lines that have a result in Redis (`done:<batch>`): re-drive and fill
skip exactly those lines."""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from millrace.storage.store import Store
from tests.deployment import Deployment

line_sets = st.lists(st.sets(st.integers(1, 50_000), max_size=60), min_size=1, max_size=4)


def test_polls_of_lines_of_several_batches_are_all_marked_and_nothing_else(
        deployment: Deployment) -> None:
    redis_url = str(deployment.endpoints["redis_url"])

    @settings(max_examples=25, deadline=None)
    @given(polls=st.lists(st.tuples(line_sets, line_sets), min_size=1, max_size=3))
    def marked(polls: list[tuple[list[set[int]], list[set[int]]]]) -> None:
        async def scenario() -> None:
            store = Store.connect(redis_url, f"done{uuid.uuid4().hex[:8]}")
            try:
                wanted: dict[str, set[int]] = {"a": set(), "b": set()}
                for a_polls, b_polls in polls:
                    for a, b in zip(a_polls, b_polls, strict=False):
                        await store.mark_done({"a": a, "b": b})
                        wanted["a"] |= a
                        wanted["b"] |= b
                for batch_id, lines in wanted.items():
                    done = await store.done_lines(batch_id)
                    assert {n for n in range(50_001) if n in done} == lines
                    assert len(done) == len(lines)
                assert await store.r.keys(store.keys.done_new("*")) == []
            finally:
                await store.close()

        asyncio.run(scenario())

    marked()
