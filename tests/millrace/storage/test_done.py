"""Done lines: the bitmap the sink ORs into Redis reads back as exactly the lines marked,
whatever order and however many polls marked them."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from millrace.storage.done import DoneLines, bitmap
from millrace.storage.store import Store
from tests.deployment import OnStore


@given(st.sets(st.integers(0, 5000), max_size=200), st.integers(0, 5100))
def test_a_bitmap_holds_exactly_its_lines(lines: set[int], probe: int) -> None:
    done = DoneLines(bitmap(lines))
    assert len(done) == len(lines)
    assert (probe in done) == (probe in lines)
    assert all(line in done for line in lines)


def test_polls_are_or_ed_into_each_batch_s_bitmap(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        await store.mark_done({"a": [1, 9], "b": [3]})
        await store.mark_done({"a": [4, 9, 100], "b": []})
        a, b, c = [await store.done_lines(x) for x in "abc"]
        assert sorted(n for n in range(200) if n in a) == [1, 4, 9, 100]
        assert sorted(n for n in range(200) if n in b) == [3]
        assert len(c) == 0

    on_store(scenario)
