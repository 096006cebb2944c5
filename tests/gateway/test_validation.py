"""Line validation rules, without the HTTP layer."""

from __future__ import annotations

import json

from gateway.validation import validate

URL = "/v1/chat/completions"


def line(custom_id: str, **overrides: object) -> bytes:
    obj = {"custom_id": custom_id, "method": "POST", "url": URL,
           "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}
    obj.update(overrides)
    return json.dumps(obj).encode()


def test_a_valid_file_reports_total_and_model() -> None:
    report = validate([line("a"), b"", line("b"), b"   "], URL)
    assert (report.total, report.errors, report.model) == (2, [], "m")


def test_each_rule_reports_its_line_and_param() -> None:
    report = validate([
        line("a"),
        b"[1, 2]",
        line("b", method="GET"),
        line("c", body={"model": "m", "stream": True}),
        line("d", body={"messages": []}),
        json.dumps({"custom_id": "e", "method": "POST", "url": URL, "body": {"model": "m"},
                    "extra": 1}).encode(),
    ], URL)
    assert [(e.line, e.code, e.param) for e in report.errors] == [
        (2, "invalid_json_line", None),
        (3, "invalid_request", "method"),
        (4, "invalid_request", "body.stream"),
        (5, "invalid_request", "body.model"),
        (6, "invalid_request", "extra"),
    ]


def test_invalid_utf8_is_an_invalid_json_line() -> None:
    report = validate([b"\xff\xfe{}"], URL)
    assert [e.code for e in report.errors] == ["invalid_json_line"]
