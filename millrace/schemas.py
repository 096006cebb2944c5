"""JSON schemas of the public contract: every record on every topic, and the webhook body.

`millrace schemas` prints them; `docs/schemas.json` holds the same (a test keeps it so).
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from millrace.protocol import RequestLine
from millrace.records import (
    BatchEvent,
    IngestReject,
    RegistryEntry,
    RequestRecord,
    ResponseRecord,
    WorkerStatus,
)
from millrace.webhooks import WebhookEvent

# topic (after `<prefix>.`) or "webhook" → the record type of its values
CONTRACT: dict[str, Any] = {
    "requests.<model>": RequestRecord,
    "responses": ResponseRecord,
    "batch-events": BatchEvent,
    "ingest": RequestLine,
    "ingest-rejects": IngestReject,
    "registry": RegistryEntry,
    "workers": WorkerStatus,
    "webhook": WebhookEvent,
}


def topic_schemas() -> dict[str, Any]:
    return {name: TypeAdapter(kind).json_schema() for name, kind in CONTRACT.items()}
