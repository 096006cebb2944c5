"""Batch events parse by their type, and one map of a batch's life: `EVENT_FLOW` says who
writes and who reacts to each event type on `<prefix>.batch-events`; each reader's
`{type: handler}` table, the events each service constructs (read from its source), and the
README's table are held to it."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.jobs.consumer import Jobs
from gpu_consumer.stops import StoppedBatches
from millrace.lifecycle import state
from millrace.lifecycle.status import BatchStatus
from millrace.protocol import BatchError
from millrace.records import (
    EVENT_FLOW,
    BatchCancelRequested,
    BatchCreated,
    BatchEvent,
    BatchFilesReady,
    BatchFilled,
    BatchFillRequested,
    BatchFinished,
    BatchProgress,
    BatchRedriveRequested,
    BatchTransition,
    BatchValidated,
    BatchValidationFailed,
    WebhookTarget,
    parse_event,
)
from millrace.records.events import readers_of, writers_of
from sink.service import Sink
from tests.sources import parsed, python_files

ROOT = Path(__file__).resolve().parents[3]
# the source that writes for each writer in EVENT_FLOW
WRITERS = {
    "gateway": ["gateway"],
    "aggregator": ["streams", "millrace/lifecycle/state.py"],
    "sink": ["sink"],
    "worker": ["gpu_consumer"],
    "recovery": ["millrace/recovery.py", "millrace/lifecycle/decisions.py"],
}
# a reader → its dispatch table
HANDLERS: dict[str, dict[str, typing.Any]] = {
    "gateway": Jobs.HANDLERS,
    "aggregator": state.HANDLERS,
    "sink": Sink.HANDLERS,
    "worker": StoppedBatches.HANDLERS,
}


def event_classes() -> dict[str, str]:
    """Class name → event type, for every member of `BatchEvent`."""
    union = typing.get_args(BatchEvent)[0]
    return {cls.__name__: cls.model_fields["type"].default for cls in typing.get_args(union)}


def test_every_event_type_is_on_the_map_and_nothing_else() -> None:
    assert set(EVENT_FLOW) == set(event_classes().values())
    for kind, flow in EVENT_FLOW.items():
        assert flow.writers, kind
        assert flow.readers, kind
        assert flow.writers | flow.readers <= set(WRITERS), kind


@pytest.mark.parametrize("service", sorted(HANDLERS))
def test_each_reader_dispatches_exactly_the_events_the_map_gives_it(service: str) -> None:
    assert set(HANDLERS[service]) == readers_of(service)


def constructed(paths: list[str]) -> set[str]:
    """The event types constructed in these files or packages (`BatchX(...)`, and a final
    state's `finished_event()`)."""
    classes = event_classes()
    found = set()
    for tree in parsed(python_files(*paths)).values():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in classes:
                found.add(classes[name])
            elif name == "finished_event":
                found.add("finished")
    return found


@pytest.mark.parametrize("service", sorted(WRITERS))
def test_each_writer_constructs_exactly_the_events_the_map_gives_it(service: str) -> None:
    assert constructed(WRITERS[service]) == writers_of(service)


def test_the_readme_table_is_the_map() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| ([a-z, ]+) \| ([a-z, ]+) \|", readme, re.MULTILINE)
    table = {kind: (set(writers.split(", ")), set(readers.split(", ")))
             for kind, writers, readers in rows if kind != "type"}
    assert table == {kind: (set(flow.writers), set(flow.readers))
                     for kind, flow in EVENT_FLOW.items()}


def test_events_parse_by_type() -> None:
    events = [
        BatchCreated(batch_id="b", project="p", batch={"id": "b"}),
        BatchValidated(batch_id="b", total=3, model="m"),
        BatchValidationFailed(batch_id="b", errors=[BatchError(code="x", message="y", line=1)]),
        BatchTransition(batch_id="b", project="p", from_status=BatchStatus.IN_PROGRESS,
                        to_status=BatchStatus.FINALIZING, total=3, completed=2, failed=1),
        BatchFilesReady(batch_id="b", output_file_id="f", error_file_id=None, lines=3),
        BatchCancelRequested(batch_id="b"),
        BatchProgress(batch_id="b", completed=2, failed=1, input_tokens=7, output_tokens=9),
        BatchFillRequested(batch_id="b", project="p", code="batch_expired", input_file_id="f"),
        BatchRedriveRequested(batch_id="b", project="p", input_file_id="stream"),
        BatchFilled(batch_id="b", total=3),
        BatchFinished(batch_id="b", project="p", status=BatchStatus.COMPLETED,
                      batch={"id": "b", "status": "completed"},
                      webhooks=[WebhookTarget(url="https://x.example/h", source="batch")]),
    ]
    for event in events:
        assert parse_event(event.dumps()) == event


def test_unknown_event_type_is_rejected() -> None:
    with pytest.raises(ValidationError):
        parse_event(b'{"v": 1, "batch_id": "b", "type": "exploded"}')
