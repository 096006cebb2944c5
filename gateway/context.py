"""What every route needs, built once per process in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from confluent_kafka import KafkaException
from fastapi import Depends, Request

from gateway.estimate import Admission
from gateway.worker_board import WorkerBoard
from millrace.errors import ServiceUnavailableError
from millrace.filestore import FileStore
from millrace.kafka import AsyncProducer
from millrace.records import Record
from millrace.registry import Registry
from millrace.settings import Settings
from millrace.storage.store import Store
from millrace.topics import Topics

# How long an API call waits for the broker to acknowledge what it publishes before it
# answers 503 (the producer gives up on the record then too, so it is never published).
API_DELIVERY_TIMEOUT_MS = 5000


@dataclass
class Context:
    settings: Settings
    store: Store
    files: FileStore
    producer: AsyncProducer  # `message.timeout.ms` = API_DELIVERY_TIMEOUT_MS
    topics: Topics
    registry: Registry
    board: WorkerBoard = field(default_factory=WorkerBoard)  # the workers' latest load
    admission: Admission = field(init=False)  # estimates and checks at create

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings, self.store, self.files, self.board)

    async def send(self, batch_id: str, event: Record) -> None:
        """Publish a batch event, acknowledged, or raise a 503 that nothing happened."""
        try:
            await self.producer.send(self.topics.batch_events, batch_id, event.dumps())
        except KafkaException as exc:
            raise ServiceUnavailableError(
                "millrace cannot reach its broker right now; nothing was done, try again "
                "shortly.") from exc


async def context(request: Request) -> Context:
    """(async: FastAPI runs a plain function dependency in a thread pool, per request)"""
    ctx: Context = request.app.state.ctx
    return ctx


Ctx = Annotated[Context, Depends(context)]
