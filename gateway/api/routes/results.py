"""A batch's results while it runs and after (millrace extensions).

- `GET /v1/batches/{id}/output`: the lines of its output or error file — JSONL, a JSON
  array (PromptLoop's results shape) or, once finished, Parquet. Paging: `after` is the
  number of lines already read (the `x-millrace-next-cursor` of the previous page).
  `x-millrace-complete: true` says the batch has finished and this page reached the end of
  its file: no line will ever follow.
- `GET /v1/batches/{id}/results`: one row per answered line, from both files, each with a
  typed `result` (Anthropic's: `succeeded`, `errored`, `cancelled`, `expired`), filtered
  by `status` and `custom_id`, with its input line beside it on `include_input=true`.
  The cursor is `<output lines read>.<error lines read>`: each file is read from where the
  last page left it, so lines written meanwhile are found by the next page.
"""

from __future__ import annotations

import asyncio
import json
import re
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
from millrace.errors import ConflictError, InvalidRequestError
from millrace.protocol import Batch
from millrace.result_files import KINDS, read_page

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


ResultType = Literal["succeeded", "errored", "cancelled", "expired"]
SCAN_LINES = 1000  # lines read from a file at once while looking for matching rows
_CURSOR = re.compile(r"^(\d{1,10})\.(\d{1,10})$")


def result_type(kind: str, line: dict[str, Any]) -> ResultType:
    """What became of a line: an output line answered 200 succeeded; an error line was
    cancelled or expired (millrace's own codes), or errored (refused by the engine, or
    never run for another reason)."""
    if kind == "output":
        return "succeeded"
    code = (line.get("error") or {}).get("code")
    if code == "batch_cancelled":
        return "cancelled"
    return "expired" if code == "batch_expired" else "errored"


def _cursor(text: str) -> tuple[int, int]:
    found = _CURSOR.match(text)
    if found is None:
        raise InvalidRequestError("after must be a cursor this route returned "
                                  "(x-millrace-next-cursor), e.g. '0.0'", param="after",
                                  code="invalid_value")
    return int(found[1]), int(found[2])


@router.get("/{batch_id}/results")
async def results(
    ctx: Ctx, who: Caller, batch_id: str,
    status: ResultType | None = None,
    custom_id: Annotated[str | None, Query(max_length=512)] = None,
    include_input: bool = False,
    after: Annotated[str, Query(max_length=32)] = "0.0",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    format: Literal["jsonl", "json"] = "jsonl",
) -> Response:
    """Rows `{custom_id, result: {type, response, error}, input?}` of the answered lines
    that match, output lines first: the page ends after `limit` rows or the files' ends."""
    batch = await owned_batch(ctx, who, batch_id)
    start = _cursor(after)
    kinds = ("output",) if status == "succeeded" else (
        ("errors",) if status is not None else KINDS)
    rows, read, more = await asyncio.to_thread(
        _matching, ctx, batch.id, kinds, start, limit, status, custom_id)
    if include_input:
        inputs = await _inputs(ctx, batch, who.project, {r["custom_id"] for r in rows})
        rows = [{**r, "input": inputs.get(r["custom_id"])} for r in rows]
    headers = {"x-millrace-next-cursor": f"{read[0]}.{read[1]}",
               "x-millrace-has-more": str(more).lower(),
               "x-millrace-complete": str(batch.settled and not more).lower()}
    if format == "json":
        return Response(json.dumps(rows).encode(), media_type="application/json",
                        headers=headers)
    return Response(b"".join(json.dumps(r).encode() + b"\n" for r in rows),
                    media_type="application/jsonl", headers=headers)


def _matching(ctx: Context, batch_id: str, kinds: tuple[str, ...], start: tuple[int, int],
              limit: int, status: str | None, custom_id: str | None
              ) -> tuple[list[dict[str, Any]], list[int], bool]:
    """Up to `limit` matching rows after `start`; where each file was read to; whether
    lines were left unread."""
    rows: list[dict[str, Any]] = []
    read = list(start)
    for index, kind in enumerate(KINDS):
        if kind not in kinds:
            continue
        while True:
            page = read_page(ctx.files, batch_id, kind, read[index], SCAN_LINES)
            for raw in page.lines:
                if len(rows) == limit:
                    return rows, read, True
                read[index] += 1
                line = json.loads(raw)
                typed = result_type(kind, line)
                if (status is None or typed == status) and (
                        custom_id is None or line.get("custom_id") == custom_id):
                    rows.append({"custom_id": line.get("custom_id"), "result": {
                        "type": typed, "response": line.get("response"),
                        "error": line.get("error")}})
            if not page.more:
                break
    return rows, read, False


async def _inputs(ctx: Context, batch: Batch, project: str, wanted: set[str]
                  ) -> dict[str, Any]:
    """The input lines of these custom_ids (none for a stream batch: its lines are not
    kept as a file)."""
    found = await ctx.store.get_file(batch.input_file_id, project) if wanted else None
    if found is None:
        return {}

    def scan(path: str) -> dict[str, Any]:
        lines: dict[str, Any] = {}
        for raw in ctx.files.iter_lines(path):
            if raw.strip():
                line = json.loads(raw)
                if line.get("custom_id") in wanted:
                    lines[line["custom_id"]] = line
        return lines

    return await asyncio.to_thread(scan, found.path)


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
