"""PromptLoop's Batch API v0 (seed 000), under `/v0`, on the same pipeline as `/v1`.

A job is a batch: launching one turns each data row into an OpenAI chat request line
(`millrace/promptloop.py`), stores those lines as the batch's input file and creates the
batch as `/v1/batches` does, so every row is a Kafka request like any other. Results are read back
from the batch's output and error files as PromptLoop's rows. `POST /v0/tasks` and
`PUT /v0/tasks/{id}` are millrace's (PromptLoop makes tasks in its dashboard).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.auth import Caller
from gateway.api.deps import owned_batch
from gateway.context import Context, Ctx
from gateway.intake import CreateBatch, Metadata, check_webhook, create_batch, spooled, store_file
from millrace.errors import ConflictError, InvalidRequestError, NotFoundError, PayloadTooLargeError
from millrace.lifecycle.status import BatchStatus, job_status
from millrace.promptloop import (
    CHAT,
    RowReport,
    Task,
    TaskSpec,
    request_lines,
    result_row,
    result_rows,
    validate_rows,
)
from millrace.protocol import Batch
from millrace.storage.principals import Principal
from millrace.storage.tasks import Tasks

router = APIRouter(prefix="/v0", tags=["promptloop"])

ROWS_CONTENT_TYPES = ("application/jsonl", "application/x-ndjson", "application/json",
                      "text/plain", "application/octet-stream", "")
ONE_ROW_TIMEOUT_S = 600.0


class InvalidData(InvalidRequestError):
    """400 with every bad row: OpenAI's envelope, plus `valid`, `rows` and `errors`."""

    code = "invalid_data"

    def __init__(self, report: RowReport) -> None:
        first = report.errors[0]
        super().__init__(f"{len(report.errors)} row(s) are not valid; line {first.line}: "
                         f"{first.message}", param="data")
        self.report = report


def invalid_data_response(exc: InvalidData) -> JSONResponse:
    body = {**exc.envelope().model_dump(), "valid": False, "rows": exc.report.rows,
            "errors": [e.model_dump() for e in exc.report.errors]}
    return JSONResponse(body, status_code=400)


# --- tasks ------------------------------------------------------------------------------
async def owned_task(ctx: Context, who: Principal, task_id: str, version: int | None = None
                     ) -> Task:
    task = await Tasks(ctx.store).get(task_id, who.project, version)
    if task is None:
        raise NotFoundError(f"No such task: {task_id}", param="task_id")
    return task


def served_spec(ctx: Context, spec: TaskSpec) -> TaskSpec:
    """The spec with its model checked (default: the first served model)."""
    models = list(ctx.settings.served_models())
    model = spec.model or models[0]
    if model not in models:
        raise InvalidRequestError(f"The model '{model}' is not served here.", param="model",
                                  code="model_not_found")
    return spec.model_copy(update={"model": model})


@router.post("/tasks", response_model=Task)
async def create_task(ctx: Ctx, who: Caller, spec: TaskSpec) -> Task:
    return await Tasks(ctx.store).create(served_spec(ctx, spec), who.project)


@router.get("/tasks", response_model=list[Task])
async def list_tasks(ctx: Ctx, who: Caller) -> list[Task]:
    return await Tasks(ctx.store).list(who.project)


@router.get("/tasks/{task_id}", response_model=Task)
async def get_task(ctx: Ctx, who: Caller, task_id: str,
                   version: Annotated[int | None, Query(ge=1, le=1_000_000)] = None) -> Task:
    return await owned_task(ctx, who, task_id, version)


@router.put("/tasks/{task_id}", response_model=Task)
async def update_task(ctx: Ctx, who: Caller, task_id: str, spec: TaskSpec) -> Task:
    """A new version of the task; jobs already launched keep the version they ran with."""
    task = await owned_task(ctx, who, task_id)
    return await Tasks(ctx.store).update(task, served_spec(ctx, spec))


class RunRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[Any]
    data_uuid: str | None = Field(default=None, min_length=1, max_length=512)


