"""The OpenAI wire format is strict: unknown fields are refused, not dropped."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from millrace.protocol import OutputLine, RequestLine


def test_request_line_and_output_line_are_strict() -> None:
    with pytest.raises(ValidationError):
        RequestLine.model_validate({"custom_id": "a", "method": "GET", "url": "/v1/x", "body": {}})
    with pytest.raises(ValidationError):
        OutputLine.model_validate({"id": "x", "custom_id": "a", "response": None, "error": None,
                                   "extra": 1})
