"""A stream batch's ledger on a real Redis: each message claims its custom_id once, a
redelivered message keeps its line, another message with the same id is a duplicate,
rejected messages still count as received, and closing is idempotent."""

from __future__ import annotations

from typing import Any

from millrace.storage.ledger import StreamLedger
from millrace.storage.store import Store
from tests.deployment import OnStore


def test_claims_redeliveries_duplicates_and_the_sealed_total(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        ledger = StreamLedger(store)
        assert await ledger.get("b") is None
        await ledger.open("b", "/v1/chat/completions", "p", "mrit_x")
        assert await ledger.get("b") == {"endpoint": "/v1/chat/completions",
                                          "project": "p", "token": "mrit_x"}
        assert await ledger.claim("b", "a", "0:5") == ("new", 1)
        assert await ledger.claim("b", "c", "1:7") == ("new", 2)
        assert await ledger.claim("b", "a", "0:5") == ("redelivery", 1)
        assert await ledger.claim("b", "a", "2:9") == ("duplicate", 0)
        assert await ledger.held("b", "a", "0:5") == ("redelivery", 1)
        assert await ledger.held("b", "a", "2:9") == (None, 0)
        await ledger.note_rejected("b", "3:1")
        await ledger.note_rejected("b", "3:1")  # the same message again
        assert await ledger.received("b") == 3
        await ledger.expect("b", 4)
        await ledger.expect("b", 9)  # the first announced total stays
        assert (await ledger.get("b") or {})["expected"] == "4"
        assert await ledger.close("b") == 2
        assert await ledger.claim("b", "d", "1:8") == ("new", 3)  # a late line
        assert await ledger.close("b") == 2  # the total sealed first stays
        await ledger.forget("b")
        assert await ledger.get("b") is None and await ledger.received("b") == 0

    on_store(scenario)
