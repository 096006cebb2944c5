"""OpenAI body → vLLM sampling arguments, without an engine."""

from __future__ import annotations

import pytest

from gpu_consumer.engine import InvalidRequest
from gpu_consumer.sampling import response_format, sampling_kwargs

CHAT = "/v1/chat/completions"


def test_openai_fields_map_and_max_completion_tokens_wins() -> None:
    kwargs = sampling_kwargs(CHAT, {
        "model": "m", "messages": [], "temperature": 0.2, "top_p": 0.9, "n": 2, "stop": ["x"],
        "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.2, "max_tokens": 5,
        "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3, "user": "u",
    }, default_max_tokens=99)
    assert kwargs == {"temperature": 0.2, "top_p": 0.9, "n": 2, "stop": ["x"], "seed": 3,
                      "presence_penalty": 0.1, "frequency_penalty": 0.2, "max_tokens": 7,
                      "logprobs": 3}


def test_default_max_tokens_applies() -> None:
    assert sampling_kwargs(CHAT, {"messages": []}, 99)["max_tokens"] == 99


@pytest.mark.parametrize(("url", "body", "param"), [
    (CHAT, {"tools": []}, "tools"),
    (CHAT, {"functions": []}, "functions"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"response_format": {"type": "yaml"}}, "response_format"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
])
def test_unsupported_or_invalid_fields_are_rejected(
    url: str, body: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        sampling_kwargs(url, body, 16)
    assert raised.value.param == param


def test_response_formats() -> None:
    assert response_format(None) is None
    assert response_format({"type": "text"}) is None
    assert response_format({"type": "json_object"}) == {"json_object": True}
    schema = {"type": "object"}
    assert response_format({"type": "json_schema",
                            "json_schema": {"name": "s", "schema": schema}}) == {"json": schema}