@router.post("/tasks/{task_id}")
async def run_row(ctx: Ctx, who: Caller, task_id: str, row: RunRow) -> dict[str, Any]:
    """One row now: a one-line batch through Kafka like any other. Its line is marked as
    waited on, so the sink hands its output line to Redis the moment it is spooled and the
    answer does not wait for the batch's files and final status (they follow)."""
    task = await owned_task(ctx, who, task_id)
    data = json.dumps({"data_uuid": row.data_uuid or "row", "inputs": row.inputs}).encode()
    with tempfile.TemporaryFile() as rows:
        rows.write(data + b"\n")
        rows.seek(0)
        batch, _ = await launch(ctx, who, task, rows, name="run", webhook_url=None,
                                single=True)
    result = await answer(ctx, who, batch)
    if result is None:
        raise ConflictError(f"The row did not finish (job {batch.id}).", param="task_id",
                            code="row_not_finished")
    if "error" in result:
        error = result["error"]
        raise InvalidRequestError(error["message"], param="inputs", code=error["code"])
    if row.data_uuid is None:
        result.pop("data_uuid")
    return result


async def answer(ctx: Context, who: Principal, batch: Batch) -> dict[str, Any] | None:
    """The one row's result: from the sink's reply, or — for a line re-driven after a crash,
    which nobody marked as waited on — from the files once the batch has them."""
    deadline = time.monotonic() + ONE_ROW_TIMEOUT_S
    while time.monotonic() < deadline:
        line = await ctx.store.wait_reply(batch.id, deadline - time.monotonic())
        if line is not None:
            return result_row(line.encode(), usage=True)
        if (await owned_batch(ctx, who, batch.id)).settled:
            found = await asyncio.to_thread(
                lambda: next(result_rows(ctx.files, batch.id, usage=True), None))
            return found
    return None


# --- data rows --------------------------------------------------------------------------
async def spooled_rows(ctx: Context, request: Request) -> IO[bytes]:
    """The request's JSONL rows (the body, or the multipart `file`) in a temporary file."""
    limit = ctx.settings.rows_max_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it)
    try:
        if content_type == "multipart/form-data":
            form = await request.form(max_part_size=limit)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidRequestError("The multipart body needs a 'file' part.",
                                          param="file", code="missing_required_parameter")
            await asyncio.to_thread(_copy, upload.file, spool, limit)
        elif content_type in ROWS_CONTENT_TYPES:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise _too_large(limit)
                spool.write(chunk)
        else:
            raise InvalidRequestError(
                f"Send the rows as application/jsonl (or multipart 'file'), not "
                f"'{content_type}'.", param="content-type", code="unsupported_media_type")
        spool.seek(0)
        return spool
    except BaseException:
        spool.close()
        raise


def _copy(source: IO[bytes], out: IO[bytes], limit: int) -> None:
    seen = 0
    while chunk := source.read(1 << 20):
        seen += len(chunk)
        if seen > limit:
            raise _too_large(limit)
        out.write(chunk)


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"An upload of rows may be at most {limit} bytes.",
                                param="data", code="request_too_large")


def lines_of(spool: IO[bytes]) -> Iterator[bytes]:
    spool.seek(0)
    for raw in spool:
        yield raw.rstrip(b"\r\n")


def check_rows(ctx: Context, task: Task, spool: IO[bytes]) -> RowReport:
    return validate_rows(task, lines_of(spool), max_rows=ctx.settings.batch_max_lines,
                         max_line_bytes=ctx.settings.batch_line_max_bytes)


class Validated(BaseModel):
    valid: Literal[True] = True
    rows: int


@router.post("/batches/validate-data", response_model=Validated)
async def validate_data(ctx: Ctx, who: Caller, request: Request,
                        task_id: Annotated[str, Query(max_length=64)]) -> Response:
    """Every check launching does, nothing launched: 200, or 400 listing every bad row."""
    task = await owned_task(ctx, who, task_id)
    with await spooled_rows(ctx, request) as spool:
        report = await asyncio.to_thread(check_rows, ctx, task, spool)
    if report.errors:
        return invalid_data_response(InvalidData(report))
    return JSONResponse(Validated(rows=report.rows).model_dump())


