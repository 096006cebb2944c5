"""`/v1/files`: upload (streamed to the file store), list, retrieve, content, delete."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from gateway.api.auth import Caller
from gateway.api.deps import owned_file
from gateway.context import Ctx
from gateway.intake import copied, store_file
from gateway.outputs import FileUrl, download_url
from millrace import signed
from millrace.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from millrace.filestore import TooLarge
from millrace.protocol import ExpiresAfter, FileObject, ListPage
from millrace.settings import Settings

router = APIRouter(prefix="/v1/files", tags=["files"])

UPLOAD_PURPOSES = {"batch", "assistants", "fine-tune", "vision", "user_data", "evals"}


def parse_expires_after(
    anchor: str | None, seconds: str | None, param: str
) -> ExpiresAfter | None:
    """The SDK sends nested multipart fields as `expires_after[anchor]`/`[seconds]`."""
    if anchor is None and seconds is None:
        return None
    try:
        return ExpiresAfter.model_validate({"anchor": anchor, "seconds": seconds})
    except ValidationError as exc:
        raise InvalidRequestError(
            f"'{param}' must be {{\"anchor\": \"created_at\", \"seconds\": 3600..2592000}}",
            param=param, code="invalid_value",
        ) from exc


@router.post("", response_model=FileObject)
async def upload(
    ctx: Ctx, who: Caller, file: UploadFile, purpose: Annotated[str, Form()],
    expires_anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    expires_seconds: Annotated[str | None, Form(alias="expires_after[seconds]")] = None,
) -> FileObject:
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"'{purpose}' is not a valid purpose; use one of {sorted(UPLOAD_PURPOSES)}",
            param="purpose", code="invalid_value",
        )
    expiry = parse_expires_after(expires_anchor, expires_seconds, "expires_after")
    limit = ctx.settings.batch_max_bytes if purpose == "batch" else ctx.settings.file_max_bytes
    try:
        # Starlette spools the multipart body to a temporary file; it is copied in chunks.
        return await store_file(ctx, who.project, copied(ctx, file.file, limit),
                                filename=file.filename or "", purpose=purpose,
                                expires_after_s=expiry.seconds if expiry else
                                retention(ctx.settings, purpose))
    except TooLarge as exc:
        raise PayloadTooLargeError(
            f"File is larger than the {exc.limit} byte limit for purpose '{purpose}'.",
            param="file",
        ) from exc


@router.get("", response_model=ListPage)
async def list_files(
    ctx: Ctx, who: Caller,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    purpose: str | None = None,
) -> ListPage:
    data: list[FileObject] = []
    cursor = after
    # A purpose filter can thin a page out: keep reading until it is full or the index ends.
    while len(data) <= limit:
        chunk = await ctx.store.list_files(
            who.project, after=cursor, limit=limit + 1, newest_first=order == "desc"
        )
        if not chunk:
            break
        cursor = chunk[-1].id
        data.extend(f for f in chunk if purpose is None or f.purpose == purpose)
    return ListPage.of(data[:limit], has_more=len(data) > limit)


@router.get("/{file_id}", response_model=FileObject)
async def retrieve(ctx: Ctx, who: Caller, file_id: str) -> FileObject:
    return (await owned_file(ctx, who, file_id)).obj


@router.get("/{file_id}/content")
async def content(ctx: Ctx, who: Caller, file_id: str) -> StreamingResponse:
    found = await owned_file(ctx, who, file_id)
    media = "application/jsonl" if found.obj.filename.endswith(".jsonl") else (
        "application/octet-stream")
    return StreamingResponse(ctx.files.iter_chunks(found.path), media_type=media)


@router.get("/{file_id}/url", response_model=FileUrl)
async def presigned(ctx: Ctx, who: Caller, file_id: str) -> FileUrl:
    """A pre-signed download URL (a millrace extension; PLai's downloads use it)."""
    found = await owned_file(ctx, who, file_id)
    return await asyncio.to_thread(download_url, ctx.settings, ctx.files, file_id, found.path)


signed_router = APIRouter(prefix="/signed/files", tags=["files"])


@signed_router.get("/{file_id}")
async def signed_content(ctx: Ctx, file_id: str,
                         expires: Annotated[int, Query(ge=0, le=2**40)],
                         signature: Annotated[str, Query(max_length=128)]) -> StreamingResponse:
    """A file's content for whoever holds its gateway-signed URL, until it expires."""
    signed.check(ctx.settings, file_id, expires, signature)
    found = await ctx.store.get_file_any(file_id)
    if found is None:
        raise NotFoundError(f"No such File object: {file_id}", param="file_id")
    return StreamingResponse(ctx.files.iter_chunks(found.path),
                             media_type="application/jsonl")


@router.delete("/{file_id}")
async def delete(ctx: Ctx, who: Caller, file_id: str) -> dict[str, object]:
    found = await owned_file(ctx, who, file_id)
    await ctx.registry.delete_file(file_id, who.project)
    await asyncio.to_thread(ctx.files.delete, found.path)
    return {"id": file_id, "object": "file", "deleted": True}


def retention(settings: Settings, purpose: str) -> int | None:
    """How long an upload given no `expires_after` is kept: a batch input file as long as
    `BATCH_FILE_RETENTION_S` (OpenAI: 30 days); any other until deleted."""
    return (settings.batch_file_retention_s or None) if purpose == "batch" else None
