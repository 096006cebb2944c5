"""Webhook delivery: a batch's `finished` event becomes one delivery per target it names,
and due deliveries are signed (Standard Webhooks) and POSTed until one answers 2xx.

The event carries everything: the final Batch object (files attached, counts, usage) and
the targets (the batch's own `webhook_url` and its project's endpoints that want the event
type), so nothing is looked up in the read model. The body is built once, when the
delivery is recorded, and is the same on every attempt. Deliveries live in Redis
(`millrace.storage.deliveries`), so a restarted sink carries on with the retries; every attempt is
recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import httpx

from millrace import metrics
from millrace.errors import OUTAGES
from millrace.filestore import FileStore
from millrace.lifecycle.status import job_status
from millrace.outbound import (
    NO_ANSWER,
    TIMED_OUT,
    Resolver,
    UnsafeTarget,
    resolve,
)
from millrace.promptloop import result_rows
from millrace.records import BatchFinished
from millrace.result_files import KINDS, final_key
from millrace.settings import Settings
from millrace.storage.deliveries import Deliveries, Delivery, DeliveryAttempt, delivery_id
from millrace.storage.store import Store
from millrace.webhooks import (
    EVENT_TYPES,
    WebhookEvent,
    event_id,
    retry_delay,
    signed_headers,
    signing_key,
    signing_secrets,
    webhook_guard,
)

log = logging.getLogger(__name__)

CONCURRENCY = 8  # deliveries attempted at once by one sink
IDLE_S = 0.2  # how often an idle dispatcher looks for due deliveries


class EndpointGone(Exception):
    """The endpoint a delivery was for no longer exists: it is not tried again."""


class Dispatcher:
    def __init__(self, settings: Settings, store: Store, files: FileStore,
                 client: httpx.AsyncClient | None = None, resolver: Resolver = resolve) -> None:
        self.settings = settings
        self.files = files
        self.store = store
        self.deliveries = Deliveries(store)
        self.guard = webhook_guard(settings, resolver)
        # no redirects: a 3xx to an internal address would walk around the target check
        self.client = client or httpx.AsyncClient(timeout=settings.webhook_timeout_s,
                                                  follow_redirects=False)

    @property
    def enabled(self) -> bool:
        return self.settings.webhook_signing_key is not None

    async def enqueue(self, finished: BatchFinished) -> int:
        """Deliveries of a `finished` event; a repeated event adds none."""
        event_type = EVENT_TYPES.get(finished.status)
        if event_type is None or not self.enabled or not finished.webhooks:
            return 0
        evt = event_id(finished.batch_id, event_type)
        bodies: dict[str, str] = {}
        added = 0
        for target in finished.webhooks:
            if target.format not in bodies:
                bodies[target.format] = await (
                    self.promptloop_payload(finished) if target.format == "promptloop"
                    else self.payload(finished, evt, event_type))
            added += await self.deliveries.add(Delivery(
                id=delivery_id(evt, target.url), batch_id=finished.batch_id,
                project=finished.project, event_id=evt, event_type=event_type,
                event_created_at=finished.at, url=target.url, source=target.source,
                endpoint_id=target.endpoint_id, next_attempt_at=time.time()),
                bodies[target.format])
        return added

    async def run(self, stopping: asyncio.Event) -> None:
        """Attempt due deliveries until `stopping` is set."""
        lease = self.settings.webhook_timeout_s + 5
        try:
            while not stopping.is_set():
                try:
                    due = await self.deliveries.claim(lease, CONCURRENCY) if self.enabled else []
                    if due:
                        await asyncio.gather(*(self.attempt(i) for i in due))
                        continue
                except OUTAGES as exc:  # Redis away: the deliveries wait in it
                    log.warning("webhook deliveries wait: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), IDLE_S)
        finally:
            await self.client.aclose()

    async def attempt(self, delivery_id_: str) -> None:
        delivery = await self.deliveries.get(delivery_id_)
        body = await self.deliveries.body(delivery_id_)
        if delivery is None or body is None or delivery.status != "pending":
            await self.deliveries.forget_due(delivery_id_)
            return
        number = len(delivery.attempts) + 1
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        detail = ""
        retry = True
        try:
            url, secrets = await self.signing(delivery)
            # resolved and checked once; the request goes to the address that was checked
            target = await self.guard.check(url)
            headers = signed_headers(secrets, delivery.event_id, int(time.time()), body)
            status_code = await self.guard.post(self.client, target, body, headers)
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except UnsafeTarget as exc:
            error, retry = exc.message, False  # the target is refused: never retried
        except EndpointGone as exc:
            error, retry = str(exc), False
        except httpx.TimeoutException as exc:
            error, detail = TIMED_OUT, f"{type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:  # refused, reset, not HTTP: one text for them all
            error, detail = NO_ANSWER, f"{type(exc).__name__}: {exc}"
        record = DeliveryAttempt(attempt=number, at=time.time(), status_code=status_code,
                                 error=error, duration_ms=(time.monotonic() - started) * 1000)
        next_at = self.next_attempt(delivery, number) if error and retry else None
        await self.deliveries.record(delivery, record, next_at, delivered=error is None)
        outcome = "delivered" if error is None else "retried" if next_at else "given_up"
        metrics.WEBHOOK_ATTEMPTS.labels(outcome).inc()
        log.info("webhook %s %s → %s%s (attempt %d%s)", delivery.event_type, delivery.url,
                 status_code or error, f" ({detail})" if detail else "", number,
                 f", next in {next_at - time.time():.1f}s" if next_at else "")

    async def signing(self, delivery: Delivery) -> tuple[str, list[str]]:
        """Where an attempt goes and the secrets it is signed with, as the endpoint is now:
        a rotated secret signs from the next attempt on, an updated URL receives it, and a
        deleted endpoint receives nothing more."""
        key = signing_key(self.settings)
        if delivery.source != "endpoint" or delivery.endpoint_id is None:
            return delivery.url, signing_secrets(key, delivery.project, None, time.time())
        endpoint = await self.store.endpoint(delivery.project, delivery.endpoint_id)
        if endpoint is None:
            raise EndpointGone(f"webhook endpoint {delivery.endpoint_id} was deleted")
        return endpoint.url, signing_secrets(key, delivery.project, endpoint, time.time())

    def next_attempt(self, delivery: Delivery, attempts: int) -> float | None:
        """When to try again, or None once past the retry horizon."""
        s = self.settings
        at = time.time() + retry_delay(attempts, s.webhook_retry_base_s, s.webhook_retry_max_s)
        return at if at <= delivery.event_created_at + s.webhook_horizon_s else None

    async def payload(self, finished: BatchFinished, evt: str, event_type: str) -> str:
        data = dict(finished.batch) or {"id": finished.batch_id}
        most = self.settings.webhook_results_max_lines
        counts = data.get("request_counts") or {}
        if most and int(counts.get("total") or 0) <= most:
            data["results"] = await asyncio.to_thread(self.results, finished.batch_id)
        event = WebhookEvent(id=evt, type=event_type, created_at=finished.at, data=data)
        return event.model_dump_json()

    async def promptloop_payload(self, finished: BatchFinished) -> str:
        """PromptLoop's webhook: `{"job_id", "status", "data": [result rows]}`, built once and
        kept with the delivery. Past `promptloop_webhook_max_rows` rows, `data` is null and
        `results_url` says where to stream them from (with the project's key)."""
        counts = (finished.batch or {}).get("request_counts") or {}
        body: dict[str, Any] = {"job_id": finished.batch_id,
                                "status": job_status(finished.status)}
        if int(counts.get("total") or 0) > self.settings.promptloop_webhook_max_rows:
            body.update(data=None, rows=int(counts["total"]),
                        results_url=f"/v0/batch/{finished.batch_id}/results?output_type=stream")
        else:
            body["data"] = await asyncio.to_thread(
                lambda: list(result_rows(self.files, finished.batch_id)))
        return json.dumps(body)

    def results(self, batch_id: str) -> list[Any]:
        """A small batch's output and error lines (PromptLoop sends results with the hook)."""
        lines: list[Any] = []
        for kind in KINDS:
            if self.files.exists(final_key(batch_id, kind)):
                lines += [json.loads(line) for line in self.files.iter_lines(
                    final_key(batch_id, kind)) if line.strip()]
        return lines
