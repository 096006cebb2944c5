"""`/dashboard`: the operators' and users' console — batches with live progress, one batch's
timeline and errors (Cancel, Retry, downloads), workers and models.

The page is one server-rendered shell (Jinja2) and a little JavaScript (`static/`, with uPlot
for the throughput chart, served from here: nothing is fetched from elsewhere). The browser
keeps the API key in its session storage and calls the JSON routes below with it; an admin
key sees every project, any other key its own.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from gateway import control, intake
from gateway.api.auth import Caller
from gateway.context import Context, Ctx
from gateway.outputs import FileUrl, download_url, processing_errors
from millrace.errors import NotFoundError
from millrace.lifecycle.status import BatchStatus
from millrace.protocol import Batch
from millrace.storage.principals import Principal

HERE = Path(__file__).parents[2]  # gateway/
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/dashboard", include_in_schema=False)

TIMELINE = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
            "expired_at", "cancelling_at", "cancelled_at")
SCAN_MOST = 1000  # newest batches looked at for a filtered list


@router.get("", response_class=HTMLResponse)
async def page(request: Request) -> HTMLResponse:
    return templates.TemplateResponse(request, "dashboard.html", {})


@router.get("/api/me")
async def me(who: Caller) -> dict[str, Any]:
    return {"project": who.project, "admin": who.admin}


def _scope(who: Principal) -> str | None:
    return None if who.admin else who.project


def progress(batch: Batch, now: float) -> dict[str, Any]:
    """The batch as the list shows it: counts, rate (lines/s while it ran) and ETA."""
    counts = batch.request_counts
    done = counts.completed + counts.failed
    started = batch.in_progress_at
    ended = (batch.finalizing_at or batch.cancelled_at or batch.expired_at or batch.failed_at
             or now)
    rate = done / max(ended - started, 1e-3) if started and done else 0.0
    running = batch.status in (BatchStatus.IN_PROGRESS, BatchStatus.VALIDATING)
    eta = (counts.total - done) / rate if running and rate and counts.total else None
    return {"rate": round(rate, 2), "eta_s": round(eta, 1) if eta is not None else None,
            "age_s": round(now - batch.created_at, 1)}


@router.get("/api/batches")
async def list_batches(ctx: Ctx, who: Caller,
                       status: Annotated[BatchStatus | None, Query()] = None,
                       limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
    """The newest batches (of every project for an admin key), optionally of one status."""
    most = SCAN_MOST if status is not None else limit
    found = []
    now = time.time()
    for batch_id, project in await ctx.store.newest_batch_ids(_scope(who), most):
        batch = await ctx.store.get_batch(batch_id, project)
        if batch is None or (status is not None and batch.status is not status):
            continue
        found.append({**batch.model_dump(mode="json"), "project": project,
                      **progress(batch, now)})
        if len(found) == limit:
            break
    return {"data": found}


async def _batch(ctx: Context, who: Principal, batch_id: str) -> tuple[Batch, Principal]:
    """The batch and a principal of its project, if the caller may see it."""
    project = await ctx.store.batch_project(batch_id)
    batch = None
    if project is not None and (who.admin or project == who.project):
        batch = await ctx.store.get_batch(batch_id, project)
    if batch is None or project is None:
        raise NotFoundError(f"No such Batch object: {batch_id}", param="batch_id")
    return batch, Principal(project, admin=who.admin)


@router.get("/api/batches/{batch_id}")
async def one_batch(ctx: Ctx, who: Caller, batch_id: str) -> dict[str, Any]:
    batch, owner = await _batch(ctx, who, batch_id)
    data = batch.model_dump(mode="json")
    place = None
    if not batch.status.terminal and batch.estimate is not None and batch.estimate.model:
        place = await ctx.admission.place(batch.id, batch.estimate.model)
    return {**data, "project": owner.project, **progress(batch, time.time()), "queue": place,
            "timeline": [{"event": f.removesuffix("_at"), "at": data[f]}
                         for f in TIMELINE if data.get(f)],
            "line_errors": await asyncio.to_thread(processing_errors, ctx.files, batch)}


@router.post("/api/batches/{batch_id}/cancel")
async def cancel(ctx: Ctx, who: Caller, batch_id: str) -> Batch:
    batch, _ = await _batch(ctx, who, batch_id)
    return await control.cancel(ctx, batch)


@router.post("/api/batches/{batch_id}/retry")
async def retry_failed(ctx: Ctx, who: Caller, batch_id: str) -> Batch:
    batch, owner = await _batch(ctx, who, batch_id)
    return await intake.retry_failed(ctx, owner.project, batch, None, None)


@router.get("/api/batches/{batch_id}/files/{kind}")
async def file_url(ctx: Ctx, who: Caller, batch_id: str,
                   kind: Literal["output", "error"]) -> FileUrl:
    """A pre-signed download of the batch's output or error file."""
    batch, owner = await _batch(ctx, who, batch_id)
    file_id = batch.output_file_id if kind == "output" else batch.error_file_id
    found = await ctx.store.get_file(file_id, owner.project) if file_id else None
    if file_id is None or found is None:
        raise NotFoundError(f"Batch {batch_id} has no {kind} file.", param="kind")
    return await asyncio.to_thread(download_url, ctx.settings, ctx.files, file_id, found.path)


