"""`GET /v1/batches/{id}/output` (millrace extension): a batch's result lines while it runs
and after — JSONL, a JSON array (PromptLoop's results shape) or, once finished, Parquet.

Paging: `after` is the number of lines already read (the `x-millrace-next-cursor` of the
previous page). `x-millrace-complete: true` says the batch has finished and this page
reached the end of its file: no line will ever follow.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Iterator
from typing import IO, Annotated, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from gateway.api.auth import Caller
from gateway.api.deps import owned_batch
from gateway.context import Context, Ctx
from millrace.errors import ConflictError
from millrace.protocol import Batch
from millrace.result_files import read_page

router = APIRouter(prefix="/v1/batches", tags=["batches"])

PARQUET_ROWS = 5000  # rows per row group: what the export holds in memory at once
PARQUET_SCHEMA = pa.schema([
    ("custom_id", pa.string()),
    ("id", pa.string()),
    ("file", pa.string()),  # "output" or "errors"
    ("status_code", pa.int32()),
    ("request_id", pa.string()),
    ("body", pa.string()),  # the response body as JSON text
    ("error_code", pa.string()),
    ("error_message", pa.string()),
])


@router.get("/{batch_id}/output")
async def output(
    ctx: Ctx, who: Caller, batch_id: str,
    after: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    format: Literal["jsonl", "json", "parquet"] = "jsonl",
    file: Literal["output", "errors"] = "output",
) -> Response:
    batch = await owned_batch(ctx, who, batch_id)
    if format == "parquet":
        return await parquet(ctx, batch, who.project)
    page = await asyncio.to_thread(read_page, ctx.files, batch.id, file, after, limit)
    has_file = (batch.output_file_id if file == "output" else batch.error_file_id) is not None
    complete = batch.settled and (not has_file or (page.final and not page.more))
    headers = {
        "x-millrace-next-cursor": str(page.cursor(after)),
        "x-millrace-has-more": str(page.more).lower(),
        "x-millrace-complete": str(complete).lower(),
    }
    if format == "json":
        return Response(b"[" + b",".join(page.lines) + b"]", media_type="application/json",
                        headers=headers)
    return Response(b"".join(line + b"\n" for line in page.lines),
                    media_type="application/jsonl", headers=headers)


async def parquet(ctx: Context, batch: Batch, project: str) -> StreamingResponse:
    if not batch.settled:
        raise ConflictError(
            f"Batch {batch.id} is '{batch.status.value}': Parquet export is for finished "
            "batches; read lines so far with format=jsonl or format=json.", param="format")
    paths = []
    for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
        found = await ctx.store.get_file(file_id, project) if file_id else None
        if found is not None:
            paths.append((kind, found.path))
    spooled = await asyncio.to_thread(write_parquet, ctx, paths)
    return StreamingResponse(
        _chunks(spooled), media_type="application/vnd.apache.parquet",
        headers={"content-disposition": f'attachment; filename="{batch.id}.parquet"'})


def write_parquet(ctx: Context, paths: list[tuple[str, str]]) -> IO[bytes]:
    """Both files as one table, built a row group at a time (bounded memory)."""
    out = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 (streamed after)
    with pq.ParquetWriter(out, PARQUET_SCHEMA) as writer:
        rows: list[dict[str, Any]] = []
        for kind, path in paths:
            for raw in ctx.files.iter_lines(path):
                if raw.strip():
                    rows.append(_row(kind, json.loads(raw)))
                if len(rows) == PARQUET_ROWS:
                    writer.write_table(pa.Table.from_pylist(rows, PARQUET_SCHEMA))
                    rows = []
        writer.write_table(pa.Table.from_pylist(rows, PARQUET_SCHEMA))
    out.seek(0)
    return out


def _row(kind: str, line: dict[str, Any]) -> dict[str, Any]:
    response = line.get("response") or {}
    error = line.get("error") or {}
    body = response.get("body")
    return {
        "custom_id": line.get("custom_id"), "id": line.get("id"), "file": kind,
        "status_code": response.get("status_code"), "request_id": response.get("request_id"),
        "body": json.dumps(body) if body is not None else None,
        "error_code": error.get("code"), "error_message": error.get("message"),
    }


def _chunks(spooled: IO[bytes]) -> Iterator[bytes]:
    with spooled:
        while chunk := spooled.read(1 << 20):
            yield chunk
