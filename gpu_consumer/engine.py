"""The inference engine seam: a small protocol, the real vLLM engine, and a test engine.

An engine is driven by the worker's loop, never blocking on a whole batch: `submit` admits
one request (identified by the worker's ticket), `step` advances every running request by
one engine iteration and returns those that finished. This is vLLM's own continuous
batching: requests join and leave the running batch between steps.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from millrace.protocol import ErrorDetail, ErrorEnvelope
from millrace.records import Usage


@dataclass(frozen=True)
class EngineRequest:
    url: str
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.body.get("model"))


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


Finished = list[tuple[int, EngineResult]]


class Engine(Protocol):
    """Continuous batching: admit requests any time, step, collect the finished ones."""

    @property
    def models(self) -> Sequence[str]: ...

    def capacity(self, model: str) -> int:
        """How many requests of `model` the engine runs at once (vLLM's max_num_seqs)."""
        ...

    def submit(self, ticket: int, request: EngineRequest) -> None:
        """Admit one request; its result comes back from a later `step` under `ticket`."""
        ...

    def step(self) -> Finished:
        """One engine iteration over everything admitted; returns what finished."""
        ...

    def abort(self, tickets: Collection[int]) -> None:
        """Stop these admitted requests now (their batch was cancelled or expired); no
        result comes back for them from `step`."""
        ...

    @property
    def busy(self) -> bool:
        """True while some admitted request has not been returned by `step`."""
        ...

    def close(self) -> None:
        """The worker stopped using the engine."""
        ...


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


class EchoEngine:
    """Deterministic zero-cost engine for pipeline tests and orchestration benchmarks.

    It answers with the last user message (chat) or the prompt (completions), embeds a
    text as [characters, words], and counts whitespace-separated words as tokens. Never the
    default: `MILLRACE_ENGINE=echo`.
    """

    def __init__(self, models: Sequence[str], step_s: float = 0.0) -> None:
        self._models = list(models)
        self._done: Finished = []
        self._step_s = step_s  # a model's step time (MILLRACE_ECHO_STEP_MS)

    @property
    def models(self) -> Sequence[str]:
        return self._models

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
        model = request.body.get("model")
        if model not in self._models:
            return unknown_model(model)
        from gpu_consumer import bodies

        if request.url == "/v1/embeddings":
            texts = request.body.get("input")
            texts = [texts] if isinstance(texts, str) else list(texts or [])
            vectors = [[float(len(str(t))), float(len(str(t).split()))] for t in texts]
            words = sum(len(str(t).split()) for t in texts)
            return EngineResult(200, bodies.embedding_list(str(model), vectors, words, "float"),
                                Usage(prompt_tokens=words))
        if request.url == "/v1/chat/completions":
            messages = request.body.get("messages") or [{}]
            prompt = str(messages[-1].get("content", ""))
            build = bodies.chat_completion
        else:
            prompt = str(request.body.get("prompt", ""))
            build = bodies.text_completion
        words = len(prompt.split())
        usage = Usage(prompt_tokens=words, completion_tokens=words)
        return EngineResult(200, build(str(model), [bodies.Choice(prompt, "stop")], usage), usage)
