"""The explode's fast path writes a request line's record with its own msgspec struct
(`_RequestWire`, the body spliced in as bytes): it must stay `RequestRecord`, field for
field, or workers and subscribers would read something else than the contract says."""

from __future__ import annotations

import json

import msgspec

from gateway.lines import _RequestWire
from millrace.records import RequestRecord

BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'


def test_the_wire_struct_has_the_record_s_fields_in_its_order() -> None:
    assert _RequestWire.__struct_fields__ == tuple(RequestRecord.model_fields)


def test_the_wire_struct_s_defaults_are_the_record_s() -> None:
    names = _RequestWire.__struct_fields__
    defaults = dict(zip(names[len(names) - len(_RequestWire.__struct_defaults__):],
                        _RequestWire.__struct_defaults__, strict=True))
    given = {name: default for name, default in defaults.items()
             if default is not msgspec.NODEFAULT}
    assert given == {"v": 1, "reply": False, "ticket": None, "priority": 0, "deadline": None}
    for name, default in given.items():
        assert RequestRecord.model_fields[name].default == default, name


def test_a_line_written_the_fast_way_reads_back_as_the_same_record() -> None:
    fields = {"batch_id": "batch_1", "project": "p", "custom_id": "c-7", "line": 7,
              "url": "/v1/chat/completions", "enqueued_at": 1765000000.25, "reply": True,
              "ticket": "0" * 32, "priority": -3, "deadline": 1765086400.0}
    fast = msgspec.json.encode(_RequestWire(body=msgspec.Raw(BODY), **fields))
    record = RequestRecord(body=json.loads(BODY), **fields)  # type: ignore[arg-type]
    assert json.loads(fast) == json.loads(record.dumps())
    assert RequestRecord.model_validate_json(fast) == record
