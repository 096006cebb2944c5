"""The inference engine seam: a small protocol, the real vLLM engine, and a test engine."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from millrace.protocol import ErrorDetail, ErrorEnvelope
from millrace.records import Usage


@dataclass(frozen=True)
class EngineRequest:
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class EngineResult:
    status_code: int
    body: dict[str, Any]
    usage: Usage = field(default_factory=Usage)

    @classmethod
    def error(
        cls, status_code: int, message: str, *, type_: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> EngineResult:
        detail = ErrorDetail(message=message, type=type_, param=param, code=code)
        return cls(status_code, ErrorEnvelope(error=detail).model_dump())


class Engine(Protocol):
    """Runs a micro-batch of OpenAI request bodies; one result per request, in order."""

    @property
    def models(self) -> Sequence[str]: ...

    def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]: ...


class InvalidRequest(ValueError):
    """A request the engine cannot run as asked (bad parameter, prompt too long)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def unknown_model(model: object) -> EngineResult:
    return EngineResult.error(
        404, f"The model `{model}` does not exist or is not served here.",
        param="model", code="model_not_found",
    )


def chat_completion(
    model: str, texts: Sequence[tuple[str, str | None]], usage: Usage
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": reason or "stop",
            }
            for i, (text, reason) in enumerate(texts)
        ],
        "usage": _usage(usage),
    }


def text_completion(
    model: str, texts: Sequence[tuple[str, str | None]], usage: Usage
) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason or "stop"}
            for i, (text, reason) in enumerate(texts)
        ],
        "usage": _usage(usage),
    }


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class EchoEngine:
    """Deterministic zero-cost engine for pipeline tests and orchestration benchmarks.

    It answers with the last user message (chat) or the prompt (completions) and counts
    whitespace-separated words as tokens. Never the default: `MILLRACE_ENGINE=echo`.
    """

    def __init__(self, models: Sequence[str]) -> None:
        self._models = list(models)

    @property
    def models(self) -> Sequence[str]:
        return self._models

    def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        return [self._one(r) for r in requests]

    def _one(self, request: EngineRequest) -> EngineResult:
        model = request.body.get("model")
        if model not in self._models:
            return unknown_model(model)
        if request.url == "/v1/chat/completions":
            messages = request.body.get("messages") or [{}]
            prompt = str(messages[-1].get("content", ""))
            build = chat_completion
        else:
            prompt = str(request.body.get("prompt", ""))
            build = text_completion
        words = len(prompt.split())
        return EngineResult(200, build(str(model), [(prompt, "stop")], Usage(
            prompt_tokens=words, completion_tokens=words)), Usage(
            prompt_tokens=words, completion_tokens=words))
