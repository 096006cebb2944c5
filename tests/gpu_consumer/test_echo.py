"""The echo engine answers every endpoint in the shape vLLM's server answers it: each body
is read by vLLM's own response type for that endpoint, and its usage is counted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpu_consumer.echo import EchoEngine
from gpu_consumer.engine import EngineRequest
from millrace import protocol
from millrace.records import body_tokens

LINES: dict[str, dict[str, Any]] = {
    protocol.CHAT: {"messages": [{"role": "user", "content": "say two words"}]},
    protocol.COMPLETIONS: {"prompt": "say two words"},
    protocol.RESPONSES: {"input": "say two words"},
    protocol.EMBEDDINGS: {"input": ["a cat", "a dog barks"]},
    "/v1/score": {"text_1": "a cat", "text_2": ["a cat naps", "bonds"]},
    "/v1/rerank": {"query": "a cat", "documents": ["bonds", "a cat naps"]},
    protocol.CLASSIFY: {"input": "a cat"},
    protocol.POOLING: {"input": "a cat"},
}


def vllm_response_types() -> dict[str, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse
    from vllm.entrypoints.openai.responses.protocol import ResponsesResponse
    from vllm.entrypoints.pooling.classify.protocol import ClassificationResponse
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingResponse
    from vllm.entrypoints.pooling.pooling.protocol import PoolingResponse
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse, ScoreResponse

    return {protocol.CHAT: ChatCompletionResponse, protocol.COMPLETIONS: CompletionResponse,
            protocol.RESPONSES: ResponsesResponse, protocol.EMBEDDINGS: EmbeddingResponse,
            "/v1/score": ScoreResponse, "/v1/rerank": RerankResponse,
            protocol.CLASSIFY: ClassificationResponse, protocol.POOLING: PoolingResponse}


@pytest.mark.parametrize("url", list(LINES))
def test_each_endpoint_in_vllm_s_shape(url: str) -> None:
    engine = EchoEngine(["m"])
    assert url in engine.catalog["m"].endpoints
    engine.submit(1, EngineRequest(url, {"model": "m", **LINES[url]}))
    [(ticket, result)] = engine.step()
    assert (ticket, result.status_code) == (1, 200)
    body = json.loads(result.body)
    vllm_response_types()[url].model_validate(body)
    assert result.tokens == body_tokens(result.body) and result.tokens.prompt > 0


def test_unknown_model_and_abort() -> None:
    engine = EchoEngine(["m"])
    engine.submit(1, EngineRequest(protocol.CHAT, {"model": "nope", "messages": []}))
    engine.submit(2, EngineRequest(protocol.CHAT, {"model": "m", **LINES[protocol.CHAT]}))
    engine.abort([2])
    [(ticket, result)] = engine.step()
    assert (ticket, result.status_code) == (1, 404)
    assert json.loads(result.body)["error"]["param"] == "model"
    assert not engine.busy