@router.get("/api/workers")
async def workers(ctx: Ctx, who: Caller) -> dict[str, Any]:
    """Served models with their queue depth, each worker's load, and throughput."""
    live = ctx.board.live()
    models: dict[str, dict[str, int]] = {
        m: {"running": 0, "waiting": 0, "lag": 0, "workers": 0}
        for m in ctx.settings.served_models()}
    rows = []
    for status in live:
        rate = _rates(status.history)
        for model, load in status.models.items():
            total = models.setdefault(model, {"running": 0, "waiting": 0, "lag": 0,
                                              "workers": 0})
            total["running"] += load.running
            total["waiting"] += load.waiting
            total["lag"] += load.lag
            total["workers"] += 1
        rows.append({"worker": status.worker, "at": status.at,
                     "up_s": round(status.at - status.started_at),
                     "running": sum(m.running for m in status.models.values()),
                     "waiting": sum(m.waiting for m in status.models.values()),
                     "finished": sum(m.finished for m in status.models.values()),
                     "failed": sum(m.failed for m in status.models.values()),
                     "requests_per_s": rate[0], "tokens_per_s": rate[1],
                     "models": sorted(status.models)})
    return {"models": [{"model": m, "queue": v["waiting"] + v["lag"], **v}
                       for m, v in sorted(models.items())],
            "workers": rows, "throughput": _throughput([s.history for s in live])}


def _rates(history: list[tuple[float, int, int]]) -> tuple[float, float]:
    """Requests and tokens per second between a worker's last two history samples."""
    if len(history) < 2:
        return 0.0, 0.0
    (t0, f0, k0), (t1, f1, k1) = history[-2], history[-1]
    took = max(t1 - t0, 1e-3)
    return round((f1 - f0) / took, 2), round((k1 - k0) / took, 1)


def _throughput(histories: list[list[tuple[float, int, int]]]) -> list[list[float]]:
    """[time, requests/s, tokens/s] over every worker, one point per history step (each
    worker's rate between its samples, summed into 10-second slots)."""
    slots: dict[int, list[float]] = {}
    for history in histories:
        for (t0, f0, k0), (t1, f1, k1) in itertools.pairwise(history):
            took = max(t1 - t0, 1e-3)
            slot = slots.setdefault(int(t1 // 10 * 10), [0.0, 0.0])
            slot[0] += (f1 - f0) / took
            slot[1] += (k1 - k0) / took
    return [[t, round(r, 2), round(k, 1)] for t, (r, k) in sorted(slots.items())]
