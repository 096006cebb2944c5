"""The published contract (docs/schemas.json) is exactly what the code reads and writes."""

from __future__ import annotations

import json
from pathlib import Path

from millrace.records import BatchTransition, parse_event
from millrace.schemas import topic_schemas

DOC = Path(__file__).parents[2] / "docs" / "schemas.json"


def test_the_documented_schemas_are_the_code_s() -> None:
    assert json.loads(DOC.read_text()) == topic_schemas(), (
        "regenerate with: millrace schemas > docs/schemas.json")


def test_every_batch_event_type_is_in_the_schema() -> None:
    events = topic_schemas()["batch-events"]
    types = {d["properties"]["type"]["const"] for d in events["$defs"].values()
             if "type" in d.get("properties", {})}
    assert types == {"created", "opened", "validated", "validation_failed",
                     "cancel_requested", "expire_due", "transition", "progress",
                     "fill_requested", "redrive_requested", "filled", "files_ready",
                     "finished"}
    raw = BatchTransition(batch_id="b", project="p", from_status="in_progress",
                          to_status="finalizing", total=1, completed=1, failed=0).dumps()
    assert parse_event(raw).type == "transition"
