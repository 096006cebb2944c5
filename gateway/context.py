"""What every route needs, built once per process in the app's lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from millrace.filestore import FileStore
from millrace.kafka import AsyncProducer
from millrace.registry import Registry
from millrace.settings import Settings
from millrace.store import Store
from millrace.topics import Topics


@dataclass
class Context:
    settings: Settings
    store: Store
    files: FileStore
    producer: AsyncProducer
    topics: Topics
    registry: Registry
    # Background ingest tasks, kept referenced so they are not garbage-collected.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


Ctx = Annotated[Context, Depends(context)]
