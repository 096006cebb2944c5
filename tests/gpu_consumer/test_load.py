"""The worker's load report: totals per model, a status every 2 s, a bounded history, and
what each model serves (its endpoints and LoRA adapters)."""

from __future__ import annotations

from gpu_consumer.engine import Served
from gpu_consumer.load import HISTORY_EVERY_S, HISTORY_LEN, RATE_WEIGHT, STATUS_EVERY_S, Load
from millrace.records import Tokens, WorkerStatus

CATALOG = {"chat": Served(("/v1/chat/completions", "/v1/responses"), "chat"),
           "chat-lora": Served(("/v1/chat/completions", "/v1/responses"), "chat"),
           "embed": Served(("/v1/embeddings",), "embed")}


def test_totals_status_and_a_bounded_history() -> None:
    load = Load("worker@h:1", ["chat", "embed"], CATALOG, now=100.0)
    load.answered("chat", Tokens(prompt=5, completion=7))
    load.answered("chat", Tokens(prompt=1, completion=2))
    load.failed("embed")
    assert load.due(0.0) and not load.due(STATUS_EVERY_S / 2) and load.due(STATUS_EVERY_S)
    status = load.status({"chat": 3}, {"chat": 4}, {"embed": 9})
    assert status.models["chat"].model_dump() == {
        "running": 3, "waiting": 4, "lag": 0, "finished": 2, "failed": 0,
        "prompt_tokens": 6, "generation_tokens": 9, "tokens_per_s": 0.0,
        "endpoints": ["/v1/chat/completions", "/v1/responses"], "adapters": ["chat-lora"]}
    assert status.models["embed"].endpoints == ["/v1/embeddings"]
    assert status.models["embed"].adapters == []
    assert status.models["embed"].failed == 1 and status.models["embed"].lag == 9
    assert [h[1:] for h in status.history] == [(2, 9)]  # one sample: 2 s < 10 s apart
    assert WorkerStatus.model_validate_json(status.dumps()) == status
    now = 0.0
    for _ in range(3 * HISTORY_LEN):
        now += HISTORY_EVERY_S
        load.answered("chat", Tokens(completion=1))
        assert load.due(now)
    history = load.status({}, {}, {}).history
    assert len(history) == HISTORY_LEN
    assert [h[1] for h in history] == sorted(h[1] for h in history)  # totals only grow
    assert history[-1][1:] == (2 + 3 * HISTORY_LEN, 9 + 3 * HISTORY_LEN)
    assert load.status({}, {}, {}, stopped=True).stopped


def test_throughput_is_measured_while_busy_only() -> None:
    """Tokens a second over the intervals a model had requests running or waiting, a
    moving average: the first status is only a start, an idle interval changes nothing."""
    load = Load("worker@h:1", ["chat"], CATALOG)

    def at(now: float, running: int, waiting: int = 0) -> float:
        return load.status({"chat": running}, {"chat": waiting}, {},
                           now=now).models["chat"].tokens_per_s

    assert at(0.0, 0) == 0.0
    load.answered("chat", Tokens(prompt=100, completion=100))
    assert at(2.0, 4) == 100.0  # 200 tokens in 2 s (it was busy at the end)
    assert at(12.0, 0) == 100.0 - RATE_WEIGHT * 100.0  # busy at its start: 0 tokens in 10 s
    idle = at(12.0, 0)
    assert at(100.0, 0) == idle  # idle all along: says nothing of its speed
    load.answered("chat", Tokens(prompt=300, completion=300))
    assert at(102.0, 0, waiting=5) == round(idle + RATE_WEIGHT * (300.0 - idle), 1)
