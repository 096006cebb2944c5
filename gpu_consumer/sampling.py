"""OpenAI request bodies → vLLM sampling arguments; what we cannot honour is a 400.

Pure (no vLLM import) so the mapping is unit-tested without an engine.
"""

from __future__ import annotations

from typing import Any

from gpu_consumer.engine import InvalidRequest

# Body fields every endpoint may carry that do not change the result.
_PASSIVE = {"model", "user", "metadata", "store", "service_tier", "stream_options"}
# OpenAI name → vLLM SamplingParams name (shared by chat and completions).
_DIRECT = {
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "n",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    # vLLM extensions, accepted as vLLM's own server accepts them
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens",
}
CHAT_FIELDS = _PASSIVE | set(_DIRECT) | {
    "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
    "response_format", "stream",
}
COMPLETION_FIELDS = _PASSIVE | set(_DIRECT) | {"prompt", "max_tokens", "logprobs", "echo",
                                               "stream"}
EMBEDDING_FIELDS = _PASSIVE | {"input", "encoding_format", "dimensions"}
FIELDS = {
    "/v1/chat/completions": CHAT_FIELDS,
    "/v1/completions": COMPLETION_FIELDS,
    "/v1/embeddings": EMBEDDING_FIELDS,
}


def check_fields(url: str, body: dict[str, Any]) -> None:
    allowed = FIELDS.get(url)
    if allowed is None:
        raise InvalidRequest(f"url '{url}' is not served", "url")
    for name in body:
        if name not in allowed:
            raise InvalidRequest(f"Unsupported parameter: '{name}' is not supported by "
                                 f"millrace for {url}.", name)
    if body.get("echo"):
        raise InvalidRequest("Unsupported parameter: 'echo'.", "echo")


def sampling_kwargs(url: str, body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """SamplingParams keyword arguments for a chat or completions body."""
    check_fields(url, body)
    kwargs = {dst: body[src] for src, dst in _DIRECT.items() if body.get(src) is not None}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    kwargs["max_tokens"] = max_tokens or default_max_tokens
    if url == "/v1/chat/completions":
        if body.get("logprobs"):
            top = body.get("top_logprobs") or 0
            if not isinstance(top, int) or not 0 <= top <= 20:
                raise InvalidRequest("'top_logprobs' must be an integer from 0 to 20",
                                     "top_logprobs")
            kwargs["logprobs"] = top
        elif body.get("top_logprobs"):
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        structured = response_format(body.get("response_format"))
        if structured is not None:
            kwargs["structured_outputs"] = structured
    elif body.get("logprobs") is not None:
        top = body["logprobs"]
        if not isinstance(top, int) or not 0 <= top <= 5:
            raise InvalidRequest("'logprobs' must be an integer from 0 to 5", "logprobs")
        kwargs["logprobs"] = top
    return kwargs


def response_format(value: Any) -> dict[str, Any] | None:
    """OpenAI `response_format` → vLLM structured-output arguments (None = free text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest("'response_format.json_schema.schema' must be an object",
                                 "response_format")
        return {"json": schema}
    raise InvalidRequest("'response_format.type' must be text, json_object or json_schema",
                         "response_format")