async def launch(ctx: Context, who: Principal, task: Task, spool: IO[bytes], *, name: str | None,
                 webhook_url: str | None, single: bool = False) -> tuple[Batch, int]:
    """Validate the rows, store them as request lines, create the batch (nothing is
    enqueued if any row is bad): the batch and its rows."""
    report = await asyncio.to_thread(check_rows, ctx, task, spool)
    if report.errors:
        raise InvalidData(report)
    params = CreateBatch(endpoint=CHAT, completion_window="24h", webhook_url=webhook_url)
    await check_webhook(ctx, params)
    def lines() -> Iterator[bytes]:
        return request_lines(task, lines_of(spool), ctx.settings.batch_line_max_bytes)

    stored = await store_file(ctx, who.project, spooled(ctx, lines),
                              filename=f"{task.id}-rows.jsonl", purpose="batch")
    ext = {"surface": "promptloop", "name": name, "task_id": task.id,
           "task_version": task.version, "rows": report.rows, "webhook_url": webhook_url,
           "single": single}
    batch = await create_batch(ctx, who.project, params, 24 * 3600, stored.id,
                               BatchStatus.VALIDATING, ext=ext, webhook_format="promptloop")
    return batch, report.rows


class Launched(BaseModel):
    job_id: str
    rows: int
    status: str


async def _launch_job(ctx: Context, who: Principal, request: Request, task_id: str,
                      webhook_url: str | None, name: str | None) -> Launched:
    task = await owned_task(ctx, who, task_id)
    with await spooled_rows(ctx, request) as spool:
        batch, rows = await launch(ctx, who, task, spool, name=name, webhook_url=webhook_url)
    return Launched(job_id=batch.id, rows=rows, status=job_status(batch.status))


_TaskId = Annotated[str, Query(max_length=64)]
_Url = Annotated[str | None, Query(max_length=2048)]
_Name = Annotated[str | None, Query(max_length=256)]


@router.post("/launch-job", response_model=Launched)
async def launch_job(ctx: Ctx, who: Caller, request: Request, task_id: _TaskId,
                     webhook_url: _Url = None, name: _Name = None) -> Launched:
    return await _launch_job(ctx, who, request, task_id, webhook_url, name)


@router.post("/batches", response_model=Launched)
async def create_job(ctx: Ctx, who: Caller, request: Request, task_id: _TaskId,
                     webhook_url: _Url = None, name: _Name = None) -> Launched:
    return await _launch_job(ctx, who, request, task_id, webhook_url, name)


# --- jobs -------------------------------------------------------------------------------
class Progress(BaseModel):
    total: int
    completed: int
    failed: int


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["in_progress", "completed", "failed"]
    millrace_status: BatchStatus = Field(description="the batch's exact (OpenAI) status")
    name: str | None = None
    task_id: str | None = None
    task_version: int | None = None
    progress: Progress
    metadata: dict[str, str] | None = None
    webhook_url: str | None = None
    created_at: int
    completed_at: int | None = None
    usage: dict[str, Any] | None = None


async def owned_job(ctx: Context, who: Principal, batch_id: str
                    ) -> tuple[Batch, dict[str, Any]]:
    """The caller's PromptLoop job: its batch and what launching it recorded."""
    batch = await owned_batch(ctx, who, batch_id)
    ext = await ctx.store.get_ext(batch.id)
    if ext.get("surface") != "promptloop":
        raise NotFoundError(f"No such job: {batch_id}", param="id")
    return batch, ext


async def job_of(ctx: Context, who: Principal, batch_id: str) -> Job:
    return job_object(*await owned_job(ctx, who, batch_id))


