"""Request budgets on a real Redis: a key's budget over every route and a route's own budget
(the deployment's table, overridden per key) are counted per minute; a call over either gets
a 429 with `Retry-After`, and the answer names the tightest budget."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute
from starlette.requests import Request

from gateway.api import ratelimit
from millrace.errors import RateLimitError
from millrace.settings import Settings
from millrace.storage.principals import Principal
from millrace.storage.store import Store
from tests.deployment import OnStore

NOW = 1_800_000_015.0  # 15 s into a minute: 45 s left in its window


def request(method: str, template: str | None) -> Request:
    scope: dict[str, Any] = {"type": "http", "method": method, "path": "/", "headers": []}
    if template is not None:
        scope["route"] = APIRoute(template, endpoint=lambda: None, methods=[method])
    return Request(scope)


def test_a_route_is_named_as_promptloop_s_table_names_it() -> None:
    assert ratelimit.route_key(request("POST", "/v0/tasks/{task_id}/versions/{n}")) == (
        "POST /v0/tasks/{id}/versions/{id}")
    assert ratelimit.route_key(request("GET", "/v1/batches")) == "GET /v1/batches"
    assert ratelimit.route_key(request("GET", None)) is None  # no route matched


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """One instant: every call of a test falls in the same minute."""
    monkeypatch.setattr(ratelimit.time, "time", lambda: NOW)


def calls(on_store: OnStore[Any], settings: Settings, who: Principal, method: str,
          template: str, times: int) -> list[tuple[int, int, int] | RateLimitError]:
    """What each of `times` calls got: its tightest budget, or the 429."""
    async def scenario(store: Store) -> list[tuple[int, int, int] | RateLimitError]:
        got: list[tuple[int, int, int] | RateLimitError] = []
        for _ in range(times):
            call = request(method, template)
            try:
                await ratelimit.enforce(call, settings, store, who)
                got.append(getattr(call.state, "ratelimit", None))
            except RateLimitError as exc:
                got.append(exc)
        return got

    return on_store(scenario)


def test_the_key_s_budget_counts_every_route(on_store: OnStore[Any]) -> None:
    settings = Settings(rate_limit_rpm=100, route_limits={})
    got = calls(on_store, settings, Principal("p", rpm=2, key_hash="k1"), "GET",
                "/v1/batches", 3)
    assert got[:2] == [(2, 1, 45), (2, 0, 45)]  # the key's own rpm, not the deployment's
    over = got[2]
    assert isinstance(over, RateLimitError)
    assert "2 requests per minute for this key" in str(over)
    assert over.headers["retry-after"] == "45"
    assert over.headers["x-ratelimit-remaining-requests"] == "0"
    assert over.headers["x-ratelimit-reset-requests"] == "45s"


def test_a_route_s_own_budget_and_a_key_s_override(on_store: OnStore[Any]) -> None:
    settings = Settings(rate_limit_rpm=0, route_limits={"GET /v0/tasks/{id}": 2})
    table = calls(on_store, settings, Principal("p", key_hash="k2"), "GET",
                  "/v0/tasks/{task_id}", 3)
    assert table[:2] == [(2, 1, 45), (2, 0, 45)]
    assert isinstance(table[2], RateLimitError) and "to GET /v0/tasks/{id}" in str(table[2])
    raised = Principal("p", rpm=10, key_hash="k3", routes=(("GET /v0/tasks/{id}", 4),))
    got = calls(on_store, settings, raised, "GET", "/v0/tasks/{task_id}", 5)
    # both budgets apply; the answer names the tighter one (the route's 4 under the key's 10)
    assert got[:4] == [(4, 3, 45), (4, 2, 45), (4, 1, 45), (4, 0, 45)]
    assert isinstance(got[4], RateLimitError)
    free = calls(on_store, settings, Principal("p", key_hash="k4"), "GET", "/v1/batches", 3)
    assert free == [None, None, None]  # no budget applies: nothing counted or named

