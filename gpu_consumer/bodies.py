"""OpenAI response bodies built from engine outputs (chat, completions, embeddings)."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from millrace import ids
from millrace.records import Usage


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def chat_completion(model: str, choices: Sequence[Choice], usage: Usage) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{ids.token()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason or "stop",
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_body(usage),
    }


def text_completion(model: str, choices: Sequence[Choice], usage: Usage) -> dict[str, Any]:
    return {
        "id": f"cmpl-{ids.token()}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": c.text, "logprobs": c.logprobs,
             "finish_reason": c.finish_reason or "stop"}
            for i, c in enumerate(choices)
        ],
        "usage": usage_body(usage),
    }


def embedding_list(
    model: str, vectors: Sequence[Sequence[float]], prompt_tokens: int, encoding: str
) -> dict[str, Any]:
    def encode(vector: Sequence[float]) -> list[float] | str:
        if encoding == "base64":  # OpenAI's base64: little-endian float32
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return [float(x) for x in vector]

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                 for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _top(step: dict[int, Any], k: int) -> list[Any]:
    """The k most likely tokens of a step (vLLM adds the sampled one when it ranks lower)."""
    return sorted((lp for lp in step.values() if lp.rank), key=lambda lp: lp.rank)[:k]


def chat_logprobs(
    token_ids: Sequence[int], steps: Sequence[dict[int, Any]], k: int
) -> dict[str, Any]:
    """vLLM per-token Logprob dicts → OpenAI's `choices[].logprobs.content`."""
    content = []
    for token_id, step in zip(token_ids, steps, strict=False):
        chosen = step[token_id]
        entry = _token_entry(chosen.decoded_token or "", chosen.logprob)
        entry["top_logprobs"] = [_token_entry(lp.decoded_token or "", lp.logprob)
                                 for lp in _top(step, k)]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(
    token_ids: Sequence[int], steps: Sequence[dict[int, Any]], k: int
) -> dict[str, Any]:
    """vLLM per-token Logprob dicts → the legacy completions logprobs object."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for token_id, step in zip(token_ids, steps, strict=False):
        chosen = step[token_id]
        token = chosen.decoded_token or ""
        tokens.append(token)
        token_logprobs.append(chosen.logprob)
        top_logprobs.append({lp.decoded_token or "": lp.logprob for lp in _top(step, k)})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}
