"""What routes look up for the caller: its batch or file, or a 404 in OpenAI's words."""

from __future__ import annotations

import time

from gateway.context import Context
from millrace.errors import NotFoundError
from millrace.protocol import Batch
from millrace.storage.files import StoredFile
from millrace.storage.principals import Principal


async def owned_batch(ctx: Context, who: Principal, batch_id: str) -> Batch:
    batch = await ctx.store.get_batch(batch_id, who.project)
    if batch is None:
        raise NotFoundError(f"No such Batch object: {batch_id}", param="batch_id")
    return batch


async def owned_file(ctx: Context, who: Principal, file_id: str) -> StoredFile:
    """The caller's file; one past its `expires_at` is gone, as on OpenAI."""
    found = await ctx.store.get_file(file_id, who.project)
    expired = found and found.obj.expires_at and found.obj.expires_at <= time.time()
    if found is None or expired:
        raise NotFoundError(f"No such File object: {file_id}", param="file_id")
    return found
