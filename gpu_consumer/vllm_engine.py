"""The real engine: vLLM's own OpenAI serving layer over `AsyncLLM`, in the worker's process.

Each served model runs as `vllm serve` would run it, without the HTTP server: its
arguments go through vLLM's parser (`engine_args`), vLLM builds its `AsyncLLM` (the engine
core in a process of its own) and, with `init_app_state` — what `vllm serve` and `vllm
run-batch` call — the serving objects of every task the model supports. A line is answered
by the handler of its `url`, exactly as vLLM's server answers that request: the body is
what the server would send, and a request vLLM refuses gets vLLM's status and error.

Threads: each model has an event loop of its own in a thread (its engine and serving
objects live there); the worker's loop submits lines to it and collects what finished.
`abort` cancels a line's task, and vLLM aborts the request in the engine (its KV cache is
freed at once). One difference from vLLM's server, on purpose: a body field the request
type does not know is refused (400), never silently dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydantic_core
from pydantic import BaseModel, TypeAdapter, ValidationError

from gpu_consumer import engine_args
from gpu_consumer.engine import (
    EngineRequest,
    EngineResult,
    Finished,
    Served,
    unknown_model,
)
from millrace import protocol
from millrace.errors import ComponentError
from millrace.records import Tokens, body_tokens
from millrace.settings import Settings

log = logging.getLogger(__name__)

STEP_WAIT_S = 0.02  # a step waits this long for a line to finish
WATCH_EVERY_S = 0.5  # how often a step looks whether an engine died


def cpu_runtime_env(settings: Settings) -> dict[str, str]:
    """The environment vLLM's CPU backend reads, for this worker's CPUs."""
    cores = settings.cpus() or sorted(os.sched_getaffinity(0))
    return {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
    }


def configure_runtime(settings: Settings, cpu: bool) -> None:
    """vLLM's environment, set before vLLM is imported; an explicit `cpu_set` always wins.
    Engine processes are spawned, not forked: the models start at once, from threads."""
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if cpu:
        env |= cpu_runtime_env(settings)
        if settings.cpus():
            os.sched_setaffinity(0, settings.cpus() or [])  # torch's threads stay on them
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = env["VLLM_CPU_OMP_THREADS_BIND"]
    for key, value in env.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class _Route:
    """One endpoint of a model: how vLLM's server reads its body and who answers it."""

    request: TypeAdapter[Any]
    handler: Callable[[Any], Awaitable[Any]]


