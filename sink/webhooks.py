"""Webhook delivery: a batch's terminal transition becomes one delivery per target, and due
deliveries are signed (Standard Webhooks) and POSTed until one answers 2xx.

Targets: the batch's own `webhook_url` and the project's configured endpoints. Deliveries
live in Redis (`millrace.deliveries`), so a restarted sink carries on with the retries;
every attempt is recorded. A delivery waits until the read model shows the batch in its
final state (an expired batch with its files), so a receiver that fetches the batch when
told sees what the event says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import httpx

from millrace.deliveries import Deliveries, Delivery, DeliveryAttempt, delivery_id
from millrace.filestore import FileStore
from millrace.protocol import Batch
from millrace.records import BatchTransition
from millrace.settings import Settings
from millrace.store import Store
from millrace.webhooks import (
    EVENT_TYPES,
    UnsafeTarget,
    WebhookEvent,
    check_target,
    event_id,
    project_secret,
    retry_delay,
    signed_headers,
    signing_key,
)

log = logging.getLogger(__name__)

CONCURRENCY = 8  # deliveries attempted at once by one sink
IDLE_S = 0.2  # how often an idle dispatcher looks for due deliveries
SETTLE_POLL_S = 0.2
SETTLE_WAIT_S = 60.0  # longest a delivery waits for the read model to show the final batch


class Dispatcher:
    def __init__(self, settings: Settings, store: Store, files: FileStore,
                 client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.deliveries = Deliveries(store)
        # no redirects: a 3xx to an internal address would walk around the target check
        self.client = client or httpx.AsyncClient(timeout=settings.webhook_timeout_s,
                                                  follow_redirects=False)

    @property
    def enabled(self) -> bool:
        return self.settings.webhook_signing_key is not None

    async def enqueue(self, transition: BatchTransition) -> int:
        """Deliveries for a terminal transition; a repeated transition adds none."""
        event_type = EVENT_TYPES.get(transition.to_status)
        if event_type is None or not self.enabled:
            return 0
        targets: dict[str, tuple[str, str | None]] = {}
        for endpoint in await self.store.endpoints(transition.project):
            if endpoint.events is None or event_type in endpoint.events:
                targets.setdefault(endpoint.url, ("endpoint", endpoint.id))
        own = await self.store.batch_webhook(transition.batch_id)
        if own is not None:
            targets[str(own["url"])] = ("batch", None)
        evt = event_id(transition.batch_id, event_type)
        added = 0
        for url, (source, endpoint_id) in targets.items():
            added += await self.deliveries.add(Delivery(
                id=delivery_id(evt, url), batch_id=transition.batch_id,
                project=transition.project, event_id=evt, event_type=event_type,
                event_created_at=transition.at, url=url, source=source,
                endpoint_id=endpoint_id, next_attempt_at=time.time()))
        return added

    async def run(self, stopping: asyncio.Event) -> None:
        """Attempt due deliveries until `stopping` is set."""
        lease = self.settings.webhook_timeout_s + 5
        try:
            while not stopping.is_set():
                due = await self.deliveries.claim(lease, CONCURRENCY) if self.enabled else []
                if due:
                    await asyncio.gather(*(self.attempt(i) for i in due))
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), IDLE_S)
        finally:
            await self.client.aclose()

    async def attempt(self, delivery_id_: str) -> None:
        delivery = await self.deliveries.get(delivery_id_)
        if delivery is None or delivery.status != "pending":
            await self.deliveries.forget_due(delivery_id_)
            return
        batch = await self.store.get_batch(delivery.batch_id, delivery.project)
        now = time.time()
        if not settled(batch, delivery) and now - delivery.event_created_at < SETTLE_WAIT_S:
            await self.deliveries.defer(delivery.id, now + SETTLE_POLL_S)
            return
        body = await self.payload(delivery, batch)
        number = len(delivery.attempts) + 1
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        retry = True
        try:
            await check_target(delivery.url, self.settings)
            secret = project_secret(signing_key(self.settings), delivery.project)
            headers = signed_headers(secret, delivery.event_id, int(time.time()), body)
            response = await self.client.post(delivery.url, content=body, headers=headers)
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except UnsafeTarget as exc:
            error, retry = exc.message, False  # the target is refused: never retried
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        record = DeliveryAttempt(attempt=number, at=time.time(), status_code=status_code,
                                 error=error, duration_ms=(time.monotonic() - started) * 1000)
        next_at = self.next_attempt(delivery, number) if error and retry else None
        await self.deliveries.record(delivery, record, next_at, delivered=error is None)
        log.info("webhook %s %s → %s (attempt %d%s)", delivery.event_type, delivery.url,
                 status_code or error, number,
                 f", next in {next_at - time.time():.1f}s" if next_at else "")

    def next_attempt(self, delivery: Delivery, attempts: int) -> float | None:
        """When to try again, or None once past the retry horizon."""
        s = self.settings
        at = time.time() + retry_delay(attempts, s.webhook_retry_base_s, s.webhook_retry_max_s)
        return at if at <= delivery.event_created_at + s.webhook_horizon_s else None

    async def payload(self, delivery: Delivery, batch: Batch | None) -> str:
        data: dict[str, Any] = (batch.model_dump(mode="json") if batch is not None
                                else {"id": delivery.batch_id})
        most = self.settings.webhook_results_max_lines
        if batch is not None and most and batch.request_counts.total <= most:
            data["results"] = await self.results(batch, delivery.project)
        event = WebhookEvent(id=delivery.event_id, type=delivery.event_type,
                             created_at=delivery.event_created_at, data=data)
        return event.model_dump_json()

    async def results(self, batch: Batch, project: str) -> list[Any]:
        """A small batch's output and error lines (PromptLoop sends results with the hook)."""
        lines: list[Any] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            found = await self.store.get_file(file_id, project) if file_id else None
            if found is not None:
                raw = await asyncio.to_thread(self._lines, found.path)
                lines += [json.loads(line) for line in raw if line.strip()]
        return lines


    def _lines(self, path: str) -> list[bytes]:
        return list(self.files.iter_lines(path))


def settled(batch: Batch | None, delivery: Delivery) -> bool:
    """The read model shows the batch as the event describes it, files attached."""
    return (batch is not None and EVENT_TYPES.get(batch.status) == delivery.event_type
            and batch.settled)
