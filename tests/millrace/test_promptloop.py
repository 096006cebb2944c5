"""What PromptLoop data rows become (request lines), what is wrong with a bad row (one code
per row, PromptLoop's), and what a result line reads back as."""

from __future__ import annotations

import json

import pytest

from millrace.promptloop import Task, request_lines, result_row, validate_rows

TASK = Task(id="task_1", version=1, created_at=0, updated_at=0, name="t", model="m",
            instructions="Classify.", max_tokens=64,
            inputs=[{"name": "text"}, {"name": "page", "type": "link"}],  # type: ignore[list-item]
            outputs=[{"name": "label"}, {"name": "score", "type": "number"}])  # type: ignore[list-item]


def row(uuid: object = "r1", inputs: object = ("hello", "https://a.example/p"),
        **extra: object) -> bytes:
    return json.dumps({"data_uuid": uuid, "inputs": list(inputs)  # type: ignore[call-overload]
                       if isinstance(inputs, tuple) else inputs, **extra}).encode()


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", "invalid_json_line"),
    (b"[1, 2]", "invalid_json_line"),
    (row(uuid=""), "missing_data_uuid"),
    (row(uuid=7), "missing_data_uuid"),
    (row(extra_field=1), "unknown_field"),
    (row(inputs="hello"), "missing_inputs"),
    (row(inputs=("a", "https://a.example", "c")), "too_many_inputs"),
    (row(inputs=("a",)), "too_few_inputs"),
    (row(inputs=("a", "ftp://a.example/p")), "incorrect_input_type"),
    (row(inputs=(True, "https://a.example/p")), "incorrect_input_type"),
    (row(inputs=({"x": 1}, "https://a.example/p")), "incorrect_input_type"),
    (b"x" * 2000, "line_too_long"),
])
def test_each_bad_row_gets_its_code(raw: bytes, code: str) -> None:
    report = validate_rows(TASK, [row("ok"), raw], max_rows=10, max_line_bytes=1000)
    assert report.rows == 2
    assert [(e.line, e.code) for e in report.errors] == [(2, code)]


def test_rows_are_counted_blank_lines_skipped_and_limits_kept() -> None:
    report = validate_rows(TASK, [row("a"), b"", b"  ", row("a"), row("b"), row("c")],
                           max_rows=2, max_line_bytes=1000)
    assert report.rows == 4
    assert [(e.line, e.code) for e in report.errors] == [
        (4, "duplicate_data_uuid"), (5, "too_many_rows")]
    assert [e.code for e in validate_rows(TASK, [b""], max_rows=2,
                                          max_line_bytes=1000).errors] == ["empty_file"]


def test_each_row_becomes_a_structured_chat_line_on_the_same_line_number() -> None:
    lines = list(request_lines(TASK, [row("a"), b"", row("b", ("x", "https://b.example"))],
                               1000))
    assert lines[1] == b"\n"
    first = json.loads(lines[0])
    assert (first["custom_id"], first["url"]) == ("a", "/v1/chat/completions")
    body = first["body"]
    assert body["model"] == "m" and body["max_tokens"] == 64 and body["temperature"] == 0
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "text: hello"},
        {"type": "link", "name": "page", "url": "https://a.example/p"}]
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["label", "score"] and not schema["additionalProperties"]
    assert schema["properties"]["score"] == {"type": "number"}
    assert json.loads(lines[2])["custom_id"] == "b"


def output(custom_id: str, status: int, body: object, error: object = None) -> bytes:
    return json.dumps({"id": "batch_req_1", "custom_id": custom_id, "error": error,
                       "response": None if status == 0 else
                       {"status_code": status, "request_id": "r", "body": body}}).encode()


def test_result_rows_read_back_as_promptloop_rows() -> None:
    answer = {"choices": [{"message": {"content": json.dumps({"label": "x", "score": 1})}}],
              "usage": {"prompt_tokens": 3}}
    assert result_row(output("a", 200, answer)) == {"data_uuid": "a", "label": "x", "score": 1}
    assert result_row(output("a", 200, answer), usage=True)["usage"] == {"prompt_tokens": 3}
    cut = {"choices": [{"message": {"content": '{"label": "x'}}]}
    assert result_row(output("b", 200, cut))["error"]["code"] == "invalid_output"
    refused = {"error": {"code": "invalid_value", "message": "no"}}
    assert result_row(output("c", 400, refused))["error"] == {"code": "invalid_value",
                                                              "message": "no"}
    never = output("d", 0, None, {"code": "batch_expired", "message": "expired"})
    assert result_row(never) == {"data_uuid": "d", "error": {"code": "batch_expired",
                                                              "message": "expired"}}
