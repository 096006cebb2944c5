"""Intake: the one door through which every surface — OpenAI's `/v1`, PromptLoop's `/v0`,
PLai's `/v2`, the dashboard — registers a file and creates a batch.

- `store_file`: content written to the file store, then the file registered (published to
  the registry, then readable).
- `create_batch`: a Batch stored and its `created` published (answered only once the broker
  acknowledged it); `from_url` (its input fetched first), `open_stream` (fed from the ingest
  topic), `retry_failed` (a finished batch's failed lines, as a new batch).
- The checks every create makes: the window, the endpoint, the webhook target.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from gateway.context import Context
from gateway.estimate import Admitted, window_text
from millrace.errors import (
    ConflictError,
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from millrace.lifecycle.state import STREAM_INPUT
from millrace.lifecycle.status import BatchStatus
from millrace.protocol import Batch, ExpiresAfter, FileObject
from millrace.records import BatchCreated, BatchOpened
from millrace.records.requests import BACKGROUND, BACKGROUND_PRIORITY
from millrace.settings import Settings
from millrace.storage.ledger import StreamLedger
from millrace.storage.principals import Principal
from millrace.webhooks import check_target, signing_key, webhook_guard

MAX_FILENAME = 255
RETRYABLE = (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)
MAX_METADATA = 16


# --- files -----------------------------------------------------------------------------------
def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def clean_filename(name: str | None) -> str:
    """The name as given (OpenAI keeps it), without control characters, at most 255."""
    kept = "".join(c for c in (name or "") if unicodedata.category(c)[0] != "C")
    return kept.strip()[:MAX_FILENAME] or "upload.jsonl"


async def store_file(ctx: Context, project: str, write: Callable[[str], int], *,
                     filename: str, purpose: str, expires_after_s: int | None = None
                     ) -> FileObject:
    """A new file: `write(key)` puts its content in the file store (in a thread) and says
    its size; then the file is registered (published to the registry, then readable)."""
    file_id = new_file_id()
    key = f"files/{file_id}"
    size = await asyncio.to_thread(write, key)
    created = int(time.time())
    obj = FileObject(id=file_id, bytes=size, created_at=created,
                     filename=clean_filename(filename), purpose=purpose,
                     expires_at=created + expires_after_s if expires_after_s else None)
    await ctx.registry.put_file(obj, project, key)
    return obj


def spooled(ctx: Context, lines: Callable[[], Iterator[bytes]]) -> Callable[[str], int]:
    """A `store_file` writer of lines made on the fly (each ends with a newline)."""
    def write(key: str) -> int:
        with tempfile.TemporaryFile() as out:
            out.writelines(lines())
            out.seek(0)
            size, _ = ctx.files.write_from(key, out)
        return size
    return write


def copied(ctx: Context, source: IO[bytes], limit: int | None = None
           ) -> Callable[[str], int]:
    """A `store_file` writer that copies `source` (at most `limit` bytes: `TooLarge`)."""
    def write(key: str) -> int:
        size, _ = ctx.files.write_from(key, source, limit)
        return size
    return write


async def inline_file(ctx: Context, project: str, requests: list[dict[str, Any]]) -> FileObject:
    """An inline batch's `requests` as its input file (JSONL, one request a line, in their
    order): validated afterwards exactly as an uploaded file is. Refused here when there
    are none, or more lines or bytes than a file may hold."""
    settings = ctx.settings
    if not requests:
        raise InvalidRequestError("requests must hold at least one request line",
                                  param="requests", code="invalid_value")
    if len(requests) > settings.batch_max_lines:
        raise InvalidRequestError(
            f"A batch may hold at most {settings.batch_max_lines:,} requests; this one has "
            f"{len(requests):,}.", param="requests", code="too_many_requests")
    lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
             for r in requests]
    size = sum(len(line) for line in lines)
    if size > settings.batch_max_bytes:
        raise PayloadTooLargeError(
            f"The requests come to {size:,} bytes as a file, more than the "
            f"{settings.batch_max_bytes:,} byte limit of a batch input file.", param="requests")
    return await store_file(ctx, project, spooled(ctx, lambda: iter(lines)),
                            filename="inline_requests.jsonl", purpose="batch",
                            expires_after_s=settings.batch_file_retention_s or None)


# --- batches ---------------------------------------------------------------------------------
# OpenAI accepts only "24h"; other windows are a millrace extension: `<n>h`, `<n>m`, `<n>s`
# up to `max_completion_window_s`, and "background" (spare capacity, a long horizon).
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smh])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
# a batch's `priority` (higher first; Gemini's batch field); above 0 only as far as the
# caller's key allows (`max_priority`, set by an admin)
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000


def window_seconds(window: str, settings: Settings) -> int:
    """How long a batch has (`background`: the background horizon)."""
    if window == BACKGROUND:
        return settings.background_horizon_s
    match = _WINDOW.match(window)
    seconds = int(match[1]) * _UNIT_S[match[2]] if match else 0
    longest = settings.max_completion_window_s
    if not 0 < seconds <= longest:
        raise InvalidRequestError(
            f"completion_window must be '24h', a window like '1h', '30m' or '90s' of at most "
            f"{window_text(longest)}, or 'background'", param="completion_window",
            code="invalid_value",
        )
    return seconds


def _metadata_bounds(value: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's bounds: 16 pairs, keys of 64 and values of 512 characters."""
    if value is None:
        return None
    if len(value) > 16:
        raise ValueError("metadata may hold at most 16 pairs")
    for key, item in value.items():
        if len(key) > 64:
            raise ValueError(f"metadata key '{key[:20]}…' is longer than 64 characters")
        if len(item) > 512:
            raise ValueError(f"metadata value of '{key}' is longer than 512 characters")
    return value