def job_object(batch: Batch, ext: dict[str, Any]) -> Job:
    counts = batch.request_counts
    ended = batch.completed_at or batch.failed_at or batch.expired_at or batch.cancelled_at
    return Job(id=batch.id, status=job_status(batch.status),
               millrace_status=batch.status, name=ext.get("name"),
               task_id=ext.get("task_id"), task_version=ext.get("task_version"),
               progress=Progress(total=counts.total or int(ext.get("rows") or 0),
                                 completed=counts.completed, failed=counts.failed),
               metadata=ext.get("metadata") or batch.metadata,
               webhook_url=ext.get("webhook_url"),
               created_at=batch.created_at, completed_at=ended,
               usage=batch.usage.model_dump())


@router.get("/job-status/{job_id}", response_model=Job)
async def job_status_route(ctx: Ctx, who: Caller, job_id: str) -> Job:
    return await job_of(ctx, who, job_id)


@router.get("/batches/{job_id}", response_model=Job)
async def get_job(ctx: Ctx, who: Caller, job_id: str) -> Job:
    return await job_of(ctx, who, job_id)


@router.get("/batches", response_model=list[Job])
async def list_jobs(ctx: Ctx, who: Caller,
                    skip: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
                    take: Annotated[int, Query(ge=1, le=100)] = 100) -> list[Job]:
    """The project's jobs, newest first (its `/v1` batches are not jobs and are left out)."""
    jobs: list[Job] = []
    position = skip
    while len(jobs) < take:
        ids = await ctx.store.batch_ids_at(who.project, position, take, newest_first=True)
        if not ids:
            break
        position += len(ids)
        for batch_id in ids:
            try:
                jobs.append(await job_of(ctx, who, batch_id))
            except NotFoundError:
                continue
    return jobs[:take]


class JobUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=256)
    metadata: Metadata = None  # bounded as a batch's


@router.put("/batches/{job_id}", response_model=Job)
async def update_job(ctx: Ctx, who: Caller, job_id: str, update: JobUpdate) -> Job:
    """Rename a job or replace its metadata (16 pairs, as a batch's)."""
    batch, ext = await owned_job(ctx, who, job_id)
    if update.name is not None:
        ext["name"] = update.name
    if update.metadata is not None:
        ext["metadata"] = update.metadata
    await ctx.store.put_ext(batch.id, ext)
    return job_object(batch, ext)


# --- results ------------------------------------------------------------------------------
def _json_array(rows: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    """A JSON array written row by row: memory stays one row, whatever the job's size."""
    yield b"["
    for n, row in enumerate(rows):
        yield (b"," if n else b"") + json.dumps(row).encode()
    yield b"]"


async def results_response(ctx: Context, who: Principal, job_id: str, output_type: str
                           ) -> Response:
    batch, _ = await owned_job(ctx, who, job_id)
    if not batch.settled:
        raise ConflictError(f"Job {batch.id} is still {batch.status.value}; its results come "
                            "when it has finished.", param="id", code="job_not_finished")
    rows = result_rows(ctx.files, batch.id)
    if output_type == "stream":
        return StreamingResponse((json.dumps(r).encode() + b"\n" for r in rows),
                                 media_type="application/jsonl")
    return StreamingResponse(_json_array(rows), media_type="application/json")


_OutputType = Annotated[Literal["json", "stream"], Query()]


@router.get("/batch/{job_id}/results")
async def results(ctx: Ctx, who: Caller, job_id: str, output_type: _OutputType = "json"
                  ) -> Response:
    """One object per row, `{"data_uuid", "<field>": value, …}` or `{"data_uuid", "error"}`,
    in no set order; `output_type=stream` gives the same rows as JSONL."""
    return await results_response(ctx, who, job_id, output_type)


@router.get("/batches/{job_id}/results")
async def batch_results(ctx: Ctx, who: Caller, job_id: str, output_type: _OutputType = "json"
                        ) -> Response:
    return await results_response(ctx, who, job_id, output_type)


def install(app: Any) -> None:
    """InvalidData answers with its rows listed (registered before the general handler)."""
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidData)
        return invalid_data_response(exc)

    app.add_exception_handler(InvalidData, handler)