def _routes(state: Any) -> dict[str, _Route]:
    """url → route, for the serving objects `init_app_state` made (those of the tasks the
    model supports), with the request types vLLM's own routes declare."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.classify.protocol import ClassificationRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
    from vllm.entrypoints.pooling.pooling.protocol import PoolingRequest
    from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest

    declared: list[tuple[tuple[str, ...], str, Any, str | None]] = [
        ((protocol.CHAT,), "openai_serving_chat", ChatCompletionRequest,
         "create_chat_completion"),
        ((protocol.COMPLETIONS,), "openai_serving_completion", CompletionRequest,
         "create_completion"),
        ((protocol.RESPONSES,), "openai_serving_responses", ResponsesRequest,
         "create_responses"),
        # the pooling serving objects are called themselves
        ((protocol.EMBEDDINGS,), "serving_embedding", EmbeddingRequest, None),
        (protocol.SCORE, "serving_scores", ScoreRequest, None),
        (protocol.RERANK, "serving_scores", RerankRequest, None),
        ((protocol.CLASSIFY,), "serving_classification", ClassificationRequest, None),
        ((protocol.POOLING,), "serving_pooling", PoolingRequest, None),
    ]
    found: dict[str, _Route] = {}
    for urls, name, request_type, method in declared:
        serving = getattr(state, name, None)
        if serving is not None:
            handler = getattr(serving, method) if method else serving
            found |= dict.fromkeys(urls, _Route(TypeAdapter(request_type), _called(handler)))
    return found


def _called(handler: Any) -> Callable[[Any], Awaitable[Any]]:
    """A handler called as its route calls it, without an HTTP request."""
    return lambda request: handler(request, None)


class EngineDied(ComponentError):
    """A model's vLLM engine is dead: no request can run here any more (the worker exits
    3; `up`, or the orchestrator, starts it again)."""

    exit_code = 3


class _ModelServer:
    """One served model: its `AsyncLLM` and vLLM's serving objects, on a loop of its own."""

    def __init__(self, name: str, args: Any, go: threading.Event) -> None:
        self.name = name
        self.args = args
        self.loop = asyncio.new_event_loop()
        # the model's config is built (vLLM accepted its arguments); it then waits for `go`
        self.configured: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._go = go
        self.routes: dict[str, _Route] = {}
        self.adapters: list[str] = []
        self.client: Any = None
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=f"vllm:{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:
            for future in (self.configured, self.started):
                if not future.done():
                    future.set_exception(exc)
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        """What vLLM's `build_async_engine_client_from_engine_args` and `init_app_state` do
        for `vllm serve`, with a config vLLM refuses told apart (a `SettingsError`)."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.monotonic()
        options, config = engine_args.engine_config(self.args, self.name)
        self.configured.set_result(None)
        await asyncio.to_thread(self._go.wait)
        if self._stopping.is_set():  # another model's arguments were refused
            return
        client = AsyncLLM.from_vllm_config(
            config, usage_context=UsageContext.OPENAI_BATCH_RUNNER,
            enable_log_requests=options.enable_log_requests,
            aggregate_engine_logging=options.aggregate_engine_logging,
            disable_log_stats=options.disable_log_stats)
        try:
            await client.reset_mm_cache()
            state = State()
            await init_app_state(client, state, self.args, await client.get_supported_tasks())
            self.client = client
            self.routes = _routes(state)
            self.adapters = list(state.openai_serving_models.lora_requests)
            log.info("loaded %s in %.1f s: %s", self.name, time.monotonic() - started,
                     ", ".join(self.routes))
            self.started.set_result(None)
            await self._stopping.wait()
        finally:
            # lines still running (a drain that ran out): cancelled, so vLLM aborts them
            running = asyncio.all_tasks() - {asyncio.current_task()}
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=5)
            client.shutdown(timeout=config.shutdown_timeout)

    @property
    def dead(self) -> bool:
        return self.client is not None and bool(self.client.errored)

    def capacity(self) -> int:
        return int(self.client.vllm_config.scheduler_config.max_num_seqs)

    def submit(self, request: EngineRequest) -> concurrent.futures.Future[EngineResult]:
        return asyncio.run_coroutine_threadsafe(self.answer(request), self.loop)

    async def answer(self, request: EngineRequest) -> EngineResult:
        """The line's answer, as vLLM's server answers the same request."""
        from vllm.entrypoints.serve import create_error_response
        from vllm.exceptions import VLLMValidationError

        route = self.routes.get(request.url)
        if route is None:  # as `vllm run-batch` answers it
            return _result(create_error_response(
                f"Model does not support endpoint: {request.url}", param="url"))
        try:
            parsed = route.request.validate_python(request.body)
        except ValidationError as exc:
            return await self._invalid(exc)
        unknown = sorted(getattr(parsed, "model_extra", None) or {})
        if unknown:  # vLLM's server would drop them without a word
            return _result(create_error_response(VLLMValidationError(
                f"Unrecognized request argument supplied: {unknown[0]}",
                parameter=unknown[0])))
        try:
            response = await route.handler(parsed)
        except Exception as exc:
            response = create_error_response(exc)
        if self.dead:
            raise EngineDied(f"the vLLM engine of {self.name} died")
        if hasattr(response, "__aiter__"):  # a stream: nothing ran yet
            await response.aclose()
            return _result(create_error_response("Streaming is not supported in batches.",
                                                 param="stream"))
        return _result(response)

    async def _invalid(self, exc: ValidationError) -> EngineResult:
        """A body the request type refuses: vLLM's server's own 400 for it."""
        from fastapi.exceptions import RequestValidationError
        from vllm.entrypoints.serve.exception_handling.handlers.validation import (
            validation_exception_handler,
        )

        errors = [{**err, "loc": ("body", *err["loc"])}
                  for err in exc.errors(include_url=False)]
        # the handler reads only these of the HTTP request
        request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(args=self.args)),
                                  state=SimpleNamespace())
        return _result(await validation_exception_handler(
            request, RequestValidationError(errors)))  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self._stopping.set)
        self._go.set()
        self._thread.join(60)


def _result(response: Any) -> EngineResult:
    """A serving object's answer → status and JSON body, as vLLM's server sends them."""
    from starlette.responses import Response
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(response, ErrorResponse):
        return EngineResult(response.error.code, pydantic_core.to_json(response))
    if isinstance(response, Response):
        body = bytes(response.body)
        ok = response.status_code == 200
        return EngineResult(response.status_code, body, body_tokens(body) if ok else Tokens())
    if isinstance(response, BaseModel):
        body = pydantic_core.to_json(response)
        return EngineResult(200, body, body_tokens(body))
    raise TypeError(f"unexpected answer from vLLM: {type(response).__name__}")


class VllmEngine:
    """The served models, each through vLLM's serving layer (see the module docstring)."""

    def __init__(self, settings: Settings, folders: Mapping[str, Path]) -> None:
        cpu = engine_args.cpu_build()
        configure_runtime(settings, cpu)
        # Every model's arguments first: a bad one stops the worker before anything loads.
        parsed = {name: engine_args.parse(settings, name, str(folder), cpu=cpu)
                  for name, folder in folders.items()}
        # Each model's config next (vLLM may refuse a value only then): engines start once
        # every model's is built.
        go = threading.Event()
        self._servers = {name: _ModelServer(name, args, go) for name, args in parsed.items()}
        try:
            for server in self._servers.values():
                server.configured.result()
            go.set()
            for server in self._servers.values():
                server.started.result()
        except BaseException:
            self.close()
            raise
        self._catalog: dict[str, Served] = {}
        for name, server in self._servers.items():
            endpoints = tuple(server.routes)
            for served in (name, *server.adapters):
                self._catalog[served] = Served(endpoints, name)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[int, concurrent.futures.Future[EngineResult]] = {}
        self._finished: Finished = []
        self._died: BaseException | None = None
        self._watched_at = 0.0

    @property
    def models(self) -> Sequence[str]:
        return list(self._servers)

    @property
    def catalog(self) -> Mapping[str, Served]:
        return self._catalog

    def capacity(self, model: str) -> int:
        server = self._servers.get(model)
        return server.capacity() if server else 1

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._finished)

    def submit(self, ticket: int, request: EngineRequest) -> None:
        served = self._catalog.get(request.model)
        if served is None:
            with self._lock:
                self._finished.append((ticket, unknown_model(request.model)))
            return
        future = self._servers[served.base].submit(request)
        with self._lock:
            self._pending[ticket] = future
        future.add_done_callback(lambda f: self._done(ticket, f))

    def _done(self, ticket: int, future: concurrent.futures.Future[EngineResult]) -> None:
        """A line's task ended (on its model's loop thread)."""
        if future.cancelled():
            return
        with self._lock:
            if self._pending.pop(ticket, None) is None:
                return  # aborted meanwhile
            error = future.exception()
            if error is None:
                self._finished.append((ticket, future.result()))
            elif isinstance(error, EngineDied):
                self._died = error
            else:  # a bug of ours: the line fails alone, the others go on
                log.error("line failed in the engine: %r", error)
                self._finished.append((ticket, EngineResult.of(500, {"error": {
                    "message": f"engine error: {error}", "type": "InternalServerError",
                    "param": None, "code": 500}})))
        self._wake.set()

    def step(self) -> Finished:
        """What finished since the last step. A dead engine stops the worker: the lines it
        had are not answered, so they are not committed and run again after the restart."""
        if self._pending and not self._finished:
            self._wake.wait(STEP_WAIT_S)
        now = time.monotonic()
        if now - self._watched_at >= WATCH_EVERY_S:
            self._watched_at = now
            dead = [name for name, server in self._servers.items() if server.dead]
            if dead and self._died is None:
                self._died = EngineDied(f"the vLLM engine of {', '.join(dead)} died")
        with self._lock:
            finished, self._finished = self._finished, []
            self._wake.clear()
        if self._died is not None:
            raise self._died
        return finished

    def abort(self, tickets: Collection[int]) -> None:
        """Each task is cancelled: vLLM's `generate` then aborts the request in the engine."""
        with self._lock:
            for ticket in tickets:
                future = self._pending.pop(ticket, None)
                if future is not None:
                    future.cancel()
            self._finished = [(t, r) for t, r in self._finished if t not in tickets]

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
