"""API keys on a real Redis: a key is stored by its SHA-256 only, comes back with its
project, admin flag and budgets, and works the moment it is written."""

from __future__ import annotations

from typing import Any

from millrace.storage.principals import Principal, hash_key, new_api_key
from millrace.storage.store import Store
from tests.deployment import OnStore


def test_a_key_is_found_by_its_hash_with_its_budgets(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        key = new_api_key()
        assert key.startswith("sk-mr-") and key != new_api_key()
        assert await store.principal(key) is None  # not yet: looked up, not remembered
        who = Principal("p", admin=True, rpm=30, routes=(("GET /v0/tasks", 5),))
        await store.put_key_hash(hash_key(key), who)
        found = await store.principal(key)  # works at once
        assert found == Principal("p", admin=True, rpm=30, key_hash=hash_key(key),
                                  routes=(("GET /v0/tasks", 5),))
        assert await store.principal("sk-mr-other") is None
        # the key itself is written nowhere
        for name in [k async for k in store.r.scan_iter(match=f"{store.ns}:*")]:
            assert key not in str(name)
            assert key not in str(await store.r.hgetall(name))

    on_store(scenario)


def test_a_found_key_is_remembered_for_a_moment(on_store: OnStore[Any]) -> None:
    async def scenario(store: Store) -> None:
        key = new_api_key()
        await store.put_key_hash(hash_key(key), Principal("p"))
        assert (await store.principal(key) or Principal("")).project == "p"
        await store.r.delete(store.keys.api_key(hash_key(key)))
        # remembered: every API call looks its key up first, so it is not read every time
        assert (await store.principal(key) or Principal("")).project == "p"
        store._principals.clear()  # the moment is over
        assert await store.principal(key) is None

    on_store(scenario)
