"""Typed, versioned Kafka records: the contract between millrace services and subscribers,
one module per topic.

Every record carries `v` (schema version; fields are only ever added) and is serialised as
UTF-8 JSON. Keys are the batch id on the requests, responses and batch-events topics.

- `requests`: `<prefix>.requests` — one accepted input line.
- `responses`: `<prefix>.responses` — one outcome per line; usage.
- `events`: `<prefix>.batch-events` — a batch's life, and `EVENT_FLOW`: who writes and who
  reacts to each event type.
- `ingest`: `<prefix>.ingest` headers and `<prefix>.ingest-rejects`.
- `registry`: `<prefix>.registry` — files, API keys, webhook endpoints.
- `workers`: `<prefix>.workers` — each worker's load.

Everything is also importable from `millrace.records` itself.
"""

from millrace.records.base import Record, now
from millrace.records.events import (
    EVENT_FLOW,
    BatchCancelRequested,
    BatchCreated,
    BatchEvent,
    BatchExpireDue,
    BatchFilesReady,
    BatchFilled,
    BatchFillRequested,
    BatchFinished,
    BatchOpened,
    BatchProgress,
    BatchRedriveRequested,
    BatchTransition,
    BatchValidated,
    BatchValidationFailed,
    Flow,
    WebhookTarget,
    parse_event,
)
from millrace.records.ingest import CONTROL_HEADER, INGEST_TOKEN_HEADER, IngestReject
from millrace.records.registry import (
    ApiKeyEntry,
    EndpointEntry,
    Fence,
    FileEntry,
    RegistryEntry,
    endpoint_key,
    parse_registry,
)
from millrace.records.requests import (
    Order,
    QueuedRequest,
    RequestRecord,
    line_ticket,
    read_request,
)
from millrace.records.responses import (
    NULL,
    ResponseOutcome,
    ResponseRecord,
    SpooledResponse,
    Tokens,
    Usage,
    body_tokens,
    read_response,
    response_value,
    usage_of,
)
from millrace.records.workers import ModelLoad, WorkerStatus

__all__ = [
    "CONTROL_HEADER", "EVENT_FLOW", "INGEST_TOKEN_HEADER", "NULL", "ApiKeyEntry",
    "BatchCancelRequested", "BatchCreated", "BatchEvent", "BatchExpireDue", "BatchFilesReady",
    "BatchFillRequested", "BatchFilled", "BatchFinished", "BatchOpened", "BatchProgress",
    "BatchRedriveRequested", "BatchTransition", "BatchValidated", "BatchValidationFailed",
    "EndpointEntry", "Fence", "FileEntry", "Flow", "IngestReject", "ModelLoad",
    "Order", "QueuedRequest", "Record", "RegistryEntry", "RequestRecord", "ResponseOutcome",
    "ResponseRecord", "SpooledResponse", "Tokens", "Usage", "WebhookTarget", "WorkerStatus",
    "body_tokens", "endpoint_key", "line_ticket", "now", "parse_event", "parse_registry",
    "read_request", "read_response", "response_value", "usage_of",
]
