"""Validating → exploding a batch's input file onto the requests topic.

Runs as a background task after `POST /v1/batches` returns. The gateway only publishes
events; the aggregator owns the batch status and applies the transitions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from gateway.context import Context
from gateway.validation import Report, Rules, check_line, parse_lines, validate
from millrace.protocol import Batch, BatchError
from millrace.records import BatchValidated, BatchValidationFailed, RequestRecord
from millrace.settings import Settings
from millrace.topics import Topics, request_route

log = logging.getLogger(__name__)


def rules(settings: Settings, endpoint: str) -> Rules:
    return Rules(endpoint=endpoint, models=settings.served_models(),
                 max_lines=settings.batch_max_lines)


def request(
    settings: Settings, topics: Topics, record: RequestRecord
) -> tuple[str, str, int, bytes]:
    """(topic, key, partition, value) of one request line: the model's topic, the line's
    shard of the batch."""
    key, partition = request_route(record.batch_id, record.line, settings.shards(),
                                   settings.request_partitions)
    return topics.requests_for(str(record.body["model"])), key, partition, record.dumps()


def records(
    ctx: Context, batch: Batch, project: str, key: str
) -> Iterator[tuple[str, str, int, bytes]]:
    """Second pass over a validated file: one request record per line."""
    unused = Report()
    line_rules = rules(ctx.settings, batch.endpoint)
    for number, raw in parse_lines(ctx.files.iter_lines(key)):
        line = check_line(number, raw, line_rules, unused)
        assert line is not None, "validated lines cannot fail on the second pass"
        record = RequestRecord(
            batch_id=batch.id, project=project, custom_id=line.custom_id,
            line=number, url=line.url, body=line.body,
        )
        yield request(ctx.settings, ctx.topics, record)


async def ingest(ctx: Context, batch: Batch, project: str, key: str) -> None:
    topic = ctx.topics.batch_events
    try:
        report = await asyncio.to_thread(
            validate, ctx.files.iter_lines(key), rules(ctx.settings, batch.endpoint)
        )
        if report.errors:
            event = BatchValidationFailed(batch_id=batch.id, errors=report.errors)
            await ctx.producer.send(topic, batch.id, event.dumps())
            return
        sent = await asyncio.to_thread(
            ctx.producer.send_all, records(ctx, batch, project, key)
        )
        event_ok = BatchValidated(batch_id=batch.id, total=sent, model=report.model)
        await ctx.producer.send(topic, batch.id, event_ok.dumps())
    except Exception as exc:
        log.exception("ingest of %s failed", batch.id)
        failed = BatchValidationFailed(
            batch_id=batch.id,
            errors=[BatchError(code="server_error", message=f"could not ingest: {exc}")],
        )
        await ctx.producer.send(topic, batch.id, failed.dumps())
