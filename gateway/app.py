"""The gateway's FastAPI application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import errors
from gateway.context import Context
from gateway.ingest_topic import StreamIngest
from gateway.routes import admin, batches, files, health, models, results, webhooks
from millrace.filestore import FileStore
from millrace.kafka import AsyncProducer, KafkaConfig, ensure_topics
from millrace.registry import Registry
from millrace.settings import Settings
from millrace.store import Principal, Store
from millrace.topics import Topics


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        kafka = KafkaConfig.of(settings, "gateway")
        topics = Topics.from_settings(settings)
        ensure_topics(kafka, topics.layout(settings), configs=topics.configs())
        store = Store.connect(settings.require_redis(), settings.topic_prefix)
        producer = AsyncProducer(kafka.producer())
        ctx = Context(
            settings=settings,
            store=store,
            files=FileStore(settings.files_url),
            producer=producer,
            topics=topics,
            registry=Registry(store, producer, topics),
        )
        if settings.api_key is not None:
            # A configured bootstrap key is always a working admin key (compose, k8s).
            await ctx.registry.put_api_key(
                settings.api_key.get_secret_value(), Principal("default", admin=True)
            )
        app.state.ctx = ctx
        ingest = StreamIngest(settings, ctx.store, ctx.producer)
        ingest_task = asyncio.create_task(ingest.run())
        try:
            yield
        finally:
            ingest.stop()
            await asyncio.wait_for(ingest_task, 30)
            for task in list(ctx.tasks):
                task.cancel()
            ctx.producer.close()
            await ctx.store.close()

    app = FastAPI(title="millrace", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    for module in (files, batches, results, webhooks, models, admin, health):
        app.include_router(module.router)
    return app
