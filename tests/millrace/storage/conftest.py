"""Each storage test gets a `Store` of its own namespace on the session's real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from millrace.storage.store import Store
from tests.deployment import Deployment

T = TypeVar("T")
OnStore = Callable[[Callable[[Store], Awaitable[T]]], T]


@pytest.fixture
def on_store(deployment: Deployment) -> OnStore[object]:
    """Run `scenario(store)` on a fresh namespace; the store is closed after."""
    def run(scenario: Callable[[Store], Awaitable[T]]) -> T:
        async def main() -> T:
            store = Store.connect(str(deployment.endpoints["redis_url"]),
                                  f"st{uuid.uuid4().hex[:8]}")
            try:
                return await scenario(store)
            finally:
                await store.close()
        return asyncio.run(main())
    return run  # type: ignore[return-value]
