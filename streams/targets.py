"""Who hears that a batch is finished: its own `webhook_url` and its project's endpoints."""

from __future__ import annotations

from millrace.records import BatchFinished, WebhookTarget
from millrace.store import Store
from millrace.webhooks import EVENT_TYPES


async def with_endpoints(store: Store, event: BatchFinished) -> BatchFinished:
    """The project's webhook endpoints that want this event, besides the batch's own."""
    event_type = EVENT_TYPES.get(event.status)
    targets = list(event.webhooks)
    urls = {t.url for t in targets}
    for endpoint in await store.endpoints(event.project):
        wanted = endpoint.events is None or event_type in endpoint.events
        if wanted and endpoint.url not in urls:
            targets.append(WebhookTarget(url=endpoint.url, source="endpoint",
                                         endpoint_id=endpoint.id))
            urls.add(endpoint.url)
    return event.model_copy(update={"webhooks": targets})
