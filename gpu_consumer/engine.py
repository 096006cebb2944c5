"""The inference engine seam: a small protocol the worker drives, and what passes through it.

An engine is driven by the worker's loop, never blocking on a whole batch: `submit` admits
one request (identified by the worker's ticket), `step` returns those that finished since
(waiting briefly for one). Requests join and leave the engine's running batch while others
run (continuous batching). Engines: `vllm_engine.VllmEngine` (vLLM's own OpenAI serving
layer over `AsyncLLM`) and `echo.EchoEngine` (no inference: pipeline tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from millrace.records import Tokens


@dataclass(frozen=True)
class EngineRequest:
    url: str
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.body.get("model"))


@dataclass(frozen=True)
class EngineResult:
    """A line's answer: the HTTP status and JSON body the engine's server would send."""

    status_code: int
    body: bytes
    tokens: Tokens = field(default_factory=Tokens)

    @classmethod
    def of(cls, status_code: int, body: Mapping[str, Any], tokens: Tokens | None = None
           ) -> EngineResult:
        return cls(status_code, _encode(body), tokens or Tokens())


@dataclass(frozen=True)
class Served:
    """A name `body.model` may give: the endpoints it answers, and the served model whose
    requests topic and engine it runs on (itself, or a LoRA adapter's base model)."""

    endpoints: tuple[str, ...]
    base: str


Finished = list[tuple[int, EngineResult]]


class Engine(Protocol):
    """Continuous batching: admit requests any time, step, collect the finished ones."""

    @property
    def models(self) -> Sequence[str]:
        """The served models (one requests topic each)."""
        ...

    @property
    def catalog(self) -> Mapping[str, Served]:
        """Every name a line's `body.model` may give (served models and their adapters)."""
        ...

    def capacity(self, model: str) -> int:
        """How many requests of `model` the engine runs at once (vLLM's max_num_seqs)."""
        ...

    def submit(self, ticket: int, request: EngineRequest) -> None:
        """Admit one request; its result comes back from a later `step` under `ticket`."""
        ...

    def step(self) -> Finished:
        """What finished since the last step (waiting a little for something to finish)."""
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


def unknown_model(model: object) -> EngineResult:
    """A line naming a model this engine does not serve (vLLM's server answers so)."""
    return EngineResult.of(404, {"error": {
        "message": f"The model `{model}` does not exist.", "type": "NotFoundError",
        "param": "model", "code": 404}})


_encode = msgspec.json.Encoder().encode
