"""The gateway's FastAPI application."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from gateway.api import errors, openapi
from gateway.api.headers import SecurityHeaders
from gateway.api.http_limits import BodyLimits
from gateway.api.routes import (
    admin,
    batches,
    dashboard,
    docs,
    health,
    metrics,
    models,
    plai,
    promptloop,
    results,
    retry,
    webhook_endpoints,
)
from gateway.api.routes import files as files_routes
from gateway.context import API_DELIVERY_TIMEOUT_MS, Context
from gateway.ingest import StreamIngest
from gateway.jobs.consumer import Jobs
from gateway.worker_board import WorkerFollower
from millrace.filestore import FileStore
from millrace.kafka import AsyncProducer, KafkaConfig, ensure_topics
from millrace.metrics import gateway_registry
from millrace.readiness import mark_ready
from millrace.registry import Registry
from millrace.settings import Settings
from millrace.storage.principals import Principal
from millrace.storage.store import Store
from millrace.topics import Topics

log = logging.getLogger(__name__)
RESTART_S = 1.0


class Background(Protocol):
    async def run(self) -> None: ...

    def stop(self) -> None: ...


async def keep_running(name: str, start: Callable[[], Background],
                       stopping: asyncio.Event) -> None:
    """Run a background stage of the gateway; after it failed (an outage), a fresh one."""
    while not stopping.is_set():
        stage = start()
        watch = asyncio.create_task(_stop_when(stopping, stage))
        try:
            await stage.run()
        except Exception:
            log.exception("the %s stage failed; starting it again", name)
            await asyncio.sleep(RESTART_S)
        finally:
            watch.cancel()


async def _stop_when(stopping: asyncio.Event, stage: Background) -> None:
    await stopping.wait()
    stage.stop()


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        kafka = KafkaConfig.of(settings, "gateway")
        topics = Topics.from_settings(settings)
        ensure_topics(kafka, topics.layout(settings), configs=topics.configs())
        store = Store.connect(settings.require_redis(), settings.topic_prefix)
        files = FileStore(settings.files_url)
        producer = AsyncProducer(kafka.producer(**{"message.timeout.ms": API_DELIVERY_TIMEOUT_MS}))
        ctx = Context(settings=settings, store=store, files=files, producer=producer,
                      topics=topics, registry=Registry(store, producer, topics))
        if settings.api_key is not None:
            # A configured bootstrap key is always a working admin key (compose, k8s).
            await ctx.registry.put_api_key(
                settings.api_key.get_secret_value(), Principal("default", admin=True)
            )
        app.state.ctx = ctx
        mark_ready(settings, settings.gateway_name)
        stopping = asyncio.Event()
        stages = [
            asyncio.create_task(keep_running(
                "ingest", lambda: StreamIngest(settings, store, files, ctx.board), stopping)),
            asyncio.create_task(keep_running(
                "jobs", lambda: Jobs(settings, store, files, ctx.board), stopping)),
            asyncio.create_task(keep_running(
                "workers", lambda: WorkerFollower(settings, ctx.board), stopping)),
        ]
        try:
            yield
        finally:
            stopping.set()
            await asyncio.wait_for(asyncio.gather(*stages), 30)
            producer.close()
            await store.close()

    # the docs pages are served from the package (gateway/api/routes/docs.py), not from a CDN
    app = FastAPI(title="millrace", version="0.1.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.add_middleware(BodyLimits, json_max_bytes=settings.json_max_bytes,
                       upload_max_bytes=max(settings.file_max_bytes, settings.batch_max_bytes),
                       batch_max_bytes=settings.batch_max_bytes,
                       rows_max_bytes=settings.rows_max_bytes)
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, a 401 or 413 too
    app.state.metrics_registry = gateway_registry(settings)
    errors.install(app)
    promptloop.install(app)
    app.openapi = lambda: openapi.document(app)  # type: ignore[method-assign]
    for module in (files_routes, batches, retry, results, webhook_endpoints, models, admin, health,
                   metrics, promptloop, plai):
        app.include_router(module.router)
    app.include_router(files_routes.signed_router)
    app.include_router(dashboard.router)
    app.include_router(docs.router)
    app.mount("/dashboard/static", StaticFiles(directory=dashboard.STATIC), name="dashboard")
    return app
