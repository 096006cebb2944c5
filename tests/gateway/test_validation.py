"""Line validation rules, without the HTTP layer."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.validation import Rules, validate

URL = "/v1/chat/completions"
RULES = Rules(endpoint=URL, models={"m", "n"}, max_lines=5)


def line(custom_id: str, **overrides: object) -> bytes:
    obj = {"custom_id": custom_id, "method": "POST", "url": URL,
           "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}
    obj.update(overrides)
    return json.dumps(obj).encode()


def test_a_valid_file_reports_total_and_model() -> None:
    report = validate([line("a"), b"", line("b"), b"   "], RULES)
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
    ], Rules(endpoint=URL, models={"m"}))
    assert [(e.line, e.code, e.param) for e in report.errors] == [
        (2, "invalid_json_line", None),
        (3, "invalid_request", "method"),
        (4, "invalid_request", "body.stream"),
        (5, "invalid_request", "body.model"),
        (6, "invalid_request", "extra"),
    ]


def test_models_must_be_served_and_one_per_batch() -> None:
    report = validate([line("a"), line("b", body={"model": "x"}),
                       line("c", body={"model": "n"})], RULES)
    assert [(e.line, e.code) for e in report.errors] == [
        (2, "model_not_found"), (3, "model_mismatch")]


def test_more_lines_than_the_limit_is_too_many_requests() -> None:
    report = validate([line(str(i)) for i in range(7)], RULES)
    assert [(e.line, e.code) for e in report.errors] == [(6, "too_many_requests")]
    assert report.total == 7


def test_invalid_utf8_is_an_invalid_json_line() -> None:
    report = validate([b"\xff\xfe{}"], RULES)
    assert [e.code for e in report.errors] == ["invalid_json_line"]


def test_deeply_nested_json_is_reported_not_raised() -> None:
    report = validate([b"[" * 100_000 + b"]" * 100_000], RULES)
    assert [e.code for e in report.errors] == ["invalid_json_line"]


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=200) | st.text(max_size=200).map(str.encode), max_size=8))
def test_any_bytes_validate_without_raising(raw_lines: list[bytes]) -> None:
    report = validate(raw_lines, RULES)
    assert report.total == len([r for r in raw_lines if r.strip()])
    assert all(e.code for e in report.errors)
