"""What the gateways check batches against: the endpoints and model names the workers
report on the board — every endpoint while none has reported, and still what a stopped or
restarting worker served (its lines wait in Kafka meanwhile)."""

from __future__ import annotations

from gateway.worker_board import ServedNames, WorkerBoard
from millrace.protocol import SUPPORTED_ENDPOINTS
from millrace.records import ModelLoad, WorkerStatus
from millrace.settings import Settings

CHAT = ["/v1/chat/completions", "/v1/completions", "/v1/responses"]


def status(worker: str, stopped: bool = False, **models: ModelLoad) -> WorkerStatus:
    return WorkerStatus(worker=worker, started_at=0.0, models=models, stopped=stopped)


def test_endpoints_and_names_come_from_the_workers() -> None:
    board = WorkerBoard()
    assert board.endpoints() == SUPPORTED_ENDPOINTS  # nobody reported: the workers judge
    names = ServedNames(Settings(model="chat,embed"), board)
    assert "chat-lora" not in names

    board.put(status("w1", chat=ModelLoad(endpoints=CHAT, adapters=["chat-lora"])))
    assert board.endpoints() == tuple(CHAT)
    assert board.served() == {"chat": set(CHAT), "chat-lora": set(CHAT)}
    assert "chat-lora" in names and "embed" in names and "gpt-5" not in names
    assert list(names) == ["chat", "embed", "chat-lora"]

    board.put(status("w2", embed=ModelLoad(endpoints=["/v1/embeddings", "/v1/score"])))
    board.put(status("w1", stopped=True))  # restarting: what it served is still served
    assert board.live()[0].worker == "w2"
    assert set(board.endpoints()) == {*CHAT, "/v1/embeddings", "/v1/score"}
    assert board.endpoints() == tuple(e for e in SUPPORTED_ENDPOINTS
                                      if e in board.endpoints())  # in a stable order


def test_throughput_is_summed_over_the_live_workers_serving_the_model() -> None:
    board = WorkerBoard()
    assert board.tokens_per_s("chat") == 0.0  # nobody measured it
    board.put(status("w1", chat=ModelLoad(tokens_per_s=100.0, adapters=["chat-lora"])))
    board.put(status("w2", chat=ModelLoad(tokens_per_s=50.0),
                     embed=ModelLoad(tokens_per_s=900.0)))
    assert board.tokens_per_s("chat") == 150.0
    assert board.tokens_per_s("chat-lora") == 100.0  # an adapter runs on its base model
    assert board.tokens_per_s("embed") == 900.0
    gone = board.live()[0].at + 60  # a worker not heard from is not counted
    assert board.tokens_per_s("chat", now=gone) == 0.0


def test_what_a_request_generates_on_average_on_the_live_workers() -> None:
    board = WorkerBoard()
    assert board.generated_per_request("chat") is None  # nothing finished yet
    board.put(status("w1", chat=ModelLoad(finished=10, generation_tokens=1_000)))
    board.put(status("w2", chat=ModelLoad(finished=30, generation_tokens=1_000)))
    assert board.generated_per_request("chat") == 2_000 / 40
