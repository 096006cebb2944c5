"""`/v1/models`: the served model names to put in `body.model` (with the LoRA adapters the
workers serve as model names)."""

from __future__ import annotations

import time

from fastapi import APIRouter

from gateway.api.auth import Caller
from gateway.context import Ctx
from gateway.worker_board import ServedNames
from millrace.errors import NotFoundError
from millrace.protocol import ListPage, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"])
_STARTED = int(time.time())


@router.get("", response_model=ListPage)
async def list_models(ctx: Ctx, who: Caller) -> ListPage:
    return ListPage(data=[ModelObject(id=name, created=_STARTED)
                          for name in ServedNames(ctx.settings, ctx.board)])


@router.get("/{model_id}", response_model=ModelObject)
async def retrieve(ctx: Ctx, who: Caller, model_id: str) -> ModelObject:
    if model_id not in ServedNames(ctx.settings, ctx.board):
        raise NotFoundError(f"The model '{model_id}' does not exist", param="model",
                            code="model_not_found")
    return ModelObject(id=model_id, created=_STARTED)
