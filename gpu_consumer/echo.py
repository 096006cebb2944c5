"""The echo engine: no inference, for pipeline tests and orchestration benchmarks.

Deterministic and free: it answers the last user message (chat), the prompt (completions),
the input (Responses); embeds a text as [characters, words]; scores a pair by shared words;
counts whitespace-separated words as tokens. Every endpoint, in the shape vLLM's server
answers it. Never the default: `MILLRACE_ENGINE=echo`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from gpu_consumer.engine import EngineRequest, EngineResult, Finished, Served, unknown_model
from millrace import protocol
from millrace.records import Tokens

ENDPOINTS = protocol.SUPPORTED_ENDPOINTS


def _text(value: object) -> str:
    """A prompt or content as plain text (a list of content parts: their texts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text(p.get("text", "")) if isinstance(p, dict) else _text(p)
                        for p in value)
    return "" if value is None else str(value)


def _texts(value: object) -> list[str]:
    return [_text(v) for v in value] if isinstance(value, list) else [_text(value)]


def _last_message(messages: object) -> str:
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return _text(messages[-1].get("content"))
    return ""


def _usage(prompt: int, completion: int = 0) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def _generate(url: str, model: str, body: dict[str, Any]) -> EngineResult:
    created = int(time.time())
    if url == protocol.RESPONSES:
        text = _last_message(body["input"]) if isinstance(body.get("input"), list) else (
            _text(body.get("input")))
        words = len(text.split())
        return EngineResult.of(200, {
            "id": f"resp_{secrets.token_hex(8)}", "object": "response", "created_at": created,
            "model": model, "status": "completed", "background": False,
            "max_output_tokens": body.get("max_output_tokens") or words,
            "parallel_tool_calls": True,
            "service_tier": "auto", "temperature": body.get("temperature", 1.0),
            "tool_choice": "none", "tools": [], "top_p": 1.0, "truncation": "disabled",
            "output": [{"type": "message", "id": f"msg_{secrets.token_hex(8)}",
                        "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text,
                                     "annotations": []}]}],
            "usage": {"input_tokens": words,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": words, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 2 * words}}, Tokens(words, words))
    if url == protocol.CHAT:
        text = _last_message(body.get("messages"))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        text = _text(body.get("prompt"))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        kind, prefix = "text_completion", "cmpl"
    words = len(text.split())
    return EngineResult.of(200, {"id": _id(prefix), "object": kind, "created": created,
                                 "model": model, "choices": [choice],
                                 "usage": _usage(words, words)}, Tokens(words, words))


def _pool(url: str, model: str, body: dict[str, Any]) -> EngineResult:
    listed: dict[str, Any] = {"id": _id("embd"), "object": "list", "created": int(time.time()),
                              "model": model}
    if url in protocol.SCORE or url in protocol.RERANK:
        first = set(_text(body.get("text_1", body.get("query"))).split())
        others = _texts(body.get("text_2", body.get("documents")))
        scores = [len(first & set(t.split())) / (len(first) or 1) for t in others]
        words = len(first) * len(others) + sum(len(t.split()) for t in others)
        if url in protocol.RERANK:
            ranked = sorted(enumerate(scores), key=lambda s: -s[1])
            return EngineResult.of(200, {
                "id": listed["id"], "model": model, "usage": _usage(words),
                "results": [{"index": i, "document": {"text": others[i]},
                             "relevance_score": s} for i, s in ranked]}, Tokens(words))
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    else:
        texts = _texts(body.get("input"))
        words = sum(len(t.split()) for t in texts)
        vectors = [[float(len(t)), float(len(t.split()))] for t in texts]
        if url == protocol.EMBEDDINGS:
            data = [{"object": "embedding", "index": i, "embedding": v}
                    for i, v in enumerate(vectors)]
        elif url == protocol.CLASSIFY:
            data = [{"index": i, "label": "LABEL_0", "probs": [1.0], "num_classes": 1}
                    for i in range(len(texts))]
        else:
            data = [{"index": i, "object": "pooling", "data": v} for i, v in enumerate(vectors)]
    return EngineResult.of(200, {**listed, "data": data, "usage": _usage(words)},
                           Tokens(words))


class EchoEngine:
    def __init__(self, models: Sequence[str], step_s: float = 0.0) -> None:
        self._models = list(models)
        self._done: Finished = []
        self._step_s = step_s  # a model's step time (MILLRACE_ECHO_STEP_MS)

    @property
    def models(self) -> Sequence[str]:
        return self._models

    @property
    def catalog(self) -> Mapping[str, Served]:
        return {m: Served(ENDPOINTS, m) for m in self._models}

    def capacity(self, model: str) -> int:
        return 1024

    def submit(self, ticket: int, request: EngineRequest) -> None:
        self._done.append((ticket, self._one(request)))

    def step(self) -> Finished:
        if self._done and self._step_s:
            time.sleep(self._step_s)  # the engine computing, as a GPU step would
        done, self._done = self._done, []
        return done

    def abort(self, tickets: Collection[int]) -> None:
        self._done = [(t, r) for t, r in self._done if t not in tickets]

    @property
    def busy(self) -> bool:
        return bool(self._done)

    def close(self) -> None:
        return None

    def _one(self, request: EngineRequest) -> EngineResult:
        model = request.model
        if model not in self._models:
            return unknown_model(model)
        if request.url in protocol.GENERATE_ENDPOINTS:
            return _generate(request.url, model, request.body)
        return _pool(request.url, model, request.body)
