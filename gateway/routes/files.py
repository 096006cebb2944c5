"""`/v1/files`: upload (streamed to the file store), list, retrieve, content, delete."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from gateway.auth import Caller
from gateway.context import Ctx
from millrace.errors import InvalidRequestError, NotFoundError
from millrace.protocol import FileObject, ListPage
from millrace.store import StoredFile

router = APIRouter(prefix="/v1/files", tags=["files"])

PURPOSES = {"batch", "batch_output", "assistants", "fine-tune", "vision", "user_data", "evals"}


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


@router.post("", response_model=FileObject)
async def upload(
    ctx: Ctx, who: Caller, file: UploadFile, purpose: Annotated[str, Form()]
) -> FileObject:
    if purpose not in PURPOSES - {"batch_output"}:
        raise InvalidRequestError(
            f"'{purpose}' is not a valid purpose for an upload.", param="purpose",
            code="invalid_value",
        )
    file_id = new_file_id()
    key = f"files/{file_id}"
    # Starlette spools the multipart body to a temporary file; we stream it on in chunks.
    size, _ = await asyncio.to_thread(ctx.files.write_from, key, file.file)
    obj = FileObject(
        id=file_id,
        bytes=size,
        created_at=int(time.time()),
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
    )
    await ctx.store.put_file(obj, who.project, key)
    return obj


@router.get("", response_model=ListPage)
async def list_files(
    ctx: Ctx, who: Caller, limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    purpose: str | None = None,
) -> ListPage:
    data = [f for f in await ctx.store.list_files(who.project, limit)
            if purpose is None or f.purpose == purpose]
    return ListPage.of(data)


async def owned(ctx: Ctx, who: Caller, file_id: str) -> StoredFile:
    found = await ctx.store.get_file(file_id, who.project)
    if found is None:
        raise NotFoundError(f"No such File object: {file_id}", param="file_id")
    return found


@router.get("/{file_id}", response_model=FileObject)
async def retrieve(ctx: Ctx, who: Caller, file_id: str) -> FileObject:
    return (await owned(ctx, who, file_id)).obj


@router.get("/{file_id}/content")
async def content(ctx: Ctx, who: Caller, file_id: str) -> StreamingResponse:
    found = await owned(ctx, who, file_id)
    return StreamingResponse(
        ctx.files.iter_chunks(found.path), media_type="application/octet-stream"
    )


@router.delete("/{file_id}")
async def delete(ctx: Ctx, who: Caller, file_id: str) -> dict[str, object]:
    found = await owned(ctx, who, file_id)
    await ctx.store.delete_file(file_id, who.project)
    await asyncio.to_thread(ctx.files.delete, found.path)
    return {"id": file_id, "object": "file", "deleted": True}
