"""Line validation rules, without the HTTP layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.lines import file_lines, link_urls
from gateway.validation import (
    Line,
    Report,
    Rules,
    _check_fields,
    _parse_slowly,
    check_line,
    validate,
)
from millrace.filestore import FileStore
from millrace.protocol import RequestLine
from millrace.records import RequestRecord

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


bodies = st.dictionaries(
    st.text(max_size=6).filter(lambda k: k not in ("model", "stream")),
    st.recursive(st.none() | st.booleans() | st.integers()
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=10),
    max_size=4)


@settings(max_examples=200)
@given(custom_id=st.text(min_size=1, max_size=12), body=bodies,
       ascii_only=st.booleans(), indent=st.sampled_from([None, 1]), reply=st.booleans())
def test_a_valid_line_is_enqueued_as_the_request_record_it_says(
        tmp_path_factory: pytest.TempPathFactory, custom_id: str, body: dict[str, object],
        ascii_only: bool, indent: int | None, reply: bool) -> None:
    """The explode copies the body's bytes into the record instead of parsing and dumping
    it: a worker reads the same request either way, and a line that may name a link is
    flagged for the link check (escaped or not)."""
    obj = {"custom_id": custom_id, "method": "POST", "url": URL,
           "body": {"model": "m", **body}}
    raw = json.dumps(obj, ensure_ascii=ascii_only, indent=indent).replace("\n", " ")
    files = FileStore(str(tmp_path_factory.mktemp("files")))
    files.write_bytes("in.jsonl", raw.encode() + b"\n")
    assert validate(files.iter_lines("in.jsonl"), RULES).errors == []
    [line_] = list(file_lines(files, "in.jsonl", RULES, "batch_1", "p", reply))
    record = line_.record()
    expected = RequestRecord(batch_id="batch_1", project="p", custom_id=custom_id, line=1,
                             url=URL, body=obj["body"], reply=reply,
                             enqueued_at=record.enqueued_at)
    assert record == expected
    assert (line_.line, line_.custom_id, line_.model) == (1, custom_id, "m")
    assert set(json.loads(line_.value)) == set(expected.model_dump())
    if link_urls(record):
        assert line_.maybe_links


def test_a_link_part_is_flagged_however_it_is_escaped(tmp_path: Path) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "link", "url": "http://x.example/"}]}]}
    plain = json.dumps({"custom_id": "a", "method": "POST", "url": URL, "body": body})
    escaped = plain.replace('"link"', '"\\u006cink"')
    files = FileStore(str(tmp_path))
    files.write_bytes("in.jsonl", f"{plain}\n{escaped}\n".encode())
    lines = list(file_lines(files, "in.jsonl", RULES, "batch_1", "p"))
    assert [line_.maybe_links for line_ in lines] == [True, True]
    assert [link_urls(line_.record()) for line_ in lines] == [["http://x.example/"]] * 2


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
def test_numbers_json_does_not_have_are_refused(number: bytes) -> None:
    """pydantic's parser reads NaN and Infinity (and 1e999 as infinity); JSON has no such
    numbers and no engine should get one."""
    raw = (b'{"custom_id": "a", "method": "POST", "url": "' + URL.encode()
           + b'", "body": {"model": "m", "messages": [], "temperature": ' + number + b"}}")
    report = validate([raw, line("b")], RULES)
    assert [(e.code, e.line) for e in report.errors] == [("invalid_json_line", 1)]
    assert "is not a JSON number" in report.errors[0].message


def pydantic_only(raw: bytes) -> tuple[object, list[tuple[str, str | None]]]:
    """What validation said before msgspec read lines first: pydantic alone."""
    report = Report()
    try:
        line: Line | None = RequestLine.model_validate_json(raw)
    except ValidationError:
        line = _parse_slowly(1, raw, report)
    if line is not None:
        line = _check_fields(1, line, RULES, report)
    return parts(line), [(e.code, e.param) for e in report.errors]


def parts(line: Line | None) -> object:
    return (line.custom_id, line.url, line.body) if line is not None else None


scalars = (st.none() | st.booleans() | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@settings(max_examples=400)
@given(fields=st.fixed_dictionaries({}, optional={
    "custom_id": st.text(max_size=4) | anything,
    "method": st.sampled_from(["POST", "GET"]) | anything,
    "url": st.just(URL) | anything,
    "body": st.fixed_dictionaries({"model": st.sampled_from(["m", "x"]) | anything},
                                  optional={"stream": anything, "k": anything}) | anything,
    "extra": anything}))
def test_the_fast_reader_accepts_and_refuses_as_pydantic_does(fields: dict[str, object]) -> None:
    raw = json.dumps(fields).encode()
    report = Report()
    line = check_line(1, raw, RULES, report)
    assert (parts(line), [(e.code, e.param) for e in report.errors]) == pydantic_only(raw)