Metadata = Annotated[dict[str, str] | None, AfterValidator(_metadata_bounds)]


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str | None = None
    # millrace extension (as vLLM's run-batch takes a URL): the input file is fetched from
    # here, through the outbound guard, into the file store
    input_file_url: str | None = Field(default=None, max_length=2048)
    # millrace extension: "stream" opens a batch fed from the ingest topic, sealed later
    input: Literal["file", "stream"] = "file"
    endpoint: str
    completion_window: str
    metadata: Metadata = None
    output_expires_after: ExpiresAfter | None = None
    # Inference Cloud's field (seed 003); `metadata.webhook_url` works the same way
    webhook_url: str | None = Field(default=None, max_length=2048)
    # millrace extension (Gemini's batch `priority`): higher is served first; none: the
    # key's `default_priority` (0 unless an admin set one)
    priority: int | None = Field(default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    # millrace extension (Anthropic's, Gemini's and OpenRouter's inline batches): the
    # request lines themselves, instead of an uploaded file; kept as the batch's input file
    requests: list[dict[str, Any]] | None = None

    @property
    def queue_priority(self) -> int:
        """Where the batch's lines queue: its priority, or below every priority when its
        window is `background`."""
        if self.completion_window == BACKGROUND:
            return BACKGROUND_PRIORITY
        return self.priority or 0

    @property
    def webhook(self) -> tuple[str, str] | None:
        """(url, the parameter it came from), if the batch asks for a webhook."""
        if self.webhook_url is not None:
            return self.webhook_url, "webhook_url"
        url = (self.metadata or {}).get("webhook_url")
        return (url, "metadata.webhook_url") if url is not None else None


def served_endpoint(ctx: Context, endpoint: str) -> None:
    """Refuse `endpoint` unless the workers serve it (every endpoint vLLM's server has
    while no worker has reported yet: the workers judge each line then)."""
    served = ctx.board.endpoints()
    if endpoint not in served:
        raise InvalidRequestError(
            f"endpoint must be one of {', '.join(served)}", param="endpoint",
            code="invalid_value",
        )


def with_priority(who: Principal, params: CreateBatch) -> CreateBatch:
    """The create with its priority: the key's `default_priority` where it gives none; one
    above the key's `max_priority` is refused (403), never lowered quietly."""
    if params.priority is None:
        return params.model_copy(update={"priority": who.default_priority})
    if params.priority > who.max_priority:
        raise PermissionDeniedError(
            f"This key may create batches of priority up to {who.max_priority}; ask an "
            f"admin to raise its max_priority for {params.priority}.", param="priority",
            code="priority_not_allowed")
    return params


async def check_webhook(ctx: Context, params: CreateBatch) -> None:
    if params.webhook is None:
        return
    url, param = params.webhook
    signing_key(ctx.settings, param)
    await check_target(url, ctx.settings, param)


async def from_url(ctx: Context, project: str, params: CreateBatch, window: int, url: str,
                   ext: Mapping[str, Any] | None = None) -> Batch:
    """A batch whose input file a gateway's explode fetches from `url` first (the URL is
    checked now, so a refused one is a 400 at once)."""
    await webhook_guard(ctx.settings).check(url, "input_file_url", "invalid_url")
    return await create_batch(ctx, project, params, window, new_file_id(),
                              BatchStatus.VALIDATING, input_url=url,
                              ext={**(ext or {}), "input_file_url": url})


async def create_batch(ctx: Context, project: str, params: CreateBatch, window: int,
                       input_file_id: str, status: BatchStatus, *, input_url: str | None = None,
                       ext: Mapping[str, Any] | None = None, webhook_format: str = "openai",
                       admitted: Admitted | None = None) -> Batch:
    """Store a new Batch object and publish `created` (file and stream batches alike).

    Only a batch whose `created` the broker acknowledged is answered with a 2xx; if it
    cannot be published, the batch is taken back and the caller gets a 503. `ext` holds
    what a PromptLoop or PLai client gave beyond the OpenAI fields; `admitted`, the estimate
    admission made of it (`gateway.estimate`), shown on the batch and counted in its queue.
    """
    listed_at = time.time()
    now = int(listed_at)
    batch = Batch(
        id="batch_" + secrets.token_hex(12),
        endpoint=params.endpoint,
        input_file_id=input_file_id,
        completion_window=params.completion_window,
        status=status,
        created_at=now,
        in_progress_at=now if status is BatchStatus.IN_PROGRESS else None,
        expires_at=now + window,
        metadata=params.metadata,
        priority=params.priority or 0,
        estimate=admitted.estimate if admitted else None,
    )
    webhook = {"url": params.webhook[0], "format": webhook_format} if params.webhook else None
    created = BatchCreated(
        batch_id=batch.id, project=project, batch=batch.model_dump(mode="json"),
        output_expires_after_s=(
            params.output_expires_after.seconds if params.output_expires_after else None),
        webhook=webhook, listed_at=listed_at, input_url=input_url,
    )
    if ext:
        await ctx.store.put_ext(batch.id, ext)
    await ctx.store.create_batch(batch, project, listed_at=listed_at,
                                 created=created.dumps().decode(),
                                 enqueued=admitted.enqueued if admitted else None)
    try:
        await ctx.send(batch.id, created)
    except ServiceUnavailableError:
        await ctx.store.forget_batch(batch.id, project)
        raise
    return batch


async def open_stream(ctx: Context, project: str, params: CreateBatch, window: int
                      ) -> tuple[Batch, str]:
    """A batch whose lines producers write to `<prefix>.ingest`, in progress at once, and
    the ingest token its messages must carry."""
    if params.input_file_id is not None:
        raise InvalidRequestError("a stream batch takes no input_file_id",
                                  param="input_file_id", code="invalid_value")
    batch = await create_batch(ctx, project, params, window, STREAM_INPUT,
                               BatchStatus.IN_PROGRESS)
    # open for lines before the caller learns the id, so no early line is rejected
    token = "mrit_" + secrets.token_urlsafe(24)
    await StreamLedger(ctx.store).open(batch.id, batch.endpoint, project, token)
    await ctx.send(batch.id, BatchOpened(batch_id=batch.id, at=batch.created_at))
    return batch, token


# --- a new batch of a finished batch's failed lines -----------------------------------------
async def retry_failed(ctx: Context, project: str, batch: Batch, custom_ids: list[str] | None,
                       webhook_url: str | None) -> Batch:
    """A new batch of `batch`'s failed lines (those of its error file, or the `custom_ids`
    among them), copied unchanged and in input order; the original is unchanged."""
    batch_id = batch.id
    if batch.status not in RETRYABLE:
        why = ("it failed validation, so none of its lines ran: fix the input file"
               if batch.status is BatchStatus.FAILED else "it has not finished")
        raise ConflictError(f"Cannot retry batch {batch_id}: {why}.", param="batch_id")
    if batch.input_file_id == STREAM_INPUT:
        raise ConflictError("A stream batch's lines are not kept after it ends: produce the "
                            "failed ones again to a new batch.", param="batch_id")
    failed = await failed_ids(ctx, project, batch)
    chosen = failed if custom_ids is None else set(custom_ids)
    if unknown := sorted(chosen - failed):
        raise InvalidRequestError(
            f"{len(unknown)} custom_ids are not failed lines of {batch_id} "
            f"(first: {unknown[0]!r}).", param="custom_ids", code="invalid_value")
    if not chosen:
        raise ConflictError(f"Batch {batch_id} has no failed lines to retry.",
                            param="batch_id")
    metadata = {**(batch.metadata or {}), "retry_of": batch.id}
    if len(metadata) > MAX_METADATA:
        raise InvalidRequestError(
            f"Batch {batch_id} has 16 metadata pairs: no room for retry_of.", param="metadata",
            code="invalid_value")
    create = CreateBatch(endpoint=batch.endpoint, completion_window=batch.completion_window,
                         metadata=metadata, webhook_url=webhook_url, priority=batch.priority)
    await check_webhook(ctx, create)
    file_id = await copy_lines(ctx, project, batch, chosen)
    return await create_batch(ctx, project, create,
                              window_seconds(batch.completion_window, ctx.settings),
                              file_id, BatchStatus.VALIDATING)


async def failed_ids(ctx: Context, project: str, batch: Batch) -> set[str]:
    """The custom_ids of the batch's error file."""
    if batch.error_file_id is None:
        return set()
    found = await ctx.store.get_file(batch.error_file_id, project)
    if found is None:
        raise ConflictError(f"The error file of {batch.id} is gone (expired or deleted).",
                            param="batch_id")
    return await asyncio.to_thread(
        lambda: {str(json.loads(line)["custom_id"]) for line in _lines(ctx, found.path)})


async def copy_lines(ctx: Context, project: str, batch: Batch, chosen: set[str]) -> str:
    """A new input file of the original's lines whose custom_id is chosen: its id."""
    source = await ctx.store.get_file(batch.input_file_id, project)
    if source is None:
        raise ConflictError(f"The input file of {batch.id} is gone (expired or deleted).",
                            param="batch_id")
    path = source.path

    def lines() -> Iterator[bytes]:
        return (line + b"\n" for line in _lines(ctx, path)
                if str(json.loads(line)["custom_id"]) in chosen)

    stored = await store_file(ctx, project, spooled(ctx, lines),
                              filename=f"{batch.id}-retry.jsonl", purpose="batch")
    return stored.id


def _lines(ctx: Context, path: str) -> Iterator[bytes]:
    return (line for line in ctx.files.iter_lines(path) if line.strip())
